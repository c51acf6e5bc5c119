"""Managed keys and teams on a real SQLite database (tmp_path): the store,
the in-memory cache and its poll, which models a key may use, and the admin
API and authentication through the real gateway in process. Two gateway
processes sharing PostgreSQL, with the official SDK, are in
tests/test_managed_keys.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest
from sqlalchemy import update

from gateway.accounting.access import check_name, check_route
from gateway.accounting.db import async_url, migrate, open_engine
from gateway.accounting.forms import KeyForm, TeamForm, expiry, new_key, new_team
from gateway.accounting.key_changes import change_signal
from gateway.accounting.keys import ManagedKeys, managed_keys_exist
from gateway.accounting.ledger import COLUMNS, Ledger, LedgerOptions, UsageRecord, sqlite_row
from gateway.accounting.principal import Budget, Principal, RateLimits
from gateway.accounting.sqlite_file import SqliteFile
from gateway.accounting.store import Changes, KeyStore, NewKey, NewTeam
from gateway.accounting.tables import api_keys, teams
from gateway.auth import PrincipalAuthenticator, hash_api_key
from gateway.catalog import Catalog, ModelEntry
from gateway.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from gateway.exchange import Exchange
from gateway.policies import OrderedPolicy
from gateway.routing import Route
from gateway.settings import AccountingSettings
from gateway.testing.inprocess import InProcessGateway
from tests.conftest import Cli

from .conftest import Start
from .support import config

pytestmark = pytest.mark.anyio

STATIC_KEY = "sk-static-0123456789abcdef"
ADMIN_KEY = "sk-admin-0123456789abcdef"


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty database at the schema's head, migrated once (Alembic costs
    a fast test a few hundred milliseconds): each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "accounting.db"
    migrate(async_url(f"sqlite:///{path}"))
    return path


def database(template: Path, tmp_path: Path, name: str = "accounting.db") -> str:
    copy = tmp_path / name
    shutil.copyfile(template, copy)
    return f"sqlite:///{copy}"


@pytest.fixture
async def store(template: Path, tmp_path: Path) -> AsyncIterator[KeyStore]:
    engine = open_engine(async_url(database(template, tmp_path)))
    yield KeyStore(engine)
    await engine.dispose()


# ------------------------------------------------------------ store and cache


async def test_a_created_key_is_found_by_its_hash_with_its_team(store: KeyStore) -> None:
    team = await store.create_team(NewTeam("eng", Budget(5_000_000_000, "month"), RateLimits(60)))
    record, secret = await store.create_key(
        NewKey("alice", team="eng", models=("m",), limits=RateLimits(tpm=1000))
    )
    assert secret.startswith("sk-nomoat-") and len(secret) > 40
    assert record.key_hash == hash_api_key(secret) and secret not in repr(record)
    cache = ManagedKeys(store)
    await cache.refresh()
    principal = cache.lookup(hash_api_key(secret))
    assert principal is not None and principal.managed
    assert principal.key_id == record.id and principal.name == "alice"
    assert principal.models == frozenset({"m"})
    assert principal.limits == RateLimits(tpm=1000)
    assert principal.team is not None and principal.team.id == team.id
    assert principal.team.budget == Budget(5_000_000_000, "month")
    assert principal.team.limits == RateLimits(60)
    assert cache.lookup(hash_api_key("sk-nomoat-not-a-key")) is None


async def test_a_revoked_key_is_refused_and_keys_stay_required(store: KeyStore) -> None:
    record, secret = await store.create_key(NewKey("bob"))
    cache = ManagedKeys(store)
    await cache.refresh()
    assert cache.exist and cache.lookup(hash_api_key(secret)) is not None
    revoked = await store.revoke_key(record.id)
    assert revoked.revoked_at is not None
    await cache.refresh()
    with pytest.raises(AuthenticationError) as refused:
        cache.lookup(hash_api_key(secret))
    assert refused.value.status_code == 401 and refused.value.code == "revoked_api_key"
    # The last key revoked must not open the gateway to everyone.
    assert cache.exist
    with pytest.raises(NotFoundError):
        await store.revoke_key("key_missing")


async def test_an_expired_key_is_refused(store: KeyStore) -> None:
    record, secret = await store.create_key(NewKey("carol"))
    async with store.engine.begin() as connection:
        past = datetime.now(UTC) - timedelta(seconds=1)
        await connection.execute(
            update(api_keys)
            .where(api_keys.c.id == record.id)
            .values(expires_at=past, updated_at=datetime.now(UTC))
        )
    cache = ManagedKeys(store)
    await cache.refresh()
    with pytest.raises(AuthenticationError) as refused:
        cache.lookup(hash_api_key(secret))
    assert refused.value.code == "expired_api_key"


async def test_a_revocation_elsewhere_reaches_a_polling_cache(store: KeyStore) -> None:
    record, secret = await store.create_key(NewKey("dave"))
    replica = ManagedKeys(KeyStore(store.engine), refresh_seconds=0.02)
    await replica.start()
    try:
        assert replica.lookup(hash_api_key(secret)) is not None
        await store.revoke_key(record.id)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                replica.lookup(hash_api_key(secret))
            except AuthenticationError:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the revocation did not reach the other cache within 1 s")
    finally:
        await replica.aclose()


class _CountingStore(KeyStore):
    """The real store, counting the full reads of the poll."""

    reads = 0

    async def changed_since(self, since: datetime | None) -> Changes:
        self.reads += 1
        return await super().changed_since(since)


async def test_an_idle_poll_reads_nothing_and_a_write_is_still_seen(store: KeyStore) -> None:
    """The poll asks SQLite's data_version first: no query while nothing is
    written, a write by another connection read at the next poll."""
    record, secret = await store.create_key(NewKey("idle"))
    replica_store = _CountingStore(store.engine)
    replica = ManagedKeys(replica_store, refresh_seconds=0.005)
    await replica.start()
    try:
        await asyncio.sleep(0.05)  # ten polls
        assert replica_store.reads == 1  # the start's
        await store.revoke_key(record.id)
        await _until_refused(replica, secret)
        reads = replica_store.reads
        assert reads >= 2
        await asyncio.sleep(0.05)
        assert replica_store.reads == reads
    finally:
        await replica.aclose()


async def test_the_ledgers_own_batches_make_the_poll_read_nothing(store: KeyStore) -> None:
    """The ledger writes its batches on the connection the poll reads SQLite's
    data_version on (gateway/accounting/sqlite_file.py): its commits are not
    changes of the keys (before, each batch cost a read of both tables); a
    key revoked meanwhile through another connection is still seen, and the
    rows are stored as the engine's writer stores them."""
    path = store.engine.url.database
    assert path is not None
    record, secret = await store.create_key(NewKey("busy"))
    file = SqliteFile(path)
    ledger = Ledger(store.engine, LedgerOptions(batch_size=1000, flush_seconds=60), file)
    replica_store = _CountingStore(store.engine)
    replica = ManagedKeys(replica_store, 0.005, change_signal(store.engine, file))
    await replica.start()
    records = [
        UsageRecord.of(Exchange(f"r{index}", "chat", 0.0), 200, None, now=1.0)
        for index in range(60)
    ]
    try:
        for batch in (records[:20], records[20:], records[:5]):  # the last: written already
            for item in batch:
                ledger.record(item)
            await ledger.flush()
            await asyncio.sleep(0.02)  # four polls
        assert ledger.written == 65 and replica_store.reads == 1  # the start's
        async with store.engine.connect() as connection:
            stored = await connection.exec_driver_sql(
                f"SELECT {', '.join(COLUMNS)} FROM usage ORDER BY id"
            )
            assert [tuple(r) for r in stored.all()] == [sqlite_row(r) for r in records]
        # While a batch holds the connection, the poll does not wait for it.
        with file._lock:
            assert replica.signal.changed()
        await store.revoke_key(record.id)
        await _until_refused(replica, secret)
    finally:
        await replica.aclose()
        file.close()


