"""The request pipeline: decode, check limits, resolve the model, rank the
deployments, and try them in order until one answers.

Streams are primed before the response starts: the first chunk is awaited
here, so anything that fails before the first byte (a full queue, a prompt too
long for the context) still becomes a proper HTTP status, and the next
deployment can be tried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import msgspec

from gateway import wire
from gateway.catalog import Catalog, ModelEntry
from gateway.contract import (
    AnyChunk,
    AnyRequest,
    Backend,
    Candidate,
    CandidateStats,
    RankedCandidate,
    RequestContext,
    Target,
)
from gateway.decisions import CandidateView, DecisionLog, RouteDecision, RouteTrace, StatsView
from gateway.errors import (
    EngineOverloadedError,
    GatewayError,
    InvalidRequestError,
    UpstreamError,
)
from gateway.hooks import HookChain, HookFailedError
from gateway.lora.registry import AdapterRegistry, Addressed
from gateway.lora.stats import AdapterUsage
from gateway.rules import select_pool
from gateway.settings import LimitSettings
from gateway.stats import StatsTable, serves_adapters
from gateway.streams import closing

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_FIELD = re.compile(r"field `(?P<field>[^`]+)`")

T = TypeVar("T")
RequestT = TypeVar("RequestT", wire.ChatCompletionRequest, wire.CompletionRequest)


ChunkT = TypeVar("ChunkT", wire.ChatCompletionChunk, wire.Completion)
AnswerT = TypeVar("AnswerT", wire.ChatCompletion, wire.Completion)
_RETRYABLE = (EngineOverloadedError, UpstreamError)


def _param_of(message: str) -> tuple[str, str | None]:
    """msgspec's "Expected `int`, got `str` - at `$.n`" -> (text, "n")."""
    match = _PATH.search(message)
    path = match.group("path").lstrip(".") if match else ""
    text = message[: match.start()] if match else message
    field = _FIELD.search(text)
    if field is not None:
        path = f"{path}.{field.group('field')}" if path else field.group("field")
    return text, path or None


def decode(body: bytes, decoder: msgspec.json.Decoder[RequestT]) -> RequestT:
    if not body:
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as error:
        text, param = _param_of(str(error))
        if text.startswith("Object contains unknown field"):
            text = f"Unrecognized request argument supplied: {param}"
        raise InvalidRequestError(f"{text} (at {param or 'the body'})", param=param) from None
    except msgspec.DecodeError as error:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {error}"
        ) from None


