"""Routing decisions: explained, logged, and replayable.

Every request's routing records each candidate's score and reason, the stats
snapshot the policy saw, the chosen deployment and the outcome. The record
can travel back to the client in a response header (opt-in), and be appended
to a JSON-lines log, written off the request path, that ``nomoat replay``
feeds to another policy to compare decisions before a rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import msgspec

_log = logging.getLogger(__name__)
FLUSH_SECONDS = 1.0


class StatsView(msgspec.Struct, kw_only=True):
    in_flight: int
    queue_depth: int | None
    ewma_ttft: float | None
    ewma_token_time: float | None


class CandidateView(msgspec.Struct, kw_only=True):
    deployment: str
    backend: str
    engine_model: str
    weight: float
    score: float
    reason: str
    stats: StatsView


class RouteDecision(msgspec.Struct, kw_only=True):
    request_id: str
    model: str
    policy: str
    endpoint: str
    body_bytes: int
    stream: bool
    candidates: list[CandidateView]
    # Deployments tried, in order, with what happened: "ok" or an error code.
    attempts: list[tuple[str, str]] = msgspec.field(default_factory=list)
    chosen: str | None = None
    outcome: str = "pending"
    started_at: float = 0.0
    # Seconds to the answer (non-streamed) or to the first chunk (streamed).
    latency: float | None = None
    prompt: str | None = None

    def header(self) -> str:
        """The ``x-nomoat-route`` header value: where it went, and why."""
        chosen = next((c for c in self.candidates if c.deployment == self.chosen), None)
        if self.chosen is None:
            return f"outcome={self.outcome}"
        if chosen is None:  # a fallback model answered
            return f"deployment={self.chosen}; fallback=true; tried={len(self.attempts)}"
        return (
            f"deployment={chosen.deployment}; backend={chosen.backend}; "
            f"score={chosen.score:g}; policy={self.policy}; tried={len(self.attempts)}"
        )


class RouteTrace:
    """Where the pipeline leaves the decision of one request for its caller."""

    __slots__ = ("body_bytes", "decision", "endpoint")

    def __init__(self, endpoint: str, body_bytes: int) -> None:
        self.endpoint = endpoint
        self.body_bytes = body_bytes
        self.decision: RouteDecision | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RouteDecision)


def read_log(path: Path) -> list[RouteDecision]:
    with path.open("rb") as file:
        return [_decoder.decode(line) for line in file if line.strip()]


class DecisionLog:
    """Appends decisions to a JSON-lines file from a background task, in
    batches, so the request path never waits for the disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: list[RouteDecision] = []
        self._task: asyncio.Task[None] | None = None

    def record(self, decision: RouteDecision) -> None:
        self._pending.append(decision)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="decision-log")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            data = b"".join(_encoder.encode(item) + b"\n" for item in batch)
            try:
                await asyncio.to_thread(self._append, data)
            except OSError:
                _log.exception("could not write %d routing decisions", len(batch))

    def _append(self, data: bytes) -> None:
        with self.path.open("ab") as file:
            file.write(data)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
