"""The request pipeline: request hooks, one route, the ranked deployments
tried in order until one answers, then response or stream hooks.

A request that reaches it is decoded and authenticated (:mod:`gateway.app`).
Then, top-down:

1. request hooks (which may answer at once, or change the model);
2. :meth:`Router.resolve <gateway.routing.Router.resolve>` turns the model
   name into a route, and the route's ``timeout_seconds`` becomes the
   request's deadline;
3. for each model of the route, the deployments that can serve the request,
   without those unhealthy or cooling down, ranked by the model's policy;
4. the attempts: on an overloaded or unreachable deployment, before anything
   reached the client, the next one, then the fallbacks, then another round
   after a backoff;
5. the answer through the response hooks, or the stream (primed: its first
   chunk already arrived) through the stream adapters. A stream stays in
   flight until its last chunk, its error or its cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from gateway import wire
from gateway.accounting.access import check_name, check_route
from gateway.catalog import Catalog, ModelEntry
from gateway.contract import (
    AnyRequest,
    Backend,
    Candidate,
    RequestContext,
    SupportsEmbeddings,
    Target,
)
from gateway.decision_log import DecisionLog, RouteDecision
from gateway.decisions import Attempting, Decisions, Ranking, RouteTrace
from gateway.embeddings.inputs import from_view, inputs_of, routing_view
from gateway.embeddings.vectors import check_dimensions, shaped
from gateway.endpoints import AnswerT, ChunkT, Endpoint, RequestT
from gateway.errors import (
    EngineOverloadedError,
    GatewayError,
    HookFailedError,
    InternalError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gateway.exchange import OPERATIONS, Exchange, error_type, finish_reason
from gateway.hooks import HookChain
from gateway.lora.registry import AdapterRegistry
from gateway.lora.stats import AdapterUsage
from gateway.metrics import NoMetrics, RequestMetrics
from gateway.relay import ChunkRelay, Relayed, opened, supports_relay
from gateway.routing import Route, Router
from gateway.settings import LimitSettings
from gateway.stats import StatsTable
from gateway.streams import StreamRecord, checked, closing, observed, primed, shape_usage, until
from gateway.telemetry.attempts import trace_ranking, traced_call
from gateway.telemetry.semconv import OPERATION_EMBEDDINGS

T = TypeVar("T")
_log = logging.getLogger(__name__)
_RETRYABLE = (EngineOverloadedError, UpstreamError)
Call = Callable[[Backend, Target, RequestContext], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class Started(Generic[T]):
    """An attempt that answered: where it went, when it began (monotonic),
    and what it returned: an answer, or a stream still running."""

    target: Target
    at: float
    result: T
    backend: str = ""


class Pipeline:
    def __init__(
        self,
        limits: LimitSettings,
        catalog: Catalog,
        backends: Mapping[str, Backend],
        hooks: HookChain | None = None,
        decision_log: DecisionLog | None = None,
        record_prompts: bool = False,
        adapters: AdapterRegistry | None = None,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self.limits = limits
        self.backends = backends
        self.router = Router(catalog, backends, adapters)
        self.hooks = hooks or HookChain(())
        self.stats = StatsTable()
        # Requests and tokens per adapter name, for metrics and accounting.
        self.adapter_usage: dict[str, AdapterUsage] = {}
        self.decisions = Decisions(decision_log, record_prompts)
        self.metrics: RequestMetrics = metrics or NoMetrics()
        # False: streams are never relayed as bytes (the app's closing SSE
        # comments, e.g. the cost, need the typed stream's [DONE]).
        self.relay_streams = True

    @property
    def catalog(self) -> Catalog:
        return self.router.catalog

    @property
    def adapters(self) -> AdapterRegistry | None:
        return self.router.adapters

    # ---------------------------------------------------------------- serving

    async def answer(
        self,
        endpoint: Endpoint[RequestT, AnswerT, ChunkT],
        request: RequestT,
        ctx: RequestContext,
        trace: RouteTrace | None = None,
    ) -> AnswerT:
        """One non-streamed answer."""
        check_name(ctx.principal, self.catalog, request.model)
        early = await self.hooks.on_request(request, ctx)
        if isinstance(early, endpoint.answer_type):
            self._answered_early(request, trace, ctx, endpoint.name)
            return early
        asked = _expect(early, endpoint.request_type)
        route, ctx, exchange = self._routed(asked, ctx, trace, endpoint.name)
        started = await self._attempts(
            route, asked, ctx, lambda b, t, c: endpoint.answer(b, asked, t, c), trace, exchange
        )
        self._answered(started, exchange)
        answer = await self.hooks.on_response(asked, started.result, ctx)
        return _expect(answer, endpoint.answer_type)

    async def stream(
        self,
        endpoint: Endpoint[RequestT, AnswerT, ChunkT],
        request: RequestT,
        ctx: RequestContext,
        trace: RouteTrace | None = None,
    ) -> AsyncIterator[ChunkT]:
        """One streamed answer, its first chunk already there: anything that
        fails before it still moves on, or becomes a proper status."""
        arrived = time.monotonic()
        check_name(ctx.principal, self.catalog, request.model)
        early = await self.hooks.on_request(request, ctx)
        if isinstance(early, endpoint.answer_type):
            self._answered_early(request, trace, ctx, endpoint.name)
            chunks, asked = endpoint.as_chunks(early), request
        else:
            asked = _expect(early, endpoint.request_type)
            route, ctx, exchange = self._routed(asked, ctx, trace, endpoint.name)
            started = await self._attempts(
                route,
                asked,
                ctx,
                lambda b, t, c: primed(endpoint.stream(b, asked, t, c)),
                trace,
                exchange,
            )
            chunks = self._streaming(started, route.entry.stream_timeout_seconds, arrived, exchange)
        if self.hooks.rewrites_streams:
            chunks = checked(self.hooks.on_stream(asked, chunks, ctx), endpoint.chunk_type)
        shaped = shape_usage(chunks, _wants_usage(asked))
        return self._told(shaped, asked, ctx) if self.hooks.hears_errors else shaped

    async def events(
        self,
        endpoint: Endpoint[RequestT, AnswerT, ChunkT],
        request: RequestT,
        ctx: RequestContext,
        trace: RouteTrace | None = None,
    ) -> AsyncIterator[ChunkT | bytes]:
        """One streamed answer, its first chunk already there, for
        :func:`gateway.sse.sse_events`. When nothing needs typed chunks (no
        stream or error hook, no stream time limit, no captured content) a
        deployment that can relay (:mod:`gateway.relay`) sends its upstream's
        chunks through the cheap relay, as events already framed; otherwise
        the chunks are typed, as :meth:`stream` makes them. Either way a
        failure after the first chunk is raised, and the exchange, the stats
        and the attempt's span hear the same."""
        if (
            self.hooks.rewrites_streams
            or self.hooks.hears_errors
            or not self.relay_streams
            or _captures_content(trace)
        ):
            return await self.stream(endpoint, request, ctx, trace)
        arrived = time.monotonic()
        check_name(ctx.principal, self.catalog, request.model)
        early = await self.hooks.on_request(request, ctx)
        if isinstance(early, endpoint.answer_type):
            self._answered_early(request, trace, ctx, endpoint.name)
            return shape_usage(endpoint.as_chunks(early), _wants_usage(request))
        asked = _expect(early, endpoint.request_type)
        route, ctx, exchange = self._routed(asked, ctx, trace, endpoint.name)
        limit = route.entry.stream_timeout_seconds
        include_usage = _wants_usage(asked)
        chat = endpoint.name == "chat"

        async def call(
            backend: Backend, target: Target, c: RequestContext
        ) -> Relayed | AsyncIterator[ChunkT]:
            if limit is None and supports_relay(backend):
                relay = ChunkRelay(
                    c.request_id,
                    target.model,
                    chat=chat,
                    include_usage=include_usage,
                    started=time.monotonic(),
                )
                return await opened(endpoint.relay(backend, asked, target, c, relay), relay)
            return await primed(endpoint.stream(backend, asked, target, c))

        started = await self._attempts(route, asked, ctx, call, trace, exchange)
        result = started.result
        if isinstance(result, Relayed):
            result.on_end.append(self._relay_ended(started, exchange))
            return result
        typed = Started(started.target, started.at, result, started.backend)
        return shape_usage(self._streaming(typed, limit, arrived, exchange), include_usage)

    async def embed(
        self,
        request: wire.EmbeddingRequest,
        ctx: RequestContext,
        trace: RouteTrace | None = None,
    ) -> wire.EmbeddingList:
        """One embeddings answer, routed, attempted, traced and accounted as
        a chat answer is. Request hooks, rules and policies see the request
        as its completion-shaped view (gateway/embeddings/inputs.py); a hook
        that changes the view's model or prompt changes the request's. No
        response hook runs: their contract knows no embeddings answer."""
        view = routing_view(request)
        check_name(ctx.principal, self.catalog, view.model)
        early = await self.hooks.on_request(view, ctx)
        asked_view = _expect(early, wire.CompletionRequest)
        asked = from_view(request, asked_view)
        inputs_of(asked)
        route, ctx, exchange = self._routed(asked_view, ctx, trace, "embeddings", embeddings=True)
        # Refused before any engine works, where the model cannot shorten.
        check_dimensions(route.entry.name, asked.dimensions, route.entry.matryoshka)

        async def call(backend: Backend, target: Target, c: RequestContext) -> wire.EmbeddingList:
            if not isinstance(backend, SupportsEmbeddings):
                raise InternalError(f"backend {backend.name} cannot make embeddings")
            return await backend.embed(asked, target, c)

        started = await self._attempts(route, asked_view, ctx, call, trace, exchange)
        answer = started.result
        used = answer.usage.prompt_tokens
        usage = wire.Usage(prompt_tokens=used, completion_tokens=0, total_tokens=used)
        self._ended(started, None, usage, exchange)
        shaped_answer = shaped(answer, asked, route.entry.matryoshka)
        shaped_answer.model = started.target.model
        return shaped_answer

    def _relay_ended(
        self, started: Started[T], exchange: Exchange
    ) -> Callable[[ChunkRelay, BaseException | None], None]:
        """What :meth:`_streaming` does when a typed stream ends, for a relayed one."""

        def ended(relay: ChunkRelay, failure: BaseException | None) -> None:
            record = StreamRecord(
                None
                if relay.first_content is None
                else relay.started + relay.first_content - started.at,
                relay.usage,
                failure is not None,
                relay.chunks_since_content,
                relay.reasons.get(0),
            )
            self._stream_ended(started, record, exchange)

        return ended

    def _routed(
        self,
        asked: AnyRequest,
        ctx: RequestContext,
        trace: RouteTrace | None,
        endpoint: str,
        *,
        embeddings: bool = False,
    ) -> tuple[Route, RequestContext, Exchange]:
        """The route of ``asked`` (refused if the principal may not use it),
        and the context and exchange its attempts run with."""
        route = self.router.resolve(asked, embeddings=embeddings)
        check_route(ctx.principal, self.catalog, route)
        ctx = _with_deadline(ctx, route.entry)
        exchange = _exchange(trace, ctx, endpoint)
        return route, _metered(ctx, exchange), exchange

    async def explain(self, request: AnyRequest, ctx: RequestContext) -> RouteDecision:
        """A dry run: how ``request`` would be routed now (rules, health,
        cooldown, live stats, each policy's ranking, the fallbacks), with
        nothing sent and no policy state moved."""
        route = self.router.resolve(request)
        rankings = [
            await self._ranking(route, model, request, ctx, dry_run=True) for model in route.chain
        ]
        return self.decisions.explain(request, ctx, rankings, self.stats, self.backends)

    # ----------------------------------------------------------- the attempts

    async def _attempts(
        self,
        route: Route,
        request: AnyRequest,
        ctx: RequestContext,
        call: Call[T],
        trace: RouteTrace | None,
        exchange: Exchange,
    ) -> Started[T]:
        """Try the ranked deployments, then the fallback models, then again
        after a backoff; move on only when a deployment is overloaded or
        unreachable, before anything reached the client."""
        entry = route.entry
        exchange.model = entry.name
        span = trace.span if trace is not None else None
        operation = OPERATION_EMBEDDINGS if route.embeddings else None
        first = await self._ranking(route, entry, request, ctx)
        if span is not None:
            trace_ranking(span, route, first, request, ctx, round_number=0)
        decision = self.decisions.start(request, ctx, first)
        failure: GatewayError | None = None
        try:
            for round_number in range(entry.retry.rounds + 1):
                if round_number:
                    self.metrics.retried(entry.name)
                    await _back_off(entry, failure, ctx.deadline)
                for model in route.chain:
                    ranking = first
                    if round_number or model is not entry:
                        ranking = await self._ranking(route, model, request, ctx)
                        decision.rankings.append(ranking)
                        if span is not None:
                            trace_ranking(
                                span, route, ranking, request, ctx, round_number=round_number
                            )
                    if model is not entry and ranking.ranked:
                        self.metrics.fell_back(entry.name, model.name)
                    attempt = call
                    if span is not None:
                        attempt = traced_call(
                            call, span, request, fallback=model is not entry, operation=operation
                        )
                    for choice in ranking.ranked:
                        _check_deadline(ctx.deadline, request.model)
                        outcome = await self._attempt(
                            choice.candidate, attempt, ctx, decision, exchange
                        )
                        if isinstance(outcome, Started):
                            return outcome
                        failure = outcome
            raise failure or EngineOverloadedError(f"no deployment of {request.model} is available")
        finally:
            self.decisions.finish(decision, trace)

    async def _ranking(
        self,
        route: Route,
        model: ModelEntry,
        request: AnyRequest,
        ctx: RequestContext,
        dry_run: bool = False,
    ) -> Ranking:
        """The policy's ranking of the deployments that can serve the request
        and are healthy and not cooling down, with the stats it saw."""
        pool = self.router.eligible(route, model, request, ctx)
        health = {c.backend: await self.backends[c.backend].health() for c in pool}
        ready = {n: h.ready for n, h in health.items()}
        candidates = self.stats.available(pool, ready)
        if not candidates and not dry_run and any(self.stats.full(c) for c in pool):
            candidates = await self._capacity(pool, ready, model, ctx)
        stats = self.stats.snapshot(candidates, self.backends)
        return self.decisions.rank(
            model, request, ctx, candidates, stats, pool=pool, health=health, dry_run=dry_run
        )

    async def _capacity(
        self,
        pool: list[Candidate],
        ready: dict[str, bool],
        model: ModelEntry,
        ctx: RequestContext,
    ) -> list[Candidate]:
        """Every deployment the request may use is at its max_concurrency:
        wait for a slot, at most the model's ``capacity_wait_seconds`` (and
        never past the deadline); then 503 with Retry-After."""
        self.stats.capacity_waits += 1
        end = time.monotonic() + model.capacity_wait_seconds
        if ctx.deadline is not None:
            end = min(end, ctx.deadline)
        while (left := end - time.monotonic()) > 0:
            await self.stats.slot_freed(left)
            candidates = self.stats.available(pool, ready)
            if candidates:
                return candidates
        self.stats.capacity_timeouts += 1
        raise EngineOverloadedError(
            f"every deployment of {model.name} is at its max_concurrency; retry later",
            retry_after_seconds=1,
        )

    async def _attempt(
        self,
        candidate: Candidate,
        call: Call[T],
        ctx: RequestContext,
        decision: Attempting,
        exchange: Exchange,
    ) -> Started[T] | GatewayError:
        """One call to one deployment: it started, or the retryable error.
        Only a started attempt stays in flight; its caller ends it."""
        deployment = candidate.target.deployment
        if self.stats.full(candidate):
            # Filled since the ranking (another request started there): next.
            decision.attempts.append((deployment, "full"))
            return EngineOverloadedError(f"{deployment} is at its max_concurrency")
        backend = self.backends[candidate.backend]
        started = time.monotonic()
        self.stats.started(deployment)
        exchange.attempts += 1
        try:
            if ctx.deadline is None:
                result = await call(backend, candidate.target, ctx)
            else:
                async with asyncio.timeout(max(ctx.deadline - started, 0.0)):
                    result = await call(backend, candidate.target, ctx)
        except TimeoutError:
            self.stats.finished(deployment)
            decision.attempts.append((deployment, "timeout"))
            self._failed(exchange, candidate, started, "timeout")
            return _timed_out(decision.model)
        except _RETRYABLE as error:
            self.stats.finished(deployment)
            decision.attempts.append((deployment, error.code or error.error_type))
            self._failed(exchange, candidate, started, error_type(error))
            if isinstance(error, UpstreamError):
                # Unreachable or broken: cool down. A full queue is load, not
                # ill health: just move on.
                self.stats.failed(deployment)
                if self.stats.in_cooldown(deployment):
                    self.metrics.cooled_down(exchange.model, deployment, candidate.backend)
            return error
        except BaseException as error:
            self.stats.finished(deployment)
            if isinstance(error, GatewayError):
                decision.attempts.append((deployment, error.code or error.error_type))
            self._failed(exchange, candidate, started, error_type(error))
            raise
        self.stats.succeeded(deployment)
        decision.attempts.append((deployment, "ok"))
        decision.chosen = deployment
        exchange.answered_by(candidate.target, candidate.backend)
        return Started(candidate.target, started, result, candidate.backend)

    def _failed(self, exchange: Exchange, candidate: Candidate, started: float, error: str) -> None:
        seconds = time.monotonic() - started
        self.metrics.attempt_ended(
            exchange, candidate.target, candidate.backend, seconds, None, error
        )

    # ------------------------------------------------------- ends of attempts

    def _answered_early(
        self, request: AnyRequest, trace: RouteTrace | None, ctx: RequestContext, endpoint: str
    ) -> None:
        """A hook answered (a cache hit): the request's model, if the catalog
        has it, is still its metrics' model label."""
        if self.catalog.knows(request.model):
            _exchange(trace, ctx, endpoint).model = self.catalog.canonical(request.model)

    def _answered(self, started: Started[AnswerT], exchange: Exchange) -> None:
        usage = started.result.usage if isinstance(started.result.usage, wire.Usage) else None
        exchange.finish_reason = finish_reason(started.result)
        self._ended(started, None, usage, exchange)

    def _streaming(
        self,
        started: Started[AsyncIterator[ChunkT]],
        limit: float | None,
        arrived: float,
        exchange: Exchange,
    ) -> AsyncIterator[ChunkT]:
        chunks = started.result
        if limit is not None:
            chunks = until(chunks, limit - (time.monotonic() - arrived), limit)

        def done(record: StreamRecord) -> None:
            self._stream_ended(started, record, exchange)

        return observed(chunks, started.at, done)

    def _stream_ended(self, started: Started[T], record: StreamRecord, exchange: Exchange) -> None:
        exchange.finish_reason = record.finish_reason
        if record.first_content is not None:
            exchange.first_token_at = started.at + record.first_content
        if record.usage is None and record.chunks_since_content:
            # Cut short (the client left, the upstream failed): count
            # what was generated rather than report nothing.
            exchange.estimated_output_tokens = record.chunks_since_content
        if record.failed:
            self.stats.finished(started.target.deployment)
            seconds = time.monotonic() - started.at
            self.metrics.attempt_ended(
                exchange,
                started.target,
                started.backend,
                seconds,
                record.usage,
                "stream_failed",
            )
        else:
            self._ended(started, record.first_content, record.usage, exchange)

    def _ended(
        self,
        started: Started[T],
        first: float | None,
        usage: wire.Usage | None,
        exchange: Exchange,
    ) -> None:
        """An attempt's answer is complete: it leaves the in-flight count,
        its timing feeds the latency stats and the metrics, its usage the
        adapters' counters."""
        target = started.target
        deployment = target.deployment
        self.stats.finished(deployment)
        tokens = usage.completion_tokens if usage else 0
        seconds = time.monotonic() - started.at
        self.stats.observe(deployment, first, seconds, tokens)
        exchange.usage = usage
        self.metrics.attempt_ended(exchange, target, started.backend, seconds, usage, None)
        for use in target.adapters:
            counters = self.adapter_usage.setdefault(use.adapter.name, AdapterUsage())
            counters.requests += 1
            if usage is not None:
                counters.prompt_tokens += usage.prompt_tokens
                counters.completion_tokens += usage.completion_tokens

    async def _told(
        self, chunks: AsyncIterator[ChunkT], request: AnyRequest, ctx: RequestContext
    ) -> AsyncIterator[ChunkT]:
        """A stream whose failures after its first byte reach the error hooks
        too, before the client sees them as the stream's last event."""
        try:
            async with closing(chunks):
                async for chunk in chunks:
                    yield chunk
        except GatewayError as error:
            await self.hooks.on_error(request, error, ctx)
            raise
        except Exception as error:
            _log.exception("stream failed after its first byte")
            failure = InternalError("The stream failed; the answer is incomplete.")
            await self.hooks.on_error(request, failure, ctx)
            raise failure from error