def _at_most(value: int, limit: int, param: str, what: str) -> None:
    if value > limit:
        raise InvalidRequestError(
            f"{param}: at most {limit} {what} allowed, got {value}", param=param
        )


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
    ) -> None:
        self.limits = limits
        self.catalog = catalog
        self.backends = backends
        self.adapters = adapters
        self.hooks = hooks or HookChain(())
        self.stats = StatsTable()
        # Requests and tokens per adapter name, for metrics and accounting.
        self.adapter_usage: dict[str, AdapterUsage] = {}
        self.decision_log = decision_log
        self.record_prompts = record_prompts

    # --------------------------------------------------------------- decoding

    def decode_chat(self, body: bytes) -> wire.ChatCompletionRequest:
        request = decode(body, wire.chat_request_decoder)
        limits = self.limits
        if not request.messages:
            raise InvalidRequestError(
                "messages must contain at least one message", param="messages"
            )
        _at_most(len(request.messages), limits.max_messages, "messages", "messages")
        _at_most(len(request.tools or ()), limits.max_tools, "tools", "tools")
        self._check_common(request)
        return request

    def decode_completion(self, body: bytes) -> wire.CompletionRequest:
        request = decode(body, wire.completion_request_decoder)
        self._check_common(request)
        return request

    def _check_common(self, request: wire.ChatCompletionRequest | wire.CompletionRequest) -> None:
        limits = self.limits
        _at_most(request.n or 1, limits.max_n, "n", "choices")
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        _at_most(len(stops), limits.max_stop_sequences, "stop", "stop sequences")
        _at_most(len(request.logit_bias or {}), limits.max_logit_bias, "logit_bias", "entries")
        if request.stream_options is not None and not request.stream:
            raise InvalidRequestError(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )

    # ---------------------------------------------------------------- serving

    async def chat(
        self,
        request: wire.ChatCompletionRequest,
        ctx: RequestContext,
        trace: RouteTrace | None = None,
    ) -> wire.ChatCompletion:
        return await self._answer(
            request, ctx, trace, wire.ChatCompletion, lambda b, r, t: b.chat(r, t, ctx)
        )

    async def chat_stream(
        self,
        request: wire.ChatCompletionRequest,
        ctx: RequestContext,
        trace: RouteTrace | None = None,
    ) -> AsyncIterator[wire.ChatCompletionChunk]:
        return await self._stream(
            request,
            ctx,
            trace,
            wire.ChatCompletion,
            wire.ChatCompletionChunk,
            _chat_as_chunks,
            lambda b, r, t: b.chat_stream(r, t, ctx),
        )

    async def completion(
        self,
        request: wire.CompletionRequest,
        ctx: RequestContext,
        trace: RouteTrace | None = None,
    ) -> wire.Completion:
        return await self._answer(
            request, ctx, trace, wire.Completion, lambda b, r, t: b.completion(r, t, ctx)
        )

    async def completion_stream(
        self,
        request: wire.CompletionRequest,
        ctx: RequestContext,
        trace: RouteTrace | None = None,
    ) -> AsyncIterator[wire.Completion]:
        return await self._stream(
            request,
            ctx,
            trace,
            wire.Completion,
            wire.Completion,
            _completion_as_chunks,
            lambda b, r, t: b.completion_stream(r, t, ctx),
        )

    async def _answer(
        self,
        request: RequestT,
        ctx: RequestContext,
        trace: RouteTrace | None,
        kind: type[AnswerT],
        call: Callable[[Backend, RequestT, Target], Awaitable[AnswerT]],
    ) -> AnswerT:
        """Request hooks, the attempts, response hooks: one non-streamed answer."""
        try:
            early = await self.hooks.on_request(request, ctx)
            if isinstance(early, kind):
                return early
            checked = _expect(early, type(request))
            response = await self._attempts(
                checked, ctx, lambda backend, target: call(backend, checked, target), trace
            )
            return _expect(await self.hooks.on_response(checked, response, ctx), kind)
        except GatewayError as error:
            # The error hooks hear of every error on its way to the client.
            await self.hooks.on_error(request, error, ctx)
            raise

    async def _stream(
        self,
        request: RequestT,
        ctx: RequestContext,
        trace: RouteTrace | None,
        kind: type[AnswerT],
        chunk_kind: type[ChunkT],
        as_chunks: Callable[[AnswerT], AsyncIterator[ChunkT]],
        call: Callable[[Backend, RequestT, Target], AsyncIterator[ChunkT]],
    ) -> AsyncIterator[ChunkT]:
        """Request hooks, the attempts (primed: failures before the first byte
        still move on), stream hooks, usage shaping: one streamed answer."""
        try:
            early = await self.hooks.on_request(request, ctx)
            if isinstance(early, kind):
                chunks = as_chunks(early)
                checked = request
            else:
                checked = _expect(early, type(request))
                chunks = await self._attempts(
                    checked,
                    ctx,
                    lambda backend, target: _primed(call(backend, checked, target)),
                    trace,
                )
            if self.hooks.rewrites_streams:
                # Checked: a stream hook may hand back anything.
                chunks = _only(self.hooks.on_stream(checked, chunks, ctx), chunk_kind)
            return _shape_usage(chunks, _wants_usage(checked))
        except GatewayError as error:
            # The error hooks hear of every error on its way to the client.
            await self.hooks.on_error(request, error, ctx)
            raise

    async def _attempts(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        call: Callable[[Backend, Target], Awaitable[T]],
        trace: RouteTrace | None,
    ) -> T:
        """Try the ranked deployments, then the fallback models, then again
        after a backoff; move on only when a deployment is overloaded or
        unreachable, before anything reached the client."""
        addressed = self.adapters.address(request.model) if self.adapters else None
        entry = self.catalog.resolve(addressed.base_model if addressed else request.model)
        # An adapter fine-tunes one base model: other models are no fallback.
        fallbacks = () if addressed else entry.fallbacks
        chain = [entry, *(self.catalog.resolve(name) for name in fallbacks)]
        deadline = time.monotonic() + entry.timeout_seconds if entry.timeout_seconds else None
        first_ranking, seen = await self._ranking(entry, request, ctx, addressed)
        decision = self._decision(request, ctx, entry.policy_name, first_ranking, seen, trace)
        failure: GatewayError | None = None
        try:
            for round_number in range(entry.retry.rounds + 1):
                if round_number:
                    await self._back_off(entry, failure, deadline)
                for position, model in enumerate(chain):
                    ranked = (
                        first_ranking
                        if round_number == 0 and position == 0
                        else (await self._ranking(model, request, ctx, addressed))[0]
                    )
                    for choice in ranked:
                        outcome = await self._attempt(choice.candidate, call, deadline, decision)
                        if isinstance(outcome, GatewayError):
                            failure = outcome
                            continue
                        return outcome
            raise failure or EngineOverloadedError(f"no deployment of {request.model} is available")
        finally:
            self._settle(decision, trace)

    async def _ranking(
        self,
        entry: ModelEntry,
        request: AnyRequest,
        ctx: RequestContext,
        addressed: Addressed | None,
    ) -> tuple[list[RankedCandidate], dict[str, CandidateStats]]:
        """The policy's ranking, and the stats snapshot it saw (recorded as is)."""
        ready = {name: (await b.health()).ready for name, b in self.backends.items()}
        pool = select_pool(entry.candidates, entry.rules, request, ctx)
        if addressed is not None:
            pool = self._with_adapters(pool, addressed)
        candidates = self.stats.available(pool, ready)
        stats = self.stats.snapshot(candidates, self.backends)
        return entry.policy.rank(request, ctx, candidates, stats), stats

    def _with_adapters(self, pool: Sequence[Candidate], addressed: Addressed) -> list[Candidate]:
        """The deployments whose engine can apply ``addressed``, each aimed at it."""
        able = [
            candidate
            for candidate in pool
            if _lora_able(self.backends[candidate.backend], addressed.needs_stacking)
        ]
        if not able:
            what = "a stack of adapters or a scale" if addressed.needs_stacking else "an adapter"
            engines = ", ".join(sorted({c.backend for c in pool})) or "none"
            raise InvalidRequestError(
                f"model `{addressed.name}`: {what} needs an engine that can apply it, and no "
                f"deployment of {addressed.base_model} can (its backends: {engines})",
                param="model",
            )
        return [
            dataclasses.replace(
                candidate,
                target=dataclasses.replace(
                    candidate.target, model=addressed.name, adapters=addressed.uses
                ),
            )
            for candidate in able
        ]

    async def _attempt(
        self,
        candidate: Candidate,
        call: Callable[[Backend, Target], Awaitable[T]],
        deadline: float | None,
        decision: RouteDecision,
    ) -> T | GatewayError:
        """One call to one deployment: its result, or the retryable error."""
        deployment = candidate.target.deployment
        started = time.monotonic()
        self.stats.started(deployment)
        try:
            if deadline is None:
                result = await call(self.backends[candidate.backend], candidate.target)
            else:
                async with asyncio.timeout(max(deadline - started, 0.0)):
                    result = await call(self.backends[candidate.backend], candidate.target)
        except TimeoutError:
            decision.attempts.append((deployment, "timeout"))
            return UpstreamError(f"{decision.model}: no answer within its timeout")
        except _RETRYABLE as error:
            decision.attempts.append((deployment, error.code or error.error_type))
            if isinstance(error, UpstreamError):
                # Unreachable or broken: cool down. A full queue is load, not
                # ill health: just move on.
                self.stats.failed(deployment)
            return error
        except GatewayError as error:
            decision.attempts.append((deployment, error.code or error.error_type))
            raise
        finally:
            self.stats.finished(deployment)
        self.stats.succeeded(deployment)
        decision.attempts.append((deployment, "ok"))
        decision.chosen = deployment
        return self._measured(result, candidate.target, started)

    def _measured(self, result: T, target: Target, started: float) -> T:
        """Feed the answer's timing to the stats the latency policy reads, and
        its usage to the adapters' counters."""
        deployment = target.deployment
        account = self._adapter_accounting(target)
        if isinstance(result, wire.ChatCompletion | wire.Completion):
            usage = result.usage if isinstance(result.usage, wire.Usage) else None
            tokens = usage.completion_tokens if usage else 0
            self.stats.observe(deployment, None, time.monotonic() - started, tokens)
            if account is not None:
                account(usage)
            return result
        chunks: AsyncIterator[AnyChunk] = result  # type: ignore[assignment]
        return _timed(chunks, self.stats, deployment, started, account)  # type: ignore[return-value]

    def _adapter_accounting(self, target: Target) -> Callable[[wire.Usage | None], None] | None:
        if not target.adapters:
            return None
        entries = [
            self.adapter_usage.setdefault(use.adapter.name, AdapterUsage())
            for use in target.adapters
        ]

        def account(usage: wire.Usage | None) -> None:
            for entry in entries:
                entry.requests += 1
                if usage is not None:
                    entry.prompt_tokens += usage.prompt_tokens
                    entry.completion_tokens += usage.completion_tokens

        return account

    async def _back_off(
        self, entry: ModelEntry, failure: GatewayError | None, deadline: float | None
    ) -> None:
        """Sleep before another round: jittered, at least what Retry-After
        asked (capped), and never past the deadline."""
        retry_after = float((failure.headers if failure else {}).get("Retry-After", 0) or 0)
        pause = max(entry.retry.backoff_seconds * (0.5 + random.random()), retry_after)
        pause = min(pause, entry.retry.retry_after_cap_seconds)
        if deadline is not None:
            pause = min(pause, max(deadline - time.monotonic(), 0.0))
        await asyncio.sleep(pause)

    def _decision(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        policy: str,
        ranked: list[RankedCandidate],
        stats: Mapping[str, CandidateStats],
        trace: RouteTrace | None,
    ) -> RouteDecision:
        candidates = [
            CandidateView(
                deployment=r.candidate.target.deployment,
                backend=r.candidate.backend,
                engine_model=r.candidate.target.engine_model,
                weight=r.candidate.weight,
                score=r.score,
                reason=r.reason,
                stats=_stats_view(stats.get(r.candidate.target.deployment, CandidateStats())),
            )
            for r in ranked
        ]
        return RouteDecision(
            request_id=ctx.request_id,
            model=request.model,
            policy=policy,
            endpoint=trace.endpoint if trace else "",
            body_bytes=trace.body_bytes if trace else 0,
            stream=bool(request.stream),
            candidates=candidates,
            started_at=time.time(),
            prompt=_prompt_text(request) if self.record_prompts else None,
        )

    def _settle(self, decision: RouteDecision, trace: RouteTrace | None) -> None:
        last = decision.attempts[-1][1] if decision.attempts else "no_candidates"
        decision.outcome = last
        decision.latency = time.time() - decision.started_at
        if trace is not None:
            trace.decision = decision
        if self.decision_log is not None:
            self.decision_log.record(decision)


