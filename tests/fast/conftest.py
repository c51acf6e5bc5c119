"""The fast layer: the real gateway in process, fake backends, no engine and
no server. Each test starts its own gateway from a TOML string (a few ms)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from gateway.registry import Registry, discover
from gateway.testing.inprocess import InProcessGateway, in_process_gateway, registry_with

from .plugins import manifest as test_plugins

Start = Callable[[str], AbstractAsyncContextManager[InProcessGateway]]
HERE = Path(__file__).parent
# A fast test that hangs fails in seconds, not at the global 300 s.
FAST_TIMEOUT_SECONDS = 20


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_SECONDS))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The installed plugins, the fake backend and the test plugins, found once."""
    return registry_with([test_plugins], discover())


@pytest.fixture
def start(registry: Registry) -> Start:
    """``async with start(CONFIG) as gw:`` runs the gateway CONFIG describes."""

    @asynccontextmanager
    async def run(config_text: str) -> AsyncIterator[InProcessGateway]:
        async with in_process_gateway(config_text, registry=registry) as gw:
            yield gw

    return run