def _exchange(trace: RouteTrace | None, ctx: RequestContext, endpoint: str) -> Exchange:
    """The request's exchange, which the HTTP handler opened; a pipeline
    called without one (a test, a replay) gets a scratch one."""
    if trace is not None and trace.exchange is not None:
        return trace.exchange
    exchange = Exchange(ctx.request_id, OPERATIONS.get(endpoint, endpoint), time.monotonic())
    if trace is not None:
        trace.exchange = exchange
    return exchange


def _captures_content(trace: RouteTrace | None) -> bool:
    """Traced with the answers' text captured: that needs typed chunks."""
    span = trace.span if trace is not None else None
    return span is not None and span.tracing.capture_content


def _with_deadline(ctx: RequestContext, model: ModelEntry) -> RequestContext:
    if model.timeout_seconds is None:
        return ctx
    return replace(ctx, deadline=time.monotonic() + model.timeout_seconds)


def _metered(ctx: RequestContext, exchange: Exchange) -> RequestContext:
    """The context the backends see: their busy time, and the exact usage
    of work cut short, go to the exchange (the HTTP handler's context
    already says so: no copy, which costs a stream's set-up 2 %)."""
    if ctx.compute is exchange.compute and ctx.usage_report is exchange.reported:
        return ctx
    return replace(ctx, compute=exchange.compute, usage_report=exchange.reported)


def _timed_out(model: str) -> UpstreamTimeoutError:
    return UpstreamTimeoutError(f"{model}: no answer within its timeout")


def _check_deadline(deadline: float | None, model: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise _timed_out(model)


async def _back_off(
    entry: ModelEntry, failure: GatewayError | None, deadline: float | None
) -> None:
    """Sleep before another round: jittered, at least what Retry-After asked
    (capped), and never past the deadline."""
    retry_after = float((failure.headers if failure else {}).get("Retry-After", 0) or 0)
    pause = max(entry.retry.backoff_seconds * (0.5 + random.random()), retry_after)
    pause = min(pause, entry.retry.retry_after_cap_seconds)
    if deadline is not None:
        pause = min(pause, max(deadline - time.monotonic(), 0.0))
    await asyncio.sleep(pause)


def _expect(value: object, kind: type[T]) -> T:
    if not isinstance(value, kind):
        raise HookFailedError(
            f"A hook returned {type(value).__name__} where {kind.__name__} was expected."
        )
    return value


def _wants_usage(request: AnyRequest) -> bool:
    return request.stream_options is not None and request.stream_options.include_usage