def _lora_able(backend: Backend, stacking: bool) -> bool:
    return serves_adapters(backend) and (backend.can_stack() or not stacking)


def _stats_view(stats: CandidateStats) -> StatsView:
    return StatsView(
        in_flight=stats.in_flight,
        queue_depth=stats.queue_depth,
        ewma_ttft=stats.ewma_ttft,
        ewma_token_time=stats.ewma_token_time,
    )


def _prompt_text(request: AnyRequest) -> str:
    if isinstance(request, wire.ChatCompletionRequest):
        return wire.encoder.encode(request.messages).decode()
    prompt = request.prompt
    return prompt if isinstance(prompt, str) else wire.encoder.encode(prompt).decode()


def _expect(value: object, kind: type[T]) -> T:
    if not isinstance(value, kind):
        raise HookFailedError(
            f"A hook returned {type(value).__name__} where {kind.__name__} was expected."
        )
    return value


async def _only(chunks: AsyncIterator[AnyChunk], kind: type[T]) -> AsyncIterator[T]:
    async with closing(chunks):
        async for chunk in chunks:
            yield _expect(chunk, kind)


async def _chat_as_chunks(
    response: wire.ChatCompletion,
) -> AsyncIterator[wire.ChatCompletionChunk]:
    """A whole answer from a hook (a cache hit), as the chunks of a stream."""

    def chunk(choices: list[wire.ChunkChoice]) -> wire.ChatCompletionChunk:
        return wire.ChatCompletionChunk(
            id=response.id,
            object="chat.completion.chunk",
            created=response.created,
            model=response.model,
            choices=choices,
        )

    for choice in response.choices:
        message = choice.message
        delta = wire.ChunkDelta(role="assistant", content=message.content)
        if message.tool_calls:
            delta.tool_calls = [
                wire.whole_call_delta(i, c) for i, c in enumerate(message.tool_calls)
            ]
        yield chunk(
            [wire.ChunkChoice(index=choice.index, delta=delta, logprobs=None, finish_reason=None)]
        )
        end = wire.ChunkChoice(
            index=choice.index,
            delta=wire.ChunkDelta(),
            logprobs=None,
            finish_reason=choice.finish_reason,
        )
        yield chunk([end])
    last = chunk([])
    last.usage = response.usage
    yield last


