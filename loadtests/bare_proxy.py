"""The bare floor: the least a Python proxy on nomoat's stack can cost.

Litestar + msgspec, one pooled ``aiohttp.ClientSession`` to the upstream,
served exactly as ``nomoat serve`` serves itself (uvicorn, uvloop, httptools,
lifespan on, no access log, one worker: see ``gateway/cli.py``). It forwards
``POST /v1/chat/completions`` to the upstream and nothing else: no auth, no
routing, no accounting, no re-encoding. The body is decoded once with msgspec
(its ``model`` and ``stream``, as any proxy must read them) and sent on as it
came; the answer's bytes come back as they are, a stream chunk by chunk as
aiohttp reads them.

    .venv/bin/python loadtests/bare_proxy.py --upstream http://127.0.0.1:9100 --port 9200
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiohttp
import msgspec
import uvicorn
from litestar import Litestar, Request, Response, post
from litestar.response import Stream
from litestar.types import ASGIApp, Receive, Scope, Send


class _Body(msgspec.Struct):
    model: str
    stream: bool = False


_decoder = msgspec.json.Decoder(_Body)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Pump:
    """``--raw-asgi``: the answer's reads sent straight to the ASGI ``send``,
    no generator and no Litestar ``Stream`` (the least a Python relay on this
    stack can do per chunk)."""

    def __init__(self, answer: aiohttp.ClientResponse) -> None:
        self._answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = self._answer
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status,
                    "headers": [(b"content-type", b"text/event-stream"), *_RAW_HEADERS],
                }
            )
            read = answer.content.readany
            while data := await read():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            answer.release()


_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in _SSE_HEADERS.items()]


def create_app(upstream: str, raw_asgi: bool = False) -> Litestar:
    url = upstream.rstrip("/") + "/v1/chat/completions"
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=100, limit_per_host=100)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            state["session"] = session
            yield

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request) -> Response[bytes] | Stream:  # type: ignore[type-arg]
        raw = await request.body()
        try:
            body = _decoder.decode(raw)
        except msgspec.DecodeError as error:
            return Response(
                msgspec.json.encode({"error": {"message": str(error)}}),
                status_code=400,
                media_type="application/json",
            )
        session = state["session"]
        headers = {"Content-Type": "application/json"}
        if not body.stream:
            async with session.post(url, data=raw, headers=headers) as answer:
                content = await answer.read()
                return Response(
                    content,
                    status_code=answer.status,
                    media_type=answer.headers.get("Content-Type", "application/json"),
                )
        answer = await session.post(url, data=raw, headers=headers)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for data in answer.content.iter_any():
                    yield data
            finally:
                answer.release()

        return Stream(
            relay(),
            status_code=answer.status,
            media_type="text/event-stream",
            headers=_SSE_HEADERS,
        )

    @post("/v1/chat/completions", status_code=200, name="chat_raw")
    async def chat_raw(request: Request) -> ASGIApp:  # type: ignore[type-arg]
        # Streams only (what the floor measures): the body is sent on as it came.
        raw = await request.body()
        _decoder.decode(raw)
        headers = {"Content-Type": "application/json"}
        return _Pump(await state["session"].post(url, data=raw, headers=headers))

    return Litestar(
        route_handlers=[chat_raw if raw_asgi else chat],
        lifespan=[lifespan],
        openapi_config=None,
        debug=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9100")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument(
        "--raw-asgi", action="store_true", help="send a stream's reads straight to ASGI send"
    )
    args = parser.parse_args(argv)
    # The same server settings as `nomoat serve` (gateway/cli.py).
    uvicorn.run(
        create_app(args.upstream, args.raw_asgi),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