async def test_a_write_stamped_before_the_newest_seen_is_still_read(store: KeyStore) -> None:
    """A write that commits after a poll, stamped before the newest row that
    poll saw (a slow transaction, a replica's clock slightly behind)."""
    await store.create_key(NewKey("first"))
    cache = ManagedKeys(store)
    await cache.refresh()
    late, secret = await store.create_key(NewKey("late"))
    newest = cache._newest
    assert newest is not None
    async with store.engine.begin() as connection:
        await connection.execute(
            update(api_keys)
            .where(api_keys.c.id == late.id)
            .values(updated_at=newest - timedelta(seconds=2))
        )
    await cache.refresh()
    assert cache.lookup(hash_api_key(secret)) is not None


async def test_a_replica_whose_clock_runs_ahead_hides_no_write(store: KeyStore) -> None:
    ahead, _ = await store.create_key(NewKey("ahead"))
    async with store.engine.begin() as connection:
        await connection.execute(
            update(api_keys)
            .where(api_keys.c.id == ahead.id)
            .values(updated_at=datetime.now(UTC) + timedelta(hours=1))
        )
    cache = ManagedKeys(store)
    await cache.refresh()
    _, secret = await store.create_key(NewKey("on time"))
    await cache.refresh()
    assert cache.lookup(hash_api_key(secret)) is not None