async def _completion_as_chunks(response: wire.Completion) -> AsyncIterator[wire.Completion]:
    # A copy: the hook may have handed out an object it keeps (a cache entry).
    yield msgspec.structs.replace(response, usage=msgspec.UNSET)
    usage = response.usage
    yield wire.Completion(
        id=response.id,
        object="text_completion",
        created=response.created,
        model=response.model,
        choices=[],
        usage=usage,
    )


async def _timed(
    chunks: AsyncIterator[AnyChunk],
    stats: StatsTable,
    deployment: str,
    started: float,
    account: Callable[[wire.Usage | None], None] | None = None,
) -> AsyncIterator[AnyChunk]:
    """Pass a stream through, noting its first content and its usage, also
    when the client goes away or the stream breaks half-way."""
    first_token: float | None = None
    usage: wire.Usage | None = None
    tokens = 0
    try:
        # aclosing: a client that goes away closes this iterator, and the close
        # must reach the backend's stream now (to stop the generation), not at GC.
        async with closing(chunks):
            async for chunk in chunks:
                if first_token is None and _has_content(chunk):
                    first_token = time.monotonic() - started
                if isinstance(chunk.usage, wire.Usage):
                    usage = chunk.usage
                    tokens = usage.completion_tokens
                yield chunk
    finally:
        stats.observe(deployment, first_token, time.monotonic() - started, tokens)
        if account is not None:
            account(usage)


