"""Routing decisions: explained, logged, and replayable.

Every call to a policy is recorded with exactly what the policy was given:
the request facts the built-in policies and rules read, each candidate as
the policy saw it (target, adapters, backend, weight, cost) with every field
of its :class:`~gateway.contract.CandidateStats`, and what the policy
returned (order, scores, reasons). A request's decision gathers its policy
calls (the first ranking, and those of retry rounds and fallback models),
the attempts and the outcome. The decision can travel back to the client in
a response header (opt-in) and be appended to a JSON-lines log, written off
the request path, that ``nomoat replay`` feeds to a policy to rebuild each
call's inputs exactly.

Stateful policies (weighted round-robin's counters, lora-affinity's recent
shares) replay from a fresh instance per model and per gateway start (``run``),
fed their calls in the order they were made (``seq``): the log itself is in
the order requests finished, not the order they were ranked.

The log holds no credentials (see :func:`recorded_headers`) and no prompt
text unless ``server.decision_log_prompts`` is on. Records carry ``version``;
a log of another version is refused with a clear message, not misread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from gateway import wire
from gateway.catalog import ModelEntry
from gateway.contract import (
    Adapter,
    AdapterUse,
    AnyRequest,
    Backend,
    BackendHealth,
    Candidate,
    CandidateStats,
    RankedCandidate,
    RequestContext,
    RoutingPolicy,
    Target,
)
from gateway.errors import InternalError
from gateway.private_files import open_private, private_dirs
from gateway.rules import Rule, estimate_prompt_tokens
from gateway.stats import StatsTable

_log = logging.getLogger(__name__)
FLUSH_SECONDS = 1.0
# The record format. Bump it when a field changes meaning or a needed one is
# added; read_log refuses other versions rather than replay them wrongly.
DECISION_LOG_VERSION = 2
# Header names that may carry credentials: never recorded. (The gateway
# already leaves out authorization, proxy-authorization and cookie.)
NO_PROMPT = msgspec.Raw(b"null")
_SECRET_NAME = re.compile("auth|key|token|secret|cookie|password|credential|sign")


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
    cost_per_million_tokens: float
    adapters: list[AdapterView]
    stats: StatsView
    health: HealthView | None = None

    def candidate(self, base_model: str) -> Candidate:
        """The candidate again. Adapters come back with their name and scale
        (all a policy reads of them); their files are not recorded."""
        uses = tuple(
            AdapterUse(Adapter(a.name, base_model, "", "", Path(), ""), a.scale)
            for a in self.adapters
        )
        target = Target(self.model, self.engine_model, self.deployment, uses)
        return Candidate(target, self.backend, self.weight, self.cost_per_million_tokens)


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


@dataclass(frozen=True, slots=True)
class Ranking:
    """One policy call in memory: what the policy was given and returned,
    with what a dry run explains beside it (the pool before health and
    cooldown were applied, and each backend's health)."""

    entry: ModelEntry
    candidates: Sequence[Candidate]
    stats: Mapping[str, CandidateStats]
    ranked: list[RankedCandidate]
    seq: int = -1
    pool: Sequence[Candidate] = ()
    health: Mapping[str, BackendHealth] = field(default_factory=dict)


class RouteTrace:
    """Where the pipeline leaves the decision of one request for its caller."""

    __slots__ = ("body_bytes", "decision", "endpoint")

    def __init__(self, endpoint: str, body_bytes: int) -> None:
        self.endpoint = endpoint
        self.body_bytes = body_bytes
        self.decision: RouteDecision | None = None


class Decisions:
    """Ranks through the policies, numbering the calls, and builds each
    request's :class:`RouteDecision`; settled decisions go to the log."""

    def __init__(self, log: DecisionLog | None = None, record_prompts: bool = False) -> None:
        self.log = log
        self.record_prompts = record_prompts
        self.run = uuid.uuid4().hex[:12]
        self._calls = itertools.count()

    def rank(
        self,
        entry: ModelEntry,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
        *,
        pool: Sequence[Candidate] = (),
        health: Mapping[str, BackendHealth] | None = None,
        dry_run: bool = False,
    ) -> Ranking:
        """``entry``'s policy ranks ``candidates``. A dry run ranks a copy of
        the policy, so stateful policies do not move (see :func:`dry_run_copy`)."""
        policy = dry_run_copy(entry) if dry_run else entry.policy
        ranked = policy.rank(request, ctx, candidates, stats)
        # Numbered right after the call: calls are numbered in the order the
        # policy saw them, whatever order their requests finish in.
        seq = -1 if dry_run else next(self._calls)
        return Ranking(entry, candidates, stats, ranked, seq, pool or candidates, health or {})

    def open(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        ranking: Ranking,
        trace: RouteTrace | None,
    ) -> RouteDecision:
        """The decision of a request that ``ranking`` has just ranked."""
        return RouteDecision(
            run=self.run,
            request_id=ctx.request_id,
            request=request_view(request, ctx, trace, self.record_prompts),
            rankings=[ranking_record(ranking)],
            started_at=time.time(),
        )

    def ranked_again(self, decision: RouteDecision, ranking: Ranking) -> None:
        """Another policy call for the same request (a retry round, a
        fallback model): recorded too, or stateful policies would replay
        out of step."""
        decision.rankings.append(ranking_record(ranking))

    def settle(self, decision: RouteDecision, trace: RouteTrace | None) -> None:
        """The request is done (answered, failed, or streaming): its outcome
        and latency; the decision goes to the trace and the log."""
        decision.outcome = decision.attempts[-1][1] if decision.attempts else "no_candidates"
        decision.latency = time.time() - decision.started_at
        if trace is not None:
            trace.decision = decision
        if self.log is not None:
            self.log.record(decision)

    def explain(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        rankings: Sequence[Ranking],
        table: StatsTable,
        backends: Mapping[str, Backend],
    ) -> RouteDecision:
        """A dry run's decision: ``rankings`` (the model's, then each
        fallback's) with the rule applied, every deployment of each pool with
        its health, cooldown and live stats, and what the policy said."""
        return RouteDecision(
            run=self.run,
            request_id=ctx.request_id,
            request=request_view(request, ctx, None, record_prompt=False),
            rankings=[_explained(r, request, ctx, table, backends) for r in rankings],
            outcome="dry_run",
            started_at=time.time(),
            dry_run=True,
        )


def dry_run_copy(entry: ModelEntry) -> RoutingPolicy:
    """A deep copy of the model's policy, to rank without moving its state.

    Copying is the contract's way (see ``RoutingPolicy``): it needs nothing
    of a policy, and ranks the copy exactly as the next request would be.
    """
    try:
        return copy.deepcopy(entry.policy)
    except Exception as error:  # a third-party policy may hold anything
        raise InternalError(
            f"policy {entry.policy_name} of {entry.name} cannot be copied for a dry run "
            f"({type(error).__name__}: {error}); give it a __deepcopy__"
        ) from None


def ranking_record(ranking: Ranking) -> RankingRecord:
    entry = ranking.entry
    return RankingRecord(
        seq=ranking.seq,
        entry=entry.name,
        policy=entry.policy_name,
        candidates=[
            candidate_view(c, ranking.stats.get(c.target.deployment, CandidateStats()))
            for c in ranking.candidates
        ],
        ranked=[
            ChoiceView(
                deployment=r.candidate.target.deployment,
                score=r.score if math.isfinite(r.score) else None,
                reason=r.reason,
            )
            for r in ranking.ranked
        ],
    )


def candidate_view(candidate: Candidate, stats: CandidateStats) -> CandidateView:
    target = candidate.target
    return CandidateView(
        deployment=target.deployment,
        model=target.model,
        engine_model=target.engine_model,
        backend=candidate.backend,
        weight=candidate.weight,
        cost_per_million_tokens=candidate.cost_per_million_tokens,
        adapters=[AdapterView(name=u.adapter.name, scale=u.scale) for u in target.adapters],
        stats=StatsView.of(stats),
    )


def request_view(
    request: AnyRequest, ctx: RequestContext, trace: RouteTrace | None, record_prompt: bool
) -> RequestView:
    chat = request if isinstance(request, wire.ChatCompletionRequest) else None
    return RequestView(
        endpoint=trace.endpoint if trace else ("chat" if chat else "completions"),
        model=request.model,
        stream=bool(request.stream),
        body_bytes=trace.body_bytes if trace else 0,
        created=ctx.created,
        user=request.user,
        max_tokens=request.max_tokens,
        max_completion_tokens=chat.max_completion_tokens if chat else None,
        prompt_tokens=estimate_prompt_tokens(request),
        api_key_id=ctx.api_key_id,
        headers=recorded_headers(ctx.headers),
        prompt=_prompt(request) if record_prompt else NO_PROMPT,
    )


def recorded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers fit for a log: none whose name suggests a
    credential (``authorization``, ``x-api-key``, ``x-auth-token``, ...)."""
    return {name: value for name, value in headers.items() if _SECRET_NAME.search(name) is None}


def _prompt(request: AnyRequest) -> msgspec.Raw:
    if isinstance(request, wire.ChatCompletionRequest):
        return msgspec.Raw(wire.encoder.encode(request.messages))
    return msgspec.Raw(wire.encoder.encode(request.prompt))


def _explained(
    ranking: Ranking,
    request: AnyRequest,
    ctx: RequestContext,
    table: StatsTable,
    backends: Mapping[str, Backend],
) -> RankingRecord:
    record = ranking_record(ranking)
    given = {c.target.deployment for c in ranking.candidates}
    left_out = [c for c in ranking.pool if c.target.deployment not in given]
    live = table.snapshot(left_out, backends)
    record.excluded = [candidate_view(c, live[c.target.deployment]) for c in left_out]
    record.rule = rule_applied(ranking.entry.rules, request, ctx)
    for view in (*record.candidates, *record.excluded):
        health = ranking.health.get(view.backend, BackendHealth(False, "not started"))
        view.health = HealthView(
            ready=health.ready,
            detail=health.detail,
            cooldown_seconds=round(table.cooldown_left(view.deployment), 3),
        )
    return record


def rule_applied(rules: Sequence[Rule], request: AnyRequest, ctx: RequestContext) -> str | None:
    """Which rule chose the pool, as ``rules.select_pool`` applies them;
    None when the model has no rules."""
    if not rules:
        return None
    size = estimate_prompt_tokens(request)
    for index, rule in enumerate(rules):
        if rule.matches(size, ctx):
            return f"rules[{index}] ({_conditions(rule)}): pool {', '.join(sorted(rule.pool))}"
    return f"no rule matched (prompt ~{size} tokens): every deployment"


def _conditions(rule: Rule) -> str:
    parts = []
    if rule.min_prompt_tokens is not None:
        parts.append(f"prompt >= {rule.min_prompt_tokens} tokens")
    if rule.max_prompt_tokens is not None:
        parts.append(f"prompt <= {rule.max_prompt_tokens} tokens")
    if rule.header is not None:
        parts.append(f"header {rule.header[0]}: {rule.header[1]}")
    if rule.api_key_ids:
        parts.append(f"api key {' or '.join(sorted(rule.api_key_ids))}")
    return ", ".join(parts) or "always"


# --------------------------------------------------------------------- the log


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
