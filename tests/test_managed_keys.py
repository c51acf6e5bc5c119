"""Managed keys across replicas: two real ``nomoat serve`` processes (the
embedded model) sharing one real PostgreSQL, called with the official
``openai`` SDK. A key created through one replica (or the CLI) works on
both; revoked through one, it stops on the other within a second; a key
gets 403 for a model it may not use and 401 once expired."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from gateway.auth import hash_api_key
from gateway.testing import LiveGateway, running_gateway
from tests.conftest import API_KEY, STARTUP_SECONDS, Cli

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
ADMIN_KEY = "sk-nomoat-admin-0123456789abcdef"
HI = [{"role": "user", "content": "Hi"}]


def replica_config(database: str, redis: str) -> str:
    # Redis: keys given budgets or limits while the replicas run share them
    # (without it, replicas on PostgreSQL refuse those keys with 503).
    return textwrap.dedent(
        f"""
        [server]
        api_key_hashes = ["{hash_api_key(API_KEY)}"]
        admin_key_hashes = ["{hash_api_key(ADMIN_KEY)}"]
        shutdown_grace_seconds = 5

        [accounting]
        database = "{database}"
        redis = "{redis}"

        [models.{MODEL}]
        aliases = ["small"]
        deployments = [{{ backend = "embedded", model = "{MODEL}" }}]

        [models.other]
        deployments = [{{ backend = "embedded", model = "{MODEL}" }}]
        """
    )


@dataclass(frozen=True)
class Replicas:
    a: LiveGateway
    b: LiveGateway
    # The database both use (postgresql://...), and their Redis.
    database: str
    redis: str


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: str, redis_server: str
) -> Iterator[Replicas]:
    """Two gateways on one new database, started one after the other (the
    first applies the migrations); shared by this module's tests."""
    from tests.services import fresh_database

    database = fresh_database(postgres_server)
    with ExitStack() as stack:
        live = [
            stack.enter_context(
                running_gateway(
                    tmp_path_factory.mktemp(f"replica-{name}"),
                    replica_config(database, redis_server),
                    api_key=API_KEY,
                    startup_seconds=STARTUP_SECONDS,
                )
            )
            for name in ("a", "b")
        ]
        yield Replicas(live[0], live[1], database, redis_server)


def sdk(replica: LiveGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=replica.base_url, api_key=key, max_retries=0, timeout=60)


def admin(replica: LiveGateway) -> httpx.Client:
    return httpx.Client(
        base_url=replica.root_url,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )


def seconds_until(check: Callable[[], bool], limit: float) -> float:
    """How long ``check`` took to become true (polled), failing past ``limit``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > limit:
            pytest.fail(f"not within {limit:g} s")
        time.sleep(0.02)
    return time.monotonic() - started


def refused(client: openai.OpenAI) -> bool:
    try:
        client.models.list()
    except openai.AuthenticationError:
        return True
    return False


def test_a_key_revoked_through_one_replica_stops_on_both_within_a_second(
    replicas: Replicas,
) -> None:
    a, b = replicas.a, replicas.b
    with admin(a) as api:
        made = api.post(
            "/admin/keys", json={"name": "alice", "models": ["small"], "budget_usd": 1.5}
        )
        assert made.status_code == 201, made.text
        created = made.json()
        key = created["key"]
        assert created["budget_usd"] == 1.5 and created["budget_period"] == "total"
        on_a, on_b = sdk(a, key), sdk(b, key)
        # Created through a: usable there at once, on b after its next poll.
        on_a.models.list()
        seconds_until(lambda: not refused(on_b), 1.0)
        # The alias it was given covers the model's own name, on either replica.
        for client in (on_a, on_b):
            reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
            assert reply.usage is not None and reply.usage.completion_tokens >= 1
        with pytest.raises(openai.PermissionDeniedError) as denied:
            on_b.chat.completions.create(model="other", messages=HI, max_tokens=2)
        assert denied.value.status_code == 403 and denied.value.code == "model_not_permitted"
        # The static key may use every model.
        sdk(b, API_KEY).chat.completions.create(model="other", messages=HI, max_tokens=1)

        revoked = api.delete(f"/admin/keys/{created['id']}")
        assert revoked.status_code == 200 and revoked.json()["deleted"] is True
        stopped_after = seconds_until(lambda: refused(on_b), 1.0)
    assert refused(on_a)
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        on_b.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert unauthorized.value.code == "revoked_api_key"
    assert stopped_after < 1.0
    print(f"revoked through one replica, refused by the other after {stopped_after:.3f} s")


def test_keys_made_and_revoked_by_the_cli_reach_a_running_replica(
    replicas: Replicas, tmp_path: Path, cli: Cli
) -> None:
    b = replicas.b
    config = tmp_path / "cli.toml"
    config.write_text(replica_config(replicas.database, replicas.redis))
    team = cli("teams", "create", "--name", "eng", "--rpm", "60", "--config", str(config), "--json")
    assert team.returncode == 0, team.stderr
    made = cli(
        "keys", "create", "--name", "bob", "--team", "eng", "--config", str(config), "--json"
    )
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["team"] == json.loads(team.stdout)["id"]
    client = sdk(b, created["key"])
    seconds_until(lambda: not refused(client), 1.0)
    reply = client.chat.completions.create(model="other", messages=HI, max_tokens=1)
    assert reply.choices
    listed = cli("keys", "list", "--config", str(config))
    assert created["id"] in listed.stdout and "live" in listed.stdout
    gone = cli("keys", "revoke", created["id"], "--config", str(config))
    assert gone.returncode == 0, gone.stderr
    assert seconds_until(lambda: refused(client), 1.0) < 1.0


def test_an_expired_key_gets_401(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    with admin(a) as api:
        made = api.post("/admin/keys", json={"name": "brief", "expires_at": int(time.time()) + 3})
    assert made.status_code == 201, made.text
    client = sdk(b, made.json()["key"])
    seconds_until(lambda: not refused(client), 1.0)
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    seconds_until(lambda: refused(client), 5.0)
    with pytest.raises(openai.AuthenticationError) as expired:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert expired.value.code == "expired_api_key"
