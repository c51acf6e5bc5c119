"""Routing decisions: explained, logged, and replayable (the record format
and the log file are in :mod:`gateway.decision_log`).

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

import copy
import itertools
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from gateway import wire
from gateway.catalog import ModelEntry
from gateway.contract import (
    AnyRequest,
    Backend,
    BackendHealth,
    Candidate,
    CandidateStats,
    RankedCandidate,
    RequestContext,
    RoutingPolicy,
)
from gateway.decision_log import (
    NO_PROMPT,
    AdapterView,
    CandidateView,
    ChoiceView,
    DecisionLog,
    HealthView,
    RankingRecord,
    RequestView,
    RouteDecision,
    StatsView,
)
from gateway.errors import InternalError
from gateway.exchange import Exchange
from gateway.rules import Rule, estimate_prompt_tokens
from gateway.stats import StatsTable

if TYPE_CHECKING:
    from gateway.telemetry.spans import RequestSpan

# Header names that may carry credentials: never recorded. (The gateway
# already leaves out authorization, proxy-authorization and cookie.)
_SECRET_NAME = re.compile("auth|key|token|secret|cookie|password|credential|sign")


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

    __slots__ = ("body_bytes", "decision", "endpoint", "exchange", "keep_decision", "span")

    def __init__(
        self,
        endpoint: str,
        body_bytes: int,
        span: RequestSpan | None = None,
        exchange: Exchange | None = None,
        keep_decision: bool = True,
    ) -> None:
        self.endpoint = endpoint
        self.body_bytes = body_bytes
        self.decision: RouteDecision | None = None
        # False: nobody reads ``decision`` (no route header asked for), so
        # the record is built only for the decision log, if there is one.
        self.keep_decision = keep_decision
        # The request's span when tracing is on: the pipeline adds routing
        # and attempt spans below it.
        self.span = span
        # What the metrics and the access log hear of the request.
        self.exchange = exchange


class Attempting:
    """A request's decision while the pipeline makes it: what its
    :class:`RouteDecision` is built from once it settles, and only if
    someone reads that record (the decision log, the route header). Building
    it for every request (the request's view, each candidate's) was about
    4 % of a relayed stream's set-up (docs/benchmarks.md)."""

    __slots__ = ("attempts", "chosen", "ctx", "rankings", "request", "started_at")

    def __init__(self, request: AnyRequest, ctx: RequestContext, first: Ranking) -> None:
        self.request = request
        self.ctx = ctx
        self.rankings = [first]
        # Deployments tried, in order, with what happened: "ok" or an error code.
        self.attempts: list[tuple[str, str]] = []
        self.chosen: str | None = None
        self.started_at = time.time()

    @property
    def model(self) -> str:
        return self.request.model


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

    def start(self, request: AnyRequest, ctx: RequestContext, ranking: Ranking) -> Attempting:
        """The decision of a request that ``ranking`` has just ranked, its
        record left for :meth:`finish` to build if it is read."""
        return Attempting(request, ctx, ranking)

    def finish(self, attempting: Attempting, trace: RouteTrace | None) -> None:
        """:meth:`settle` for a decision made through :meth:`start`."""
        kept = trace is not None and trace.keep_decision
        if self.log is None and not kept:
            return
        latency = time.time() - attempting.started_at
        request, ctx = attempting.request, attempting.ctx
        attempts = attempting.attempts
        decision = RouteDecision(
            run=self.run,
            request_id=ctx.request_id,
            request=request_view(request, ctx, trace, self.record_prompts),
            rankings=[ranking_record(ranking) for ranking in attempting.rankings],
            attempts=attempts,
            chosen=attempting.chosen,
            outcome=attempts[-1][1] if attempts else "no_candidates",
            started_at=attempting.started_at,
            latency=latency,
        )
        if trace is not None and kept:
            trace.decision = decision
        if self.log is not None:
            self.log.record(decision)

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
        input_usd_per_million=candidate.input_usd_per_million,
        output_usd_per_million=candidate.output_usd_per_million,
        max_concurrency=candidate.max_concurrency,
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
