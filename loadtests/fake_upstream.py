"""A fast fake OpenAI-compatible upstream, for measuring what a gateway adds.

A raw asyncio ``Protocol`` (on uvloop when it is installed), no framework: one
process serves well over 10,000 requests/s on one core, so whatever sits in
front of it is what a benchmark measures. It answers like vLLM does:

  POST /v1/chat/completions   a canned answer with a ``usage`` object; with
                              ``"stream": true``, server-sent events (a role
                              chunk, content chunks, a finish chunk, a usage
                              chunk when ``stream_options.include_usage``,
                              ``data: [DONE]``), chunked transfer encoding
  POST /v1/completions        the same, as text completions
  GET  /v1/models             the model names it was given
  GET  /health                200
  GET  /metrics               vLLM's load gauges (``vllm:num_requests_running 0``...)

Streams of a model whose name contains ``slow`` (``--slow-marker``) wait
``--chunk-delay-ms`` before each chunk after the first, so a benchmark can
check that a gateway relays each chunk as it arrives; any other model streams
all its chunks in one write. The request body is never validated beyond finding
``model``, ``stream`` and ``include_usage``: it is not what is being measured.

    .venv/bin/python loadtests/fake_upstream.py --port 9100 --port 9101

HTTP/1.1 keep-alive (and 1.0), ``Content-Length`` or chunked request bodies.
Prints ``fake upstream listening on PORT ...`` once every port is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from gateway.listener import Listener
from gateway.workers import listening_socket

MODELS = ("fake-model", "fake-slow-model")
CONTENT = ("Hello", " from", " the", " fake", " upstream", ".")
_MODEL = re.compile(rb'"model"\s*:\s*"([^"]*)"')
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_USAGE = re.compile(rb'"include_usage"\s*:\s*true')


@dataclass(frozen=True)
class Options:
    chunks: int = len(CONTENT)
    chunk_delay: float = 0.02
    slow_marker: bytes = b"slow"
    models: tuple[str, ...] = MODELS


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _usage(chunks: int) -> dict[str, int]:
    return {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}


class Canned:
    """Every answer, encoded once at start-up."""

    def __init__(self, options: Options) -> None:
        self.options = options
        created = int(time.time())
        text = "".join(CONTENT[i % len(CONTENT)] for i in range(options.chunks))
        self.chat = _response(
            "200 OK",
            _dump(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": "fake-model",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _usage(options.chunks),
                }
            ),
        )
        self.completion = _response(
            "200 OK",
            _dump(
                {
                    "id": "cmpl-fake",
                    "object": "text_completion",
                    "created": created,
                    "model": "fake-model",
                    "choices": [
                        {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
                    ],
                    "usage": _usage(options.chunks),
                }
            ),
        )
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        self.chat_events = self._chat_events(created)
        self.completion_events = self._completion_events(created)
        self.models = _response(
            "200 OK",
            _dump(
                {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": created, "owned_by": "fake"}
                        for m in options.models
                    ],
                }
            ),
        )
        self.health = _response("200 OK", b"{}")
        self.metrics = _response(
            "200 OK",
            b"# HELP vllm:num_requests_running Requests running.\n"
            b"# TYPE vllm:num_requests_running gauge\n"
            b'vllm:num_requests_running{model_name="fake-model"} 0.0\n'
            b"# HELP vllm:num_requests_waiting Requests waiting.\n"
            b"# TYPE vllm:num_requests_waiting gauge\n"
            b'vllm:num_requests_waiting{model_name="fake-model"} 0.0\n'
            b"# HELP vllm:kv_cache_usage_perc KV-cache usage.\n"
            b"# TYPE vllm:kv_cache_usage_perc gauge\n"
            b'vllm:kv_cache_usage_perc{model_name="fake-model"} 0.0\n',
            b"text/plain; version=0.0.4",
        )
        self.not_found = _response("404 Not Found", b'{"error":{"message":"not found"}}')
        self.bad_request = _response("400 Bad Request", b'{"error":{"message":"bad request"}}')

    def _chat_events(self, created: int) -> tuple[list[bytes], bytes]:
        """The events (framed as HTTP chunks), and the usage event."""

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, object]:
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": "fake-model",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        count = self.options.chunks
        events = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": CONTENT[i % len(CONTENT)]}, None) for i in range(count)]
        events.append(chunk({}, "stop"))
        usage = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": created,
            "model": "fake-model",
            "choices": [],
            "usage": _usage(count),
        }
        return [_event(e) for e in events], _event(usage)

    def _completion_events(self, created: int) -> tuple[list[bytes], bytes]:
        def chunk(text: str, finish: str | None) -> dict[str, object]:
            return {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": created,
                "model": "fake-model",
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        count = self.options.chunks
        events = [chunk(CONTENT[i % len(CONTENT)], None) for i in range(count)]
        events.append(chunk("", "stop"))
        usage = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": created,
            "model": "fake-model",
            "choices": [],
            "usage": _usage(count),
        }
        return [_event(e) for e in events], _event(usage)


def _event(payload: object) -> bytes:
    return _http_chunk(b"data: " + _dump(payload) + b"\n\n")


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


DONE = _http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class FakeUpstream(asyncio.Protocol):
    """One connection: requests answered in order, one at a time."""

    def __init__(self, canned: Canned) -> None:
        self._canned = canned
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._busy = False  # a delayed stream is being written
        self._lost = False  # the client went away
        self._closing = False  # close once the current answer is written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True

    def data_received(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        if not self._busy:
            self._serve()

    def _serve(self) -> None:
        transport = self._transport
        assert transport is not None
        while not self._busy and not self._closing and not self._lost:
            request = _parse(self._buffer)
            if request is None:
                return
            if request is _BAD:
                transport.write(self._canned.bad_request)
                transport.close()
                return
            method, path, body, keep_alive, consumed = request
            self._buffer = self._buffer[consumed:]
            self._answer(method, path, body)
            if not keep_alive:
                self._closing = True
                if not self._busy:
                    transport.close()
                return

    def _answer(self, method: bytes, path: bytes, body: bytes) -> None:
        transport = self._transport
        assert transport is not None
        canned = self._canned
        path = path.split(b"?", 1)[0]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            if _STREAM.search(body):
                self._stream(body, canned.chat_events)
            else:
                transport.write(canned.chat)
        elif method == b"POST" and path.endswith(b"/completions"):
            if _STREAM.search(body):
                self._stream(body, canned.completion_events)
            else:
                transport.write(canned.completion)
        elif method == b"GET" and path in (b"/health", b"/v1/health"):
            transport.write(canned.health)
        elif method == b"GET" and path in (b"/metrics", b"/v1/metrics"):
            transport.write(canned.metrics)
        elif method == b"GET" and path in (b"/v1/models", b"/models"):
            transport.write(canned.models)
        else:
            transport.write(canned.not_found)

    def _stream(self, body: bytes, events: tuple[list[bytes], bytes]) -> None:
        transport = self._transport
        assert transport is not None
        chunks, usage = events
        tail = [usage, DONE] if _USAGE.search(body) else [DONE]
        match = _MODEL.search(body)
        slow = match is not None and self._canned.options.slow_marker in match.group(1)
        if not slow:
            transport.write(b"".join([self._canned.stream_head, *chunks, *tail]))
            return
        # The head and the first event at once; each later chunk after a delay
        # (the usage event and [DONE] follow the finish chunk at once).
        parts = [self._canned.stream_head + chunks[0], *chunks[1:-1], chunks[-1] + b"".join(tail)]
        self._busy = True
        loop = asyncio.get_running_loop()
        delay = self._canned.options.chunk_delay
        transport.write(parts[0])
        remaining = iter(parts[1:])

        def next_part() -> None:
            if self._lost:
                return
            part = next(remaining, None)
            if part is None:
                self._busy = False
                if self._closing:
                    transport.close()
                elif self._buffer:
                    self._serve()
                return
            transport.write(part)
            loop.call_later(delay, next_part)

        loop.call_later(delay, next_part)


_BAD = (b"", b"", b"", False, 0)
_Request = tuple[bytes, bytes, bytes, bool, int]


def _parse(buffer: bytes) -> _Request | None:
    """One complete request at the start of ``buffer``, or None (need more)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return _BAD if len(buffer) > 65536 else None
    head = buffer[:end]
    line_end = head.find(b"\r\n")
    request_line = head if line_end < 0 else head[:line_end]
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return _BAD
    method, path, version = parts
    lower = head.lower()
    start = end + 4
    keep_alive = version == b"HTTP/1.1"
    if b"\r\nconnection:" in lower:
        value = lower.split(b"\r\nconnection:", 1)[1].split(b"\r\n", 1)[0].strip()
        keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
    if (
        b"\r\ntransfer-encoding:" in lower
        and b"chunked" in lower.split(b"\r\ntransfer-encoding:", 1)[1].split(b"\r\n", 1)[0]
    ):
        decoded = _dechunk(buffer, start)
        if decoded is None:
            return None
        body, consumed = decoded
        return method, path, body, keep_alive, consumed
    length = 0
    if b"\r\ncontent-length:" in lower:
        try:
            length = int(lower.split(b"\r\ncontent-length:", 1)[1].split(b"\r\n", 1)[0])
        except ValueError:
            return _BAD
    if len(buffer) < start + length:
        return None
    return method, path, buffer[start : start + length], keep_alive, start + length