def _has_content(chunk: AnyChunk) -> bool:
    if isinstance(chunk, wire.Completion):
        return any(choice.text for choice in chunk.choices)
    return any(
        isinstance(choice.delta.content, str) and choice.delta.content for choice in chunk.choices
    )


def _wants_usage(request: wire.ChatCompletionRequest | wire.CompletionRequest) -> bool:
    return request.stream_options is not None and request.stream_options.include_usage


async def _primed(chunks: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first chunk now; return an iterator that replays it."""
    first = await anext(chunks)

    async def replay() -> AsyncIterator[T]:
        async with closing(chunks):
            yield first
            async for chunk in chunks:
                yield chunk

    return replay()


async def _shape_usage(chunks: AsyncIterator[ChunkT], include_usage: bool) -> AsyncIterator[ChunkT]:
    """Backends always end with a usage chunk; show it only if asked, and
    then, as OpenAI does, put ``"usage": null`` on every other chat chunk (a
    text completion's usage is an object or absent in OpenAI's description)."""
    async with closing(chunks):
        async for chunk in chunks:
            if isinstance(chunk.usage, wire.Usage) and not chunk.choices:
                if include_usage:
                    yield chunk
                continue
            if include_usage and isinstance(chunk, wire.ChatCompletionChunk):
                chunk.usage = None
            yield chunk
