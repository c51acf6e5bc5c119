"""The access log: one JSON line per request to the OpenAI endpoints.

Who asked (the key's fingerprint, never the key), what for (the model named,
the deployment that answered), what became of it (status, error code,
attempts), what it used (tokens) and how long it took (latency, time to first
token), with the trace and span ids when tracing is on. Never prompt or
completion text.

Lines are encoded on the request path (about a microsecond) and written from
a background task in batches, so no request waits for a disk or a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import msgspec

from gateway.exchange import Exchange

_log = logging.getLogger(__name__)
# Each flush is a hop to a thread: a few a second at most.
FLUSH_SECONDS = 0.5
# A client's model name is logged, cut to this length (it is the client's text).
MAX_MODEL_CHARS = 256


class AccessRecord(msgspec.Struct, kw_only=True):
    """One line of the access log; every key is always present."""

    ts: str
    event: str = "request"
    request_id: str
    trace_id: str | None
    span_id: str | None
    path: str
    status: int
    error: str | None
    key_id: str | None
    model: str
    served_model: str
    deployment: str
    backend: str
    adapter: str
    stream: bool
    attempts: int
    prompt_tokens: int | None
    completion_tokens: int | None
    # completion_tokens counted on a stream cut before its usage came.
    tokens_estimated: bool
    cached_tokens: int | None
    latency_ms: float
    ttft_ms: float | None


def access_record(
    exchange: Exchange, status: int, error: str | None, now: float, ts: str
) -> AccessRecord:
    usage = exchange.usage
    details = usage.prompt_tokens_details if usage is not None else None
    ttft = exchange.time_to_first_token()
    return AccessRecord(
        ts=ts,
        request_id=exchange.request_id,
        trace_id=exchange.trace_id,
        span_id=exchange.span_id,
        path=exchange.path,
        status=status,
        error=error,
        key_id=exchange.key_id,
        model=exchange.requested[:MAX_MODEL_CHARS],
        served_model=exchange.model,
        deployment=exchange.deployment,
        backend=exchange.backend,
        adapter=exchange.adapter,
        stream=exchange.stream,
        attempts=exchange.attempts,
        prompt_tokens=usage.prompt_tokens if usage is not None else None,
        completion_tokens=exchange.output_tokens(),
        tokens_estimated=usage is None and exchange.estimated_output_tokens is not None,
        cached_tokens=details.cached_tokens if details is not None else None,
        latency_ms=round((now - exchange.arrived) * 1000, 3),
        ttft_ms=None if ttft is None else round(ttft * 1000, 3),
    )


class _Clock:
    """RFC 3339 UTC timestamps in milliseconds; the date and time of day are
    formatted once a second (strftime costs a few microseconds)."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{int((now - second) * 1000):03d}Z"


class AccessLog:
    """Appends lines to a file, or to standard error, from a background task."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._pending: list[bytes] = []
        self._encoder = msgspec.json.Encoder()
        self._clock = _Clock()
        self._task: asyncio.Task[None] | None = None

    def record(self, exchange: Exchange, status: int, error: str | None, now: float) -> None:
        line = access_record(exchange, status, error, now, self._clock.now())
        self._pending.append(self._encoder.encode(line) + b"\n")

    def start(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="access-log")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            try:
                await asyncio.to_thread(self._write, b"".join(batch))
            except OSError:
                _log.exception("could not write %d access log lines", len(batch))

    def _write(self, data: bytes) -> None:
        if self.path is None:
            # Past Python's buffer, which other threads' log records share.
            sys.stderr.flush()
            view = memoryview(data)
            while view:
                view = view[os.write(sys.stderr.fileno(), view) :]
            return
        with self.path.open("ab") as file:
            file.write(data)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