async def test_rows_read_again_change_nothing(store: KeyStore) -> None:
    team = await store.create_team(NewTeam("t"))
    _, secret = await store.create_key(NewKey("k", team=team.id))
    cache = ManagedKeys(store)
    await cache.refresh()
    before = cache.lookup(hash_api_key(secret))
    await cache.refresh()  # the same rows, within the overlap
    assert cache.lookup(hash_api_key(secret)) is before


async def test_a_team_change_reaches_its_keys(store: KeyStore) -> None:
    team = await store.create_team(NewTeam("ops"))
    _, secret = await store.create_key(NewKey("erin", team=team.id))
    cache = ManagedKeys(store)
    await cache.refresh()
    async with store.engine.begin() as connection:
        await connection.execute(
            update(teams)
            .where(teams.c.id == team.id)
            .values(rpm=7, updated_at=datetime.now(UTC) + timedelta(milliseconds=1))
        )
    await cache.refresh()
    principal = cache.lookup(hash_api_key(secret))
    assert principal is not None and principal.team is not None
    assert principal.team.limits.rpm == 7


async def test_teams_are_deleted_only_without_live_keys_and_names_free_up(
    store: KeyStore,
) -> None:
    team = await store.create_team(NewTeam("research"))
    with pytest.raises(InvalidRequestError, match="already exists"):
        await store.create_team(NewTeam("research"))
    record, _ = await store.create_key(NewKey("frank", team="research"))
    with pytest.raises(InvalidRequestError, match="live key"):
        await store.delete_team(team.id)
    await store.revoke_key(record.id)
    await store.delete_team(team.id)
    assert await store.team(team.id) is None
    assert [t.name for t in await store.teams()] == []
    again = await store.create_team(NewTeam("research"))
    assert again.id != team.id
    with pytest.raises(NotFoundError):
        await store.delete_team(team.id)
    with pytest.raises(InvalidRequestError, match="No team"):
        await store.create_key(NewKey("gina", team="nobody"))


# ----------------------------------------------------------------- the forms


def test_forms_check_budgets_and_expiry() -> None:
    assert new_team(TeamForm(name="t", budget_usd=2.5)).budget == Budget(2_500_000_000, "total")
    with pytest.raises(InvalidRequestError, match="budget_period needs budget_usd"):
        new_key(KeyForm(name="k", budget_period="day"))
    with pytest.raises(InvalidRequestError, match="already past"):
        expiry(int(time.time()) - 10)
    naive = datetime(2099, 1, 1)
    assert expiry(naive) == datetime(2099, 1, 1, tzinfo=UTC)
    key = new_key(KeyForm(name=" k ", models=["a", "a", "b"], rpm=3))
    assert key.name == "k" and key.models == ("a", "b") and key.limits == RateLimits(3)


# ------------------------------------------------------------------ models


def _route(catalog: Catalog, asked: str) -> Route:
    return Route(asked, (catalog.resolve(asked),))


def test_a_key_may_use_its_models_under_any_of_their_names() -> None:
    entries = {name: ModelEntry(name, (), OrderedPolicy(), "nomoat") for name in ("m", "n")}
    catalog = Catalog(entries, {"m-alias": "m", "other": "m"})
    by_alias = Principal("k", models=frozenset({"m-alias"}))
    by_name = Principal("k", models=frozenset({"m"}))
    for principal in (by_alias, by_name):
        for asked in ("m", "m-alias", "other"):
            check_name(principal, catalog, asked)
            check_route(principal, catalog, _route(catalog, asked))
        with pytest.raises(PermissionDeniedError) as denied:
            check_route(principal, catalog, _route(catalog, "n"))
        assert denied.value.status_code == 403 and denied.value.param == "model"
        with pytest.raises(PermissionDeniedError):
            check_name(principal, catalog, "n")
    # Unlisted names (adapters, names a hook rewrites) wait for the route.
    check_name(by_name, catalog, "some-adapter")
    check_route(Principal("static"), catalog, _route(catalog, "n"))
    check_route(None, catalog, _route(catalog, "n"))