def _dechunk(buffer: bytes, position: int) -> tuple[bytes, int] | None:
    pieces: list[bytes] = []
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(buffer[position:line_end].split(b";", 1)[0], 16)
        start = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", start)
            if trailer_end < 0:
                return None
            return b"".join(pieces), trailer_end + 2
        if len(buffer) < start + size + 2:
            return None
        pieces.append(buffer[start : start + size])
        position = start + size + 2


async def serve(ports: Sequence[int], options: Options, host: str = "127.0.0.1") -> list[Listener]:
    """Listen on every port (0: a free one); the listeners are returned. The
    gateway's listener, not the loop's server: libuv's accepts one connection
    a turn of the loop, which made a burst's connections wait in this fake's
    queue, through the gateway and direct alike (gateway/listener.py)."""
    canned = Canned(options)
    loop = asyncio.get_running_loop()
    return [
        Listener(loop, listening_socket(host, port), lambda: FakeUpstream(canned)) for port in ports
    ]


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


async def _main(args: argparse.Namespace) -> None:
    options = Options(
        chunks=args.chunks,
        chunk_delay=args.chunk_delay_ms / 1000,
        slow_marker=args.slow_marker.encode(),
        models=tuple(args.model) or MODELS,
    )
    servers = await serve(args.port or [0], options, args.host)
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"fake upstream listening on {' '.join(map(str, ports))} ({loop_name})", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, action="append", default=[], help="repeat to listen on several"
    )
    parser.add_argument("--chunks", type=int, default=len(CONTENT), help="content chunks")
    parser.add_argument(
        "--chunk-delay-ms",
        type=float,
        default=20.0,
        help="pause before each chunk after the first, for models named like --slow-marker",
    )
    parser.add_argument("--slow-marker", default="slow")
    parser.add_argument("--model", action="append", default=[], help="names in /v1/models")
    args = parser.parse_args(argv)
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=_loop_factory()) as runner,
    ):
        runner.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
