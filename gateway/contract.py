"""The public contract between nomoat's core and its plugins.

Everything a plugin may rely on is named in ``__all__`` (a test guards it), and
the docstrings below are the specification. A plugin is found through the
entry-point group ``nomoat.plugins``: the entry point names a
:class:`PluginManifest`, which lists the backend types, routing policies and
hooks the plugin offers, each with a pydantic model for its configuration. Installing a
plugin only makes its names available; the configuration file decides which
ones run. The built-in llama.cpp backend and policies register this same way.

Errors: a backend or policy rejects a request by raising one of the typed errors
of :mod:`gateway.errors` (re-exported here); anything else that escapes is
reported to the client as a 500 without internals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from gateway.accounting.principal import Budget, Principal, RateLimits, Team
from gateway.errors import (
    AuthenticationError,
    ContextLengthExceededError,
    EngineOverloadedError,
    GatewayError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    UnsupportedFeatureError,
    UpstreamError,
)
from gateway.wire import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DeveloperMessage,
    EmbeddingList,
    EmbeddingRequest,
    Message,
    PromptTokensDetails,
    SystemMessage,
    TextPart,
    ToolMessage,
    Usage,
    UserMessage,
)

__all__ = [
    "Adapter",
    "AdapterCounters",
    "AdapterUse",
    "AnyChunk",
    "AnyRequest",
    "AnyResponse",
    "AssistantMessage",
    "AttemptTrace",
    "AttributeValue",
    "AuthenticationError",
    "Backend",
    "BackendHealth",
    "BackendType",
    "Budget",
    "BusyClock",
    "Candidate",
    "CandidateStats",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "Completion",
    "CompletionRequest",
    "ComputeMeter",
    "ContextLengthExceededError",
    "DeveloperMessage",
    "EmbeddingList",
    "EmbeddingRequest",
    "EngineLoad",
    "EngineOverloadedError",
    "ErrorHook",
    "GatewayError",
    "HookType",
    "InternalError",
    "InvalidRequestError",
    "Message",
    "ModelCapabilities",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PluginManifest",
    "PolicyType",
    "Principal",
    "RankedCandidate",
    "RateLimitError",
    "RateLimits",
    "ReportsAdapterSlots",
    "ReportsLoad",
    "RequestContext",
    "RequestHook",
    "ResponseHook",
    "RoutingPolicy",
    "StreamHook",
    "SupportsEmbeddings",
    "SupportsLoRA",
    "SystemMessage",
    "Target",
    "Team",
    "TextPart",
    "ToolMessage",
    "UnsupportedFeatureError",
    "UpstreamError",
    "Usage",
    "UsageReport",
    "UserMessage",
    "message_role",
]

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def message_role(message: Message) -> str:
    """A chat message's ``role`` ("system", "user", ...): in the wire types it
    is the tag that picks the message's class, not an attribute."""
    return str(type(message).__struct_config__.tag)