# --------------------------------------------------------- authentication


class _Scope:
    def __init__(self, key: str | None) -> None:
        headers = [] if key is None else [(b"authorization", f"Bearer {key}".encode())]
        self.scope = {"headers": headers}


async def test_static_and_managed_keys_authenticate_as_principals(store: KeyStore) -> None:
    cache = ManagedKeys(store)
    await cache.refresh()
    static = hash_api_key(STATIC_KEY)
    authenticate = PrincipalAuthenticator((static,), lambda: cache)
    found = authenticate.principal(_Scope(STATIC_KEY))  # type: ignore[arg-type]
    assert found == Principal(static.removeprefix("sha256:")[:12])
    record, secret = await store.create_key(NewKey("hana"))
    await cache.refresh()
    assert authenticate(_Scope(secret)) == record.id  # type: ignore[arg-type]
    for wrong in (None, "sk-wrong-0123456789"):
        with pytest.raises(AuthenticationError):
            authenticate.principal(_Scope(wrong))  # type: ignore[arg-type]


async def test_managed_keys_close_an_open_gateway(store: KeyStore) -> None:
    cache = ManagedKeys(store)
    await cache.refresh()
    authenticate = PrincipalAuthenticator((), lambda: cache)
    assert authenticate.principal(_Scope(None)) is None  # type: ignore[arg-type]
    await store.create_key(NewKey("ivan"))
    await cache.refresh()
    with pytest.raises(AuthenticationError):
        authenticate.principal(_Scope(None))  # type: ignore[arg-type]


# ------------------------------------------------------- the gateway in process


def _gateway(template: Path, tmp_path: Path, hooks: Sequence[Mapping[str, object]] = ()) -> str:
    return config(
        {"a": {}},
        {
            "m": {"deployments": [{"backend": "a"}], "aliases": ["m-alias"]},
            "n": {"deployments": [{"backend": "a"}]},
        },
        server={
            "api_key_hashes": [hash_api_key(STATIC_KEY)],
            "admin_key_hashes": [hash_api_key(ADMIN_KEY)],
        },
        hooks=hooks,
    ) + (
        f'\n[accounting]\ndatabase = "{database(template, tmp_path, "gw.db")}"\n'
        "migrate_on_start = false\nkey_refresh_seconds = 0.02\n"
    )


def _sdk(gw: InProcessGateway, key: str) -> openai.AsyncOpenAI:
    return gw.sdk.with_options(api_key=key)


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_admin_api_keys_and_their_use(start: Start, template: Path, tmp_path: Path) -> None:
    async with start(_gateway(template, tmp_path)) as gw:
        closed: list[Exchange] = []
        close = gw.runtime.observer.close

        def spy(exchange: Exchange, status: int, error: str | None) -> None:
            closed.append(exchange)
            close(exchange, status, error)

        gw.runtime.observer.close = spy  # type: ignore[method-assign]
        team = await gw.http.post("/admin/teams", json={"name": "eng"}, headers=_admin())
        assert team.status_code == 201, team.text
        team_id = team.json()["id"]
        made = await gw.http.post(
            "/admin/keys",
            json={"name": "alice", "team": "eng", "models": ["m"], "rpm": 5},
            headers=_admin(),
        )
        assert made.status_code == 201, made.text
        created = made.json()
        key, key_id = created["key"], created["id"]
        assert created["team"] == team_id and created["models"] == ["m"]
        shown = (await gw.http.get(f"/admin/keys/{key_id}", headers=_admin())).json()
        assert "key" not in shown and shown["name"] == "alice" and shown["revoked_at"] is None
        listed = (await gw.http.get("/admin/keys", headers=_admin())).json()
        assert [k["id"] for k in listed["data"]] == [key_id]

        sdk = _sdk(gw, key)
        for model in ("m", "m-alias"):
            reply = await sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
        ctx = gw.backend("a").calls[-1].ctx
        assert ctx.principal is not None and ctx.principal.key_id == key_id
        assert ctx.api_key_id == key_id and ctx.principal.team is not None
        assert closed[-1].key_id == key_id and closed[-1].team_id == team_id
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await sdk.chat.completions.create(
                model="n", messages=[{"role": "user", "content": "hi"}]
            )
        assert denied.value.code == "model_not_permitted"
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.completions.create(model="n", prompt="hi", stream=True)
        assert closed[-1].key_id == key_id and closed[-1].team_id == team_id

        # The static key still works, for every model; it may not manage keys.
        static = _sdk(gw, STATIC_KEY)
        await static.chat.completions.create(
            model="n", messages=[{"role": "user", "content": "hi"}]
        )
        forbidden = await gw.http.get(
            "/admin/keys", headers={"Authorization": f"Bearer {STATIC_KEY}"}
        )
        assert forbidden.status_code == 403

        gone = await gw.http.delete(f"/admin/keys/{key_id}", headers=_admin())
        assert gone.json() == {"id": key_id, "object": "api_key", "deleted": True}
        with pytest.raises(openai.AuthenticationError) as refused:
            await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        assert refused.value.code == "revoked_api_key"
        assert (await gw.http.get(f"/admin/keys/{key_id}", headers=_admin())).json()["revoked_at"]
        deleted = await gw.http.delete(f"/admin/teams/{team_id}", headers=_admin())
        assert deleted.json()["deleted"] is True
        assert (await gw.http.get("/admin/teams", headers=_admin())).json()["data"] == []


