"""The decision log's record format, and the log file itself.

A record (:class:`RouteDecision`) holds every policy call of one request with
exactly what the policy was given and returned; see :mod:`gateway.decisions`
for how records are built and why. The log is JSON lines, appended off the
request path; :func:`read_log` refuses records of another ``version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import msgspec

from gateway.contract import Adapter, AdapterUse, Candidate, CandidateStats, Target
from gateway.private_files import open_private, private_dirs

_log = logging.getLogger(__name__)
FLUSH_SECONDS = 1.0
# The record format. Bump it when a field changes meaning or a needed one is
# added; read_log refuses other versions rather than replay them wrongly.
DECISION_LOG_VERSION = 3
NO_PROMPT = msgspec.Raw(b"null")


# ------------------------------------------------------------------ the record


class AdapterView(msgspec.Struct, kw_only=True):
    """An adapter of a target: what policies read of it (name and scale)."""

    name: str
    scale: float = 1.0


class StatsView(msgspec.Struct, kw_only=True):
    """Every field of :class:`CandidateStats`, as the policy saw it."""

    in_flight: int = 0
    queue_depth: int | None = None
    ewma_ttft: float | None = None
    ewma_token_time: float | None = None
    running: int | None = None
    kv_cache_usage: float | None = None
    adapters_loaded: list[str] = msgspec.field(default_factory=list)
    adapter_slots: int | None = None

    @classmethod
    def of(cls, stats: CandidateStats) -> StatsView:
        return cls(
            in_flight=stats.in_flight,
            queue_depth=stats.queue_depth,
            ewma_ttft=stats.ewma_ttft,
            ewma_token_time=stats.ewma_token_time,
            running=stats.running,
            kv_cache_usage=stats.kv_cache_usage,
            adapters_loaded=sorted(stats.adapters_loaded),
            adapter_slots=stats.adapter_slots,
        )

    def stats(self) -> CandidateStats:
        return CandidateStats(
            in_flight=self.in_flight,
            queue_depth=self.queue_depth,
            ewma_ttft=self.ewma_ttft,
            ewma_token_time=self.ewma_token_time,
            running=self.running,
            kv_cache_usage=self.kv_cache_usage,
            adapters_loaded=frozenset(self.adapters_loaded),
            adapter_slots=self.adapter_slots,
        )


class HealthView(msgspec.Struct, kw_only=True):
    """A deployment's health when explained (not in the log: the policy
    never sees it, the candidates it is given are the healthy ones)."""

    ready: bool
    detail: str
    # Seconds left in its cooldown after failures (0: none).
    cooldown_seconds: float


class CandidateView(msgspec.Struct, kw_only=True):
    """A :class:`Candidate` (and its :class:`Target`) with the stats the policy saw."""

    deployment: str
    # The name answers carry (the model, or the adapter the client named).
    model: str
    engine_model: str
    backend: str
    weight: float
    input_usd_per_million: float = 0.0
    output_usd_per_million: float = 0.0
    adapters: list[AdapterView]
    stats: StatsView
    health: HealthView | None = None
    # Absent in logs written before deployments had it.
    max_concurrency: int | None = None

    def candidate(self, base_model: str) -> Candidate:
        """The candidate again. Adapters come back with their name and scale
        (all a policy reads of them); their files are not recorded."""
        uses = tuple(
            AdapterUse(Adapter(a.name, base_model, "", "", Path(), ""), a.scale)
            for a in self.adapters
        )
        target = Target(self.model, self.engine_model, self.deployment, uses)
        return Candidate(
            target,
            self.backend,
            self.weight,
            self.input_usd_per_million,
            self.output_usd_per_million,
            self.max_concurrency,
        )


class ChoiceView(msgspec.Struct, kw_only=True):
    """One entry of what the policy returned."""

    deployment: str
    # None when the score is not a finite number (JSON has no infinity):
    # lowest-latency scores unmeasured deployments +inf.
    score: float | None
    reason: str


class RankingRecord(msgspec.Struct, kw_only=True):
    """One call to a policy: its inputs and its answer."""

    # Order of the call among this run's policy calls (-1: a dry run).
    seq: int
    # The catalog model whose policy instance was called.
    entry: str
    policy: str
    # What the policy was given, in that order.
    candidates: list[CandidateView]
    # What it returned, best first (candidates left out are not tried).
    ranked: list[ChoiceView]
    # Dry runs only: the rule that chose the pool, and the deployments of the
    # pool left out before ranking (unhealthy or cooling down).
    rule: str | None = None
    excluded: list[CandidateView] = msgspec.field(default_factory=list)


class RequestView(msgspec.Struct, kw_only=True):
    """What the built-in policies and rules read of a request and its context."""

    endpoint: str
    model: str
    stream: bool
    body_bytes: int
    created: int
    # Session affinity's default key.
    user: str | None = None
    # Lowest latency's expected tokens.
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    # The prompt size rules match on (estimated: 4 characters per token).
    prompt_tokens: int = 0
    # Rules by key; a non-secret fingerprint.
    api_key_id: str | None = None
    # Session affinity by header, rules by header; credentials left out.
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    # The messages (chat) or the prompt (completions) as JSON, only with
    # server.decision_log_prompts; else null. (msgspec.Raw: JSON as it is.)
    prompt: msgspec.Raw = NO_PROMPT

    @property
    def has_prompt(self) -> bool:
        return bytes(self.prompt) != bytes(NO_PROMPT)


class RouteDecision(msgspec.Struct, kw_only=True):
    version: int = DECISION_LOG_VERSION
    # One per gateway start: policy state starts afresh with it.
    run: str
    request_id: str
    request: RequestView
    # Every policy call for this request, in order: the first ranking, then
    # those of retry rounds and fallback models. A dry run ranks the model
    # and each of its fallbacks once.
    rankings: list[RankingRecord]
    # Deployments tried, in order, with what happened: "ok" or an error code.
    attempts: list[tuple[str, str]] = msgspec.field(default_factory=list)
    chosen: str | None = None
    outcome: str = "pending"
    started_at: float = 0.0
    # Seconds to the answer (non-streamed) or to the first chunk (streamed).
    latency: float | None = None
    dry_run: bool = False

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def policy(self) -> str:
        return self.rankings[0].policy if self.rankings else ""

    def header(self) -> str:
        """The ``x-nomoat-route`` header value: where it went, and why."""
        if self.chosen is None:
            return f"outcome={self.outcome}"
        model = self.rankings[0].entry if self.rankings else None
        for ranking in self.rankings:
            choice = next((c for c in ranking.ranked if c.deployment == self.chosen), None)
            view = next((c for c in ranking.candidates if c.deployment == self.chosen), None)
            if ranking.entry == model and choice is not None and view is not None:
                score = "inf" if choice.score is None else f"{choice.score:g}"
                return (
                    f"deployment={self.chosen}; backend={view.backend}; score={score}; "
                    f"policy={ranking.policy}; tried={len(self.attempts)}"
                )
        # A fallback model answered.
        return f"deployment={self.chosen}; fallback=true; tried={len(self.attempts)}"


# -------------------------------------------------------- building a decision


class LogFormatError(Exception):
    """A decision log this nomoat cannot replay faithfully."""


class _Version(msgspec.Struct):
    # Version 1 records (before the full snapshot) had no such field.
    version: int = 1


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RouteDecision)
_version_decoder = msgspec.json.Decoder(_Version)


def read_log(path: Path) -> list[RouteDecision]:
    """Every record of a decision log; raises :class:`LogFormatError` for a
    line of another format version or one that does not decode."""
    decisions = []
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                version = _version_decoder.decode(line).version
                if version != DECISION_LOG_VERSION:
                    raise LogFormatError(_version_problem(path, number, version))
                decisions.append(_decoder.decode(line))
            except msgspec.DecodeError as error:  # ValidationError is one too
                raise LogFormatError(f"{path}:{number}: not a decision record: {error}") from None
    return decisions


def _version_problem(path: Path, number: int, version: int) -> str:
    written_by = "an older" if version < DECISION_LOG_VERSION else "a newer"
    hint = (
        "it lacks the stats most policies rank with, so it cannot be replayed faithfully; "
        "record a new log with this version"
        if version < DECISION_LOG_VERSION
        else "replay it with that nomoat"
    )
    return (
        f"{path}:{number}: decision log format version {version}, written by {written_by} "
        f"nomoat; this one reads version {DECISION_LOG_VERSION}: {hint}"
    )


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
        private_dirs(self.path.parent)
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
        # Private: with decision_log_prompts it holds what clients wrote.
        with os.fdopen(open_private(self.path, append=True), "ab") as file:
            file.write(data)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
