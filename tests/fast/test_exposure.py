"""Who can reach what: /metrics behind a key when the operator asks, and an
admin API that opening the gateway to a network does not open with it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gateway.auth import hash_api_key
from gateway.settings import ConfigError
from gateway.testing.inprocess import InProcessGateway, settings_from_toml

from .conftest import Start
from .support import chat_body, error_of, pool

pytestmark = pytest.mark.anyio

KEY = "sk-in-process-test"
ADMIN_KEY = "sk-in-process-admin-0123456789"
NO_KEY = {"Authorization": ""}
OPEN_NETWORK = {"host": "0.0.0.0", "allow_unauthenticated_network": True}


@contextmanager
def warnings_of(name: str) -> Iterator[list[str]]:
    """Warnings logged to ``name``, caught on that logger itself (Litestar's
    logging set-up replaces the root logger's handlers, pytest's with them)."""
    lines: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(name)
    catch = Catch(logging.WARNING)
    logger.addHandler(catch)
    try:
        yield lines
    finally:
        logger.removeHandler(catch)


async def test_metrics_are_open_by_default(start: Start) -> None:
    async with start(pool("a", server={"api_key_hashes": [hash_api_key(KEY)]})) as gw:
        answer = await gw.http.get("/metrics", headers=NO_KEY)
    assert answer.status_code == 200
    assert "nomoat_" in answer.text


async def test_metrics_can_require_a_key(start: Start) -> None:
    server = {
        "api_key_hashes": [hash_api_key(KEY)],
        "admin_key_hashes": [hash_api_key(ADMIN_KEY)],
        "metrics_requires_key": True,
    }
    async with start(pool("a", server=server)) as gw:
        refused = await gw.http.get("/metrics", headers=NO_KEY)
        assert error_of(refused, 401)["type"] == "invalid_request_error"
        wrong = await gw.http.get("/metrics", headers={"Authorization": "Bearer sk-wrong-key-000"})
        assert error_of(wrong, 401)["code"] == "invalid_api_key"
        for key in (KEY, ADMIN_KEY):
            answer = await gw.http.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/plain")


def test_metrics_requires_key_without_any_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as refused:
        settings_from_toml("[server]\nmetrics_requires_key = true\n")
    assert "server: Value error, metrics_requires_key needs a key" in str(refused.value)


async def test_an_open_network_gateway_keeps_its_admin_api_closed_and_says_so(
    start: Start,
) -> None:
    with warnings_of("gateway.app") as logged:
        async with start(pool("a", server=OPEN_NETWORK)) as gw:
            # The models are open, as asked...
            answer = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=NO_KEY)
            assert answer.status_code == 200
            # ...the admin API is not.
            explain = await gw.http.post("/admin/route/explain", json={"model": "m"})
            error = error_of(explain, 403)
            assert "server.admin_key_hashes" in error["message"]
            listing = await gw.http.get("/admin/adapters", headers=NO_KEY)
            error_of(listing, 403)
    assert any("listening on 0.0.0.0 with no API key" in line for line in logged)
    assert any("admin API (/admin/...) is closed" in line for line in logged)


async def test_an_admin_key_opens_it_on_the_network(start: Start) -> None:
    server = {**OPEN_NETWORK, "admin_key_hashes": [hash_api_key(ADMIN_KEY)]}
    with warnings_of("gateway.app") as logged:
        async with start(pool("a", server=server)) as gw:
            await admin_calls(gw)
    # The models are still open to the network: said; the admin API is not closed.
    assert [line for line in logged if "with no API key" in line]
    assert not [line for line in logged if "admin API" in line]


async def admin_calls(gw: InProcessGateway) -> None:
    """An admin key is let in; none is a 401."""
    explain = await gw.http.post(
        "/admin/route/explain",
        json={"model": "m"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert explain.status_code == 200, explain.text
    refused = await gw.http.post("/admin/route/explain", json={"model": "m"}, headers=NO_KEY)
    error_of(refused, 401)


async def test_on_loopback_without_keys_the_admin_api_stays_open(
    start: Start,
) -> None:
    with warnings_of("gateway.app") as logged:
        async with start(pool("a")) as gw:
            explain = await gw.http.post("/admin/route/explain", json={"model": "m"})
            assert explain.status_code == 200, explain.text
    assert not [line for line in logged if "admin API" in line]