class ComputeMeter:
    """The busy time self-hosted nodes spent on one request, in seconds per
    backend name. A backend whose node has a price per hour adds to it as it
    works for the request (the embedded engine from each batch step, on its
    own thread; an edge node from what the node reports), and the gateway
    prices it when the request ends (docs/accounting.md)."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, backend: str, seconds: float) -> None:
        # One writer per backend (its engine's thread, or the event loop),
        # so the read-add-write needs no lock.
        self.seconds[backend] = self.seconds.get(backend, 0.0) + seconds


class UsageReport:
    """The tokens an engine really spent on one request, for when its answer
    never carried a usage (a stream the client cut, a generation stopped).

    A backend that knows its exact counts calls :meth:`expect` when it
    starts work whose usage it will report, and :meth:`deliver` (on the
    event loop) once that work has ended, however it ended: the gateway
    waits, briefly and without blocking, for every expected report before
    it prices and records a request that has no usage of its own
    (docs/accounting.md). Several deliveries add up (each attempt's work)."""

    __slots__ = ("_waiters", "pending", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        # Reports expected and not yet delivered.
        self.pending = 0
        self._waiters: list[Callable[[], None]] = []

    def expect(self) -> None:
        self.pending += 1

    def deliver(self, usage: Usage) -> None:
        self.usage = usage if self.usage is None else _added(self.usage, usage)
        self.pending = max(self.pending - 1, 0)
        if not self.pending:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter()

    def withdraw(self) -> None:
        """An expected report will not come after all (a node that could not
        tell): the request is recorded with what the gateway counted."""
        self.pending = max(self.pending - 1, 0)
        if not self.pending:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter()

    def when_delivered(self, waiter: Callable[[], None]) -> None:
        """Call ``waiter`` once nothing is pending (now, if nothing is)."""
        if self.pending:
            self._waiters.append(waiter)
        else:
            waiter()


def _added(a: Usage, b: Usage) -> Usage:
    cached = sum(
        (u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0
        for u in (a, b)
    )
    return Usage(
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        total_tokens=a.total_tokens + b.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


@runtime_checkable
class BusyClock(Protocol):
    """A backend that knows how long its node has been busy: the total, in
    seconds, since the backend started, never decreasing. The node's idle
    cost is its price per hour over the rest of the time."""

    def busy_seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the gateway knows about one client request, besides its body.

    ``request_id`` is also the ``id`` of the response. ``api_key_id`` names the
    authenticated key (a short, non-secret fingerprint) or is ``None`` when the
    gateway runs without keys. ``deadline`` is a ``time.monotonic()`` instant
    after which the gateway abandons the request (the model's
    ``timeout_seconds``; set once the model is resolved: hooks that run
    before see ``None``), or ``None`` for no deadline.

    ``principal`` is who is asking, as the key says (:class:`Principal`):
    for a managed key (``/admin/keys``) its id (also ``api_key_id``), name,
    :class:`Team`, allowed models, :class:`Budget`, :class:`RateLimits` and
    expiry; for a static key of ``server.api_key_hashes`` only its
    fingerprint as ``key_id``. ``None`` when the gateway runs without keys
    (and in contexts built by older code: a plugin must accept ``None``).
    """

    request_id: str
    created: int
    api_key_id: str | None = None
    deadline: float | None = None
    # Request headers, names lowercased (for policies keyed on a header, such
    # as session affinity). Credentials are never included.
    headers: Mapping[str, str] = field(default_factory=dict)
    # The span of this attempt when tracing is on (set per attempt, for
    # backends); None when it is off, so a backend does nothing for it.
    trace: AttemptTrace | None = None
    principal: Principal | None = None
    # Where a self-hosted backend reports the busy time it spent on this
    # request (set by the pipeline; None outside it: report nothing).
    compute: ComputeMeter | None = None
    # Where a backend that counts a request's tokens exactly (the embedded
    # engine) reports them when its answer carries no usage (a cut stream);
    # set by the pipeline, None outside it: report nothing.
    usage_report: UsageReport | None = None


# A span attribute's value, as OpenTelemetry takes it.
AttributeValue = str | bool | int | float | Sequence[str] | Sequence[int] | Sequence[float]


class AttemptTrace(Protocol):
    """One attempt's span, as a backend sees it (``RequestContext.trace``).

    A backend that calls an HTTP upstream sends :meth:`headers` with the
    request, so the upstream's spans join the trace (W3C ``traceparent``
    and ``tracestate``) and its logs carry the request id. An in-process
    engine reports its phases (queue wait, prompt evaluation, decoding,
    adapter loads) with :meth:`phase` once they are over. Attribute names
    are in :mod:`gateway.telemetry.semconv`.
    """

    def headers(self) -> Mapping[str, str]:
        """What to add to the upstream request's headers."""
        ...

    def record(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Set attributes on the attempt's span (the upstream's own model
        name, ``server.address``, tokens actually generated...)."""
        ...

    def phase(
        self, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, AttributeValue]
    ) -> None:
        """A child span of the attempt that already happened, from
        ``start_ns`` to ``end_ns`` (``time.time_ns()`` instants)."""
        ...


@dataclass(frozen=True, slots=True)
class Target:
    """Where an attempt goes: the model the client named, and the deployment.

    ``model`` is the client-facing name (echoed in responses); ``engine_model``
    is the name the engine itself knows the model by; ``deployment`` is a
    stable id ``"<model>/<index>"`` used in stats and logs.
    """

    model: str
    engine_model: str
    deployment: str
    # LoRA adapters to apply, with their scales (empty: the base model).
    # Several are a stack, which only a backend with ``can_stack`` serves.
    adapters: tuple[AdapterUse, ...] = ()


@dataclass(frozen=True, slots=True)
class Adapter:
    """A registered LoRA adapter, its files verified against ``sha256``.

    ``path`` is where the gateway reads it; ``relative_path`` is the same place
    relative to the adapter root, for engines that see the root elsewhere (a
    vLLM host's shared volume). ``format`` is "peft" (a folder with
    ``adapter_config.json`` and ``adapter_model.safetensors``) or "gguf".
    """

    name: str
    base_model: str
    sha256: str
    format: str
    path: Path
    relative_path: str


@dataclass(slots=True)
class AdapterCounters:
    """What one engine did with one adapter (for metrics)."""

    loads: int = 0
    # Unloads, for space or because the adapter was removed.
    evictions: int = 0
    load_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class AdapterUse:
    """One adapter of a request, with its scale (1.0: as trained)."""

    adapter: Adapter
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class ModelCapabilities:
    """What an engine can do for one model. Before ranking, the pipeline
    leaves out every deployment that lacks a feature the request uses (tools,
    a JSON ``response_format``, logprobs, ``n`` above ``max_n``), so a policy
    never sees it; when no deployment is left, the client gets a 400 naming
    the feature and the model."""

    context_length: int
    tools: bool = False
    # response_format json_object and json_schema.
    json_schema: bool = False
    logprobs: bool = False
    # The most choices (``n``) one request may ask for.
    max_n: int = 1


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """``ready`` is true when the backend can serve now; ``detail`` says why not."""

    ready: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """An engine's own view of its load: the signals routing will weigh.

    ``decoded_tokens_total`` is the engine's own count of tokens it evaluated
    (prompt and generated) since it started, where the engine reports one.
    """

    running: int
    waiting: int
    decoded_tokens_total: int | None = None
    # Share of the KV cache in use, 0 to 1, where the engine reports it.
    kv_cache_usage: float | None = None


@runtime_checkable
class ReportsLoad(Protocol):
    """Optional backend capability: report :class:`EngineLoad` without I/O."""

    def load(self) -> EngineLoad: ...


@runtime_checkable
class Backend(Protocol):
    """One engine instance the gateway can call: the seam to every engine.

    Foreign exceptions (an HTTP client's, a C library's) are translated into
    :class:`GatewayError` subclasses inside the backend, never above it.

    Cancellation: when the client goes away, the gateway cancels the task
    awaiting :meth:`chat` or closes the iterator of :meth:`chat_stream`; the
    backend must then stop the generation it started (free the slot, abort the
    upstream request) promptly.

    Streams: the iterators yield OpenAI chunks. The last chunk of every stream
    carries ``usage`` and no choices, whether or not the client asked for
    usage: the gateway needs it for accounting and drops it when unwanted.
    """

    name: str

    def capabilities(self, engine_model: str) -> ModelCapabilities:
        """What ``engine_model`` supports on this backend. Cheap; no I/O."""
        ...

    async def chat(
        self, request: ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> ChatCompletion: ...

    def chat_stream(
        self, request: ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[ChatCompletionChunk]: ...

    async def completion(
        self, request: CompletionRequest, target: Target, ctx: RequestContext
    ) -> Completion: ...

    def completion_stream(
        self, request: CompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[Completion]: ...

    async def models(self) -> Sequence[str]:
        """The engine's own names for the models it serves now."""
        ...

    async def health(self) -> BackendHealth:
        """Whether the backend can serve. Must never spend tokens."""
        ...

    async def aclose(self) -> None:
        """Release everything; called once, at shutdown."""
        ...


@dataclass(frozen=True, slots=True)
class BackendType(Generic[ConfigT]):
    """A kind of backend, selected in the config by ``type = "<key>"``.

    ``config_model`` validates the rest of the ``[backends.NAME]`` table; it
    should forbid unknown keys (``model_config = ConfigDict(extra="forbid")``).
    ``await factory(name, config)`` builds and starts the backend named ``name``.
    """

    config_model: type[ConfigT]
    factory: Callable[[str, ConfigT], Awaitable[Backend]]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One deployment a request could go to."""

    target: Target
    backend: str
    weight: float = 1.0
    # What a million prompt (input) and completion (output) tokens are
    # charged on this deployment, in USD (its configured prices).
    input_usd_per_million: float = 0.0
    output_usd_per_million: float = 0.0
    # Requests in flight here at most (None: no limit of the gateway's own);
    # a full deployment is left out of the ranking.
    max_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class CandidateStats:
    """A snapshot of one candidate's state, as the policy sees it.

    Fields are filled by the gateway where it knows them; ``None`` means not
    known (yet). Times are seconds.
    """

    in_flight: int = 0
    queue_depth: int | None = None
    ewma_ttft: float | None = None
    ewma_token_time: float | None = None
    # The engine's own running count, where it reports one.
    running: int | None = None
    # Share of the engine's KV cache in use (0 to 1), where it reports one.
    kv_cache_usage: float | None = None
    # Names of the LoRA adapters the engine holds now (or is loading), where it has any.
    adapters_loaded: frozenset[str] = frozenset()
    # How many adapters the engine can hold at once, where known: once it
    # holds that many, loading another evicts one.
    adapter_slots: int | None = None


@dataclass(frozen=True, slots=True)
class RankedCandidate:
    """A candidate with the score the policy gave it (higher is better) and a
    short human-readable reason, so every decision can be explained."""

    candidate: Candidate
    score: float
    reason: str


@runtime_checkable
class RoutingPolicy(Protocol):
    """Orders the healthy candidates for one request, best first.

    ``rank`` is synchronous and must not block: it runs on the event loop for
    every request. The gateway tries the candidates in the returned order;
    candidates left out are not tried.

    ``rank`` may keep state in the instance (a round-robin counter): a dry
    run (``POST /admin/route/explain``) ranks a ``copy.deepcopy`` of it, so a
    policy holding something that cannot be copied defines ``__deepcopy__``.
    Replay (``nomoat replay``) feeds a fresh instance the recorded calls in
    their order; a policy drawing random numbers seeds them from the request
    (``ctx.request_id``) so that its choices replay.
    """

    def rank(
        self,
        request: ChatCompletionRequest | CompletionRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]: ...


AnyRequest = ChatCompletionRequest | CompletionRequest
AnyResponse = ChatCompletion | Completion
AnyChunk = ChatCompletionChunk | Completion


@runtime_checkable
class RequestHook(Protocol):
    """Runs before the model is resolved, in config order.

    Returns the request (the same object, or a changed copy: for example with
    a new ``model`` chosen by a classifier) to continue, or a complete
    response to answer at once (for example a cache hit); later hooks and the
    backend are then skipped. Rejects the request by raising a
    :class:`GatewayError` (its status and message reach the client as they are).
    """

    async def on_request(
        self, request: AnyRequest, ctx: RequestContext
    ) -> AnyRequest | AnyResponse: ...


@runtime_checkable
class ResponseHook(Protocol):
    """Runs after a non-streamed response, in reverse config order; returns
    the response, possibly changed."""

    async def on_response(
        self, request: AnyRequest, response: AnyResponse, ctx: RequestContext
    ) -> AnyResponse: ...


@runtime_checkable
class StreamHook(Protocol):
    """Wraps the chunk iterator of a streamed response; must yield chunks as
    they arrive (not buffer the whole stream) and may change or drop them."""

    def on_stream(
        self, request: AnyRequest, chunks: AsyncIterator[AnyChunk], ctx: RequestContext
    ) -> AsyncIterator[AnyChunk]: ...


@runtime_checkable
class ErrorHook(Protocol):
    """Told about every error reported to a client, exactly once: refused
    keys, undecodable bodies (then ``request`` is ``None``), limits, routing
    and upstream failures, and errors that end a stream after its first byte.
    Cannot change it. (A client that went away receives no error: no call.)"""

    async def on_error(
        self, request: AnyRequest | None, error: GatewayError, ctx: RequestContext
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class HookType(Generic[ConfigT]):
    """A hook, enabled by a ``[[hooks]]`` entry with ``type = "<key>"``.

    ``factory(config)`` returns one object implementing any of
    :class:`RequestHook`, :class:`ResponseHook`, :class:`StreamHook`,
    :class:`ErrorHook`; the gateway calls the methods it has.
    """

    config_model: type[ConfigT]
    factory: Callable[[ConfigT], object]


@runtime_checkable
class SupportsLoRA(Protocol):
    """Optional backend capability: LoRA adapters, loaded on demand.

    A backend that has it serves a :class:`Target` with ``adapters``: it loads
    what it lacks (verifying each adapter's sha256 first) before generating,
    and evicts what it has not used for longest when its limit is reached.
    Backends without it are never sent an adapter request.
    """

    def serves_adapters(self) -> bool:
        """Whether this instance can take adapters now (configured for them)."""
        ...

    def can_stack(self) -> bool:
        """Whether one request may apply several adapters at once."""
        ...

    def adapters_loaded(self) -> frozenset[str]:
        """Names of the adapters held now. Cheap; no I/O (routing reads it)."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Forget ``name`` (it was removed from the registry); no error if absent."""
        ...

    def adapter_counters(self) -> Mapping[str, AdapterCounters]:
        """Loads, evictions and load time per adapter name, since start."""
        ...


@runtime_checkable
class SupportsEmbeddings(Protocol):
    """Optional backend capability: ``POST /v1/embeddings``.

    Only models configured with the "embeddings" capability
    (``models.NAME.capabilities``) are sent here, and only to backends that
    have this method and say :meth:`embeds` for the engine model; the
    others are left out of the routing as for a missing feature.
    """

    def embeds(self, engine_model: str) -> bool:
        """Whether ``engine_model`` makes embeddings here. Cheap; no I/O."""
        ...

    async def embed(
        self, request: EmbeddingRequest, target: Target, ctx: RequestContext
    ) -> EmbeddingList:
        """One vector per input, in order, at the model's full size, unit
        length, as floats (``encoding_format`` and ``dimensions`` are the
        gateway's to apply), with ``usage.prompt_tokens`` the tokens the
        engine counted. Rejects an input it cannot take with a 400."""
        ...


@runtime_checkable
class ReportsAdapterSlots(Protocol):
    """Optional capability of a :class:`SupportsLoRA` backend: how many
    adapters it can hold at once (None: not known). No I/O; routing reads it."""

    def adapter_slots(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class PolicyType(Generic[ConfigT]):
    """A routing policy, selected per model by ``policy = "<key>"``."""

    config_model: type[ConfigT]
    factory: Callable[[ConfigT], RoutingPolicy]


@dataclass(frozen=True, slots=True)
class PluginManifest:
    """What a plugin offers. Its entry point in the group ``nomoat.plugins``
    names an instance of this class (or a zero-argument callable returning one)."""

    name: str
    # Any: each component has its own config model (these generics are
    # invariant), so a manifest can list them without casts.
    backends: Mapping[str, BackendType[Any]] = field(default_factory=dict)
    policies: Mapping[str, PolicyType[Any]] = field(default_factory=dict)
    hooks: Mapping[str, HookType[Any]] = field(default_factory=dict)
