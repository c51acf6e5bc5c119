"""The real gateway in process: no server, no engine, one event loop.

:func:`in_process_gateway` builds the application exactly as ``nomoat serve``
does (settings from TOML, plugins discovered, the plan, the runtime and its
lifespan) and gives an ``httpx.AsyncClient`` and an ``openai.AsyncOpenAI``
wired to it through :class:`ASGIStreamTransport`::

    async with in_process_gateway(CONFIG) as gw:
        reply = await gw.sdk.chat.completions.create(model="m", messages=[...])
        assert gw.backend("a").calls[0].target.deployment == "m/0"

The transport, unlike Litestar's ``AsyncTestClient`` (which buffers a whole
response, on a loop in another thread), runs the app on the test's own loop
and hands the body over as it is sent: a test can read the first event of a
stream while the backend stalls, and leaving a response early (closing it,
or cancelling the request) tells the app the client disconnected, as a real
server does.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import gc
import os
import shutil
import tempfile
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
from litestar.types import ASGIApp, Receive, Scope, Send
from pydantic import ValidationError

from gateway.accounting.db import DATABASE_FILE, async_url, migrate
from gateway.app import Runtime, create_app, handle_exception
from gateway.catalog import plan
from gateway.contract import PluginManifest
from gateway.direct_routes import DirectRoutes
from gateway.registry import Registry, build_registry, discover
from gateway.settings import ConfigError, Settings, validation_problems
from gateway.telemetry.spans import Tracing
from gateway.testing.fake import FakeBackend
from gateway.testing.fake import manifest as fake_manifest

if TYPE_CHECKING:
    import openai

__all__ = [
    "ASGIStreamTransport",
    "InProcessGateway",
    "in_process_gateway",
    "lifespan",
    "registry_with",
    "settings_from_toml",
]

BASE_URL = "http://nomoat.test"
# An ASGI message, as this module builds and reads them (Litestar's TypedDicts
# are a union too wide to build one from).
Message = dict[str, Any]
# How long a closed response waits for the app to finish before giving up on it.
SETTLE_SECONDS = 5.0
# How long closing the client waits for unfinished calls before cancelling them.
CLOSE_GRACE_SECONDS = 0.2


class ASGIStreamTransport(httpx.AsyncBaseTransport):
    """Calls an ASGI app in this event loop and streams its answer back.

    A response closed before its end, or a request cancelled before its
    answer, makes the app's ``receive()`` return ``http.disconnect``.
    :meth:`aclose` lets the app calls still running end (or cancels them).
    """

    def __init__(self, app: ASGIApp, client: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        self._app = app
        self._client = client
        self._running: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        exchange = _Exchange(body)
        task = asyncio.get_running_loop().create_task(
            _call(self._app, _scope(request, self._client), exchange.receive, exchange.send)
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(exchange.app_done)
        try:
            start = await exchange.started
        except BaseException:
            exchange.disconnect()
            raise
        headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
        return httpx.Response(
            int(start["status"]),
            headers=headers,
            stream=_Body(exchange, task),
            request=request,
        )

    async def aclose(self) -> None:
        """Let the app calls still running end; cancel those that will not
        (a test that failed half-way may leave a backend stalled)."""
        if not self._running:
            return
        _, pending = await asyncio.wait(set(self._running), timeout=CLOSE_GRACE_SECONDS)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=SETTLE_SECONDS)


async def _call(
    app: ASGIApp,
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    await app(scope, cast("Receive", receive), cast("Send", send))


class _Exchange:
    """One request's ASGI messages, both ways."""

    def __init__(self, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._body: bytes | None = body
        self._disconnected = asyncio.Event()
        self.started: asyncio.Future[Message] = loop.create_future()
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started.set_result(message)
        elif message["type"] == "http.response.body":
            self.chunks.put_nowait(message.get("body", b""))
            if not message.get("more_body", False):
                self.chunks.put_nowait(None)

    def disconnect(self) -> None:
        self._disconnected.set()

    def app_done(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if not self.started.done():
            self.started.set_exception(error or RuntimeError("the app sent no response"))
        # Whatever the app did, whoever reads the body stops waiting.
        self.chunks.put_nowait(None)


class _Body(httpx.AsyncByteStream):
    def __init__(self, exchange: _Exchange, task: asyncio.Task[None]) -> None:
        self._exchange = exchange
        self._task = task
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._exchange.chunks.get()) is not None:
            if chunk:
                yield chunk
        self._complete = True

    async def aclose(self) -> None:
        if not self._complete:
            # The client leaves before the end: the app hears a disconnect.
            self._exchange.disconnect()
        await asyncio.wait({self._task}, timeout=SETTLE_SECONDS)


def _scope(request: httpx.Request, client: tuple[str, int]) -> Scope:
    url = request.url
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": url.scheme,
        "path": url.path,
        "raw_path": url.raw_path.split(b"?", 1)[0],
        "query_string": url.query,
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.headers.raw],
        "client": client,
        "server": (url.host, url.port or 80),
        "extensions": {},
        "state": {},
    }
    return scope  # type: ignore[return-value]


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's lifespan (start-up before, shutdown after the block)."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    replies: asyncio.Queue[Message] = asyncio.Queue()
    inbox.put_nowait({"type": "lifespan.startup"})
    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    async def send(message: Message) -> None:
        replies.put_nowait(message)

    task = asyncio.get_running_loop().create_task(_call(app, cast("Scope", scope), inbox.get, send))
    try:
        await _expect(replies, task, "lifespan.startup.complete")
        yield
    finally:
        if not task.done():
            inbox.put_nowait({"type": "lifespan.shutdown"})
            await _expect(replies, task, "lifespan.shutdown.complete")
            await task


