"""Where the pipeline meets the spans: a policy call becomes routing
events, a call to a deployment an attempt span (the pipeline calls these only
when the request has a span, i.e. tracing is on)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from gateway import wire
from gateway.contract import AnyRequest, Backend, Candidate, RequestContext, Target
from gateway.decisions import Ranking, rule_applied
from gateway.relay import Relayed
from gateway.routing import Route
from gateway.telemetry.attributes import operation_name
from gateway.telemetry.spans import AttemptSpan, RequestSpan

T = TypeVar("T")
Call = Callable[[Backend, Target, RequestContext], Awaitable[T]]


def trace_ranking(
    span: RequestSpan,
    route: Route,
    ranking: Ranking,
    request: AnyRequest,
    ctx: RequestContext,
    *,
    round_number: int,
) -> None:
    """One policy call, as events on the request's span."""
    entry = ranking.entry
    span.routed(
        entry.policy_name,
        entry.name,
        [(r.candidate, r.score, r.reason) for r in ranking.ranked],
        rule=rule_applied(entry.rules, request, ctx),
        fallbacks=[model.name for model in route.chain[1:]] if entry is route.entry else (),
        round_number=round_number,
    )


def traced_call(
    call: Call[T],
    span: RequestSpan,
    request: AnyRequest,
    *,
    fallback: bool,
    operation: str | None = None,
) -> Call[T]:
    """``call`` with an attempt span around it: current while the
    deployment is called (its logs carry it), handed to the backend as
    ``ctx.trace`` (which sends it upstream as ``traceparent``), ended when
    the answer is whole, or with the stream that the call started.
    ``operation``: the GenAI operation when the request does not say it (an
    embeddings request's completion-shaped view)."""
    operation = operation or operation_name(request)

    async def traced(backend: Backend, target: Target, ctx: RequestContext) -> T:
        candidate = Candidate(target, backend.name)
        attempt = span.attempt(
            operation, request, candidate, fallback=fallback, upstream_id=ctx.request_id
        )
        token = attempt.attach()
        try:
            result = await call(backend, target, replace(ctx, trace=attempt))
        except asyncio.CancelledError as error:
            # The deadline's timeout, or the client going away.
            timed_out = ctx.deadline is not None and time.monotonic() >= ctx.deadline
            attempt.failed(error, "timeout" if timed_out else "cancelled")
            raise
        except BaseException as error:
            attempt.failed(error)
            raise
        finally:
            span.detach(token)
        span.chosen(target.deployment)
        return _ended_with(attempt, result)

    return traced


def _ended_with(attempt: AttemptSpan, result: T) -> T:
    """An answer ends the attempt now; a started stream when it ends."""
    if isinstance(result, wire.ChatCompletion | wire.Completion):
        attempt.answered(result)
        return result
    if isinstance(result, wire.EmbeddingList):
        attempt.embedded(result)
        return result
    if isinstance(result, Relayed):
        # The cheap relay's stream: its relay read what the span records.
        attempt.first_chunk = time.monotonic() - attempt.started
        result.on_end.append(attempt.relayed)
        return result
    if isinstance(result, AsyncIterator):
        # The first chunk is in: the stream was primed by the call.
        attempt.first_chunk = time.monotonic() - attempt.started
        watched: T = attempt.watch(result)  # type: ignore[assignment]
        return watched
    return result