ADMIN_ERRORS: list[tuple[str, object, int, str]] = [
    ("/admin/keys", {"name": ""}, 400, "name"),
    ("/admin/keys", {"name": "k", "rpm": 0}, 400, "rpm"),
    ("/admin/keys", {"name": "k", "budget_period": "week"}, 400, "budget_period"),
    ("/admin/keys", {"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, 400, "past"),
    ("/admin/keys", {"name": "k", "team": "none"}, 400, "No team"),
    ("/admin/keys", {"name": "k", "colour": "red"}, 400, "colour"),
    ("/admin/teams", {"name": "t", "budget_usd": -1}, 400, "budget_usd"),
    ("/admin/keys/key_nope", None, 404, "No API key"),
    ("/admin/teams/team_nope", None, 404, "No team"),
]


async def test_admin_errors_are_openai_shaped(start: Start, template: Path, tmp_path: Path) -> None:
    async with start(_gateway(template, tmp_path)) as gw:
        for path, body, status, needle in ADMIN_ERRORS:
            if body is None:
                response = await gw.http.get(path, headers=_admin())
            else:
                response = await gw.http.post(path, json=body, headers=_admin())
            assert response.status_code == status, (path, body)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert needle in error["message"], (path, body)


async def test_admin_keys_need_accounting(start: Start) -> None:
    text = config({"a": {}}, {"m": {"deployments": [{"backend": "a"}]}})
    async with start(text + "\n[accounting]\nenabled = false\n") as gw:
        response = await gw.http.get("/admin/keys")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "accounting_disabled"


async def _key_for(gw: InProcessGateway, models: list[str]) -> str:
    made = await gw.http.post(
        "/admin/keys", json={"name": "limited", "models": models}, headers=_admin()
    )
    assert made.status_code == 201, made.text
    key: str = made.json()["key"]
    return key


async def test_a_hook_answering_early_answers_only_models_the_key_may_use(
    start: Start, template: Path, tmp_path: Path
) -> None:
    async with start(_gateway(template, tmp_path, [{"type": "answer-early"}])) as gw:
        sdk = _sdk(gw, await _key_for(gw, ["m"]))
        reply = await sdk.completions.create(model="m-alias", prompt="hi")
        assert reply.choices[0].text == "from the cache"
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.completions.create(model="n", prompt="hi")


async def test_the_model_a_hook_routes_to_is_checked(
    start: Start, template: Path, tmp_path: Path
) -> None:
    hooks = [{"type": "rename", "options": {"model": "n"}}]
    async with start(_gateway(template, tmp_path, hooks)) as gw:
        sdk = _sdk(gw, await _key_for(gw, ["m"]))
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        assert gw.backend("a").calls == []


async def test_a_key_lists_only_the_models_it_may_use(
    start: Start, template: Path, tmp_path: Path
) -> None:
    async with start(_gateway(template, tmp_path)) as gw:
        key = await _key_for(gw, ["m-alias"])
        limited, static = _sdk(gw, key), _sdk(gw, STATIC_KEY)
        assert [m.id async for m in limited.models.list()] == ["m"]
        assert {m.id async for m in static.models.list()} == {"m", "n"}
        assert (await limited.models.retrieve("m")).id == "m"
        with pytest.raises(openai.NotFoundError):
            await limited.models.retrieve("n")
        # A managed key is known, but is no admin key.
        refused = await gw.http.get("/admin/keys", headers={"Authorization": f"Bearer {key}"})
        assert refused.status_code == 403


async def test_the_first_managed_key_closes_an_open_gateway(
    start: Start, template: Path, tmp_path: Path
) -> None:
    text = config({"a": {}}, {"m": {"deployments": [{"backend": "a"}]}})
    text += f'\n[accounting]\ndatabase = "{database(template, tmp_path)}"\n'
    text += "migrate_on_start = false\n"
    async with start(text) as gw:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert (await gw.http.post("/v1/chat/completions", json=body)).status_code == 200
        made = await gw.http.post("/admin/keys", json={"name": "first"})
        assert made.status_code == 201
        key = made.json()["key"]
        assert (await gw.http.post("/v1/chat/completions", json=body)).status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        answered = await gw.http.post("/v1/chat/completions", json=body, headers=auth)
        assert answered.status_code == 200
        # Else anyone on loopback could mint a key: `nomoat keys` remains.
        closed = await gw.http.post("/admin/keys", json={"name": "second"})
        assert closed.status_code == 403
        assert "admin_key_hashes" in closed.json()["error"]["message"]


def test_managed_keys_count_as_keys_for_a_network_listener(
    template: Path, tmp_path: Path, cli: Cli
) -> None:
    url = f"sqlite:///{tmp_path / 'network.db'}"
    settings = AccountingSettings(database=url)
    assert not managed_keys_exist(settings)
    assert not (tmp_path / "network.db").exists()  # looking made no database
    url = database(template, tmp_path, "network.db")
    config_file = tmp_path / "c.toml"
    config_file.write_text(f'[accounting]\ndatabase = "{url}"\nmigrate_on_start = false\n')
    made = cli("keys", "create", "--name", "ops", "--config", str(config_file))
    assert made.returncode == 0, made.stderr
    assert "only time the key is shown" in made.stdout
    assert managed_keys_exist(settings)
    assert not managed_keys_exist(AccountingSettings(enabled=False, database=url))
    listed = cli("keys", "list", "--config", str(config_file), "--json")
    assert [key["name"] for key in json.loads(listed.stdout)] == ["ops"]
    wrong = cli("keys", "create", "--name", "x", "--rpm", "0", "--config", str(config_file))
    assert wrong.returncode == 2 and "rpm" in wrong.stderr
    missing = cli("keys", "revoke", "key_nope", "--config", str(config_file))
    assert missing.returncode == 1 and "No API key" in missing.stderr
    # Teams as keys: made, listed (JSON and table), refused, removed.
    conf = ("--config", str(config_file))
    team = json.loads(cli("teams", "create", "--name", "eng", *conf, "--json").stdout)
    assert cli("teams", "list", *conf).stdout.splitlines()[1].split()[:2] == [team["id"], "eng"]
    wrong_team = cli("teams", "create", "--name", "x", "--rpm", "0", *conf)
    assert wrong_team.returncode == 2 and wrong_team.stderr.startswith("nomoat teams create:")
    ops = json.loads(listed.stdout)[0]["id"]
    assert cli("keys", "list", *conf).stdout.splitlines()[1].split()[:2] == [ops, "ops"]
    assert cli("keys", "revoke", ops, *conf).stdout == f"revoked {ops} (ops)\n"
    assert cli("teams", "delete", team["id"], *conf).stdout == f"deleted {team['id']} (eng)\n"
    assert json.loads(cli("teams", "list", *conf, "--json").stdout) == []


async def _until_refused(replica: ManagedKeys, secret: str) -> None:
    """Polls until ``replica`` refuses ``secret`` (revoked elsewhere), at most 1 s."""
    for _ in range(200):
        try:
            replica.lookup(hash_api_key(secret))
        except AuthenticationError:
            return
        await asyncio.sleep(0.005)
    pytest.fail("the revocation did not reach the polling cache within 1 s")