async def _expect(replies: asyncio.Queue[Message], task: asyncio.Task[None], kind: str) -> None:
    reply = asyncio.ensure_future(replies.get())
    done, _ = await asyncio.wait({reply, task}, return_when=asyncio.FIRST_COMPLETED)
    if reply not in done:
        reply.cancel()
        task.result()  # the app's own error, if it raised one
        raise RuntimeError(f"the app's lifespan ended without {kind}")
    message = reply.result()
    if message["type"] != kind:
        raise RuntimeError(f"lifespan: {message.get('message') or message['type']}")


def settings_from_toml(text: str) -> Settings:
    """Phase one of validation, on TOML text instead of a file."""
    try:
        return Settings(**tomllib.loads(text))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"not valid TOML: {error}"]) from error
    except ValidationError as error:
        raise ConfigError(validation_problems(error)) from error


def registry_with(
    manifests: Iterable[PluginManifest] = (), base: Registry | None = None
) -> Registry:
    """The installed plugins (or ``base``), the fake backend, and ``manifests``;
    a manifest already there is not added twice."""
    installed = base if base is not None else discover()
    chosen: list[PluginManifest] = []
    for manifest in (*installed.plugins, fake_manifest, *manifests):
        if all(manifest is not known for known in chosen):
            chosen.append(manifest)
    return build_registry(chosen)


@dataclass(frozen=True, slots=True)
class InProcessGateway:
    runtime: Runtime
    # Raw HTTP to the app (base URL without /v1), and the official SDK.
    http: httpx.AsyncClient
    sdk: openai.AsyncOpenAI

    def backend(self, name: str) -> FakeBackend:
        """The fake backend ``[backends.NAME]`` started as."""
        backend = self.runtime.backends[name]
        if not isinstance(backend, FakeBackend):
            raise TypeError(f"backend {name!r} is a {type(backend).__name__}, not a FakeBackend")
        return backend

    @property
    def fakes(self) -> Mapping[str, FakeBackend]:
        return {
            name: backend
            for name, backend in self.runtime.backends.items()
            if isinstance(backend, FakeBackend)
        }


async def with_private_ledger(settings: Settings, stack: AsyncExitStack) -> Settings:
    """``settings`` with the default accounting database (the user's data
    directory) replaced by one in a temporary directory the stack removes:
    a copy of a database migrated once per process (migrating each one
    would cost every in-process test tens of milliseconds)."""
    accounting = settings.accounting
    if not accounting.enabled or accounting.database:
        return settings
    directory = Path(
        stack.enter_context(tempfile.TemporaryDirectory(prefix="nomoat-ledger-", dir=MEMORY_DIR))
    )
    database = directory / DATABASE_FILE
    shutil.copyfile(await asyncio.to_thread(_migrated_database), database)
    private = accounting.model_copy(
        update={"database": f"sqlite:///{database}", "migrate_on_start": False}
    )
    return settings.model_copy(update={"accounting": private})


# A file system in memory where there is one: SQLite's fsyncs at each
# gateway's last write cost a test tens of milliseconds on a disk.
MEMORY_DIR = "/dev/shm" if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None


@functools.cache
def _migrated_database() -> Path:
    """An empty accounting database at the schema's head, made once per process."""
    directory = Path(tempfile.mkdtemp(prefix="nomoat-ledger-template-", dir=MEMORY_DIR))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / DATABASE_FILE
    migrate(async_url(f"sqlite:///{path}"))
    return path


@asynccontextmanager
async def in_process_gateway(
    config_text: str,
    *,
    manifests: Iterable[PluginManifest] = (),
    registry: Registry | None = None,
    api_key: str = "sk-in-process-test",
    tracing: Tracing | None = None,
) -> AsyncIterator[InProcessGateway]:
    """The gateway ``config_text`` describes, started in this event loop.

    ``registry`` replaces plugin discovery (pass one built once per session
    to save the entry-point scan); the fake backend and ``manifests`` are
    added to it. Both clients send ``api_key`` (ignored if the config has no
    keys) and never retry. ``tracing``: trace with it (e.g. a tracer
    provider with the SDK's in-memory exporter).
    """
    import openai  # a test dependency, not the gateway's

    settings = settings_from_toml(config_text)
    async with AsyncExitStack() as stack:
        settings = await with_private_ledger(settings, stack)
        runtime = Runtime(
            settings, plan(settings, registry_with(manifests, registry)), tracing=tracing
        )
        app = create_app(runtime)
        await stack.enter_async_context(lifespan(app))
        # The app froze everything it started with (fine for a server that
        # lives long, not for one test among hundreds): collectable again.
        stack.callback(gc.unfreeze)
        # As `nomoat serve` serves it (gateway/direct_routes.py).
        transport = ASGIStreamTransport(DirectRoutes(app, handle_exception))
        headers = {"Authorization": f"Bearer {api_key}"}
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url=BASE_URL, headers=headers)
        )
        sdk = openai.AsyncOpenAI(
            base_url=f"{BASE_URL}/v1",
            api_key=api_key,
            # openai accepts an httpx client as well as its own httpx2 one
            # (checked at run time); its annotation names only httpx2.
            http_client=http,  # type: ignore[arg-type]
            max_retries=0,
        )
        yield InProcessGateway(runtime, http, sdk)
