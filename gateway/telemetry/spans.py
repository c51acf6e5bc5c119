"""nomoat's spans: one SERVER span per HTTP request (routing events on
it), one span per upstream attempt, the engine's phases below it.

The tree of one request (names from :mod:`gateway.telemetry.semconv`)::

    POST /v1/chat/completions          SERVER, continues the client's traceparent;
    │                                  an event per policy call (the ranking)
    ├── chat smollm2                   CLIENT (HTTP upstream) or INTERNAL
    │   │                              (in-process engine): one per attempt
    │   ├── engine.adapters.load       the engine's phases, when it reports them
    │   ├── engine.queue
    │   ├── engine.prompt
    │   └── engine.decode
    └── chat smollm2                   a retry, or a fallback model

Everything here runs only when tracing is on: the pipeline and the handlers
hold ``None`` instead of these objects otherwise.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway import wire
from gateway.contract import AnyRequest, AttributeValue, Candidate
from gateway.errors import GatewayError
from gateway.streams import closing, has_content
from gateway.telemetry import semconv as names
from gateway.telemetry.attributes import (
    AnyAnswer,
    StreamText,
    error_type,
    input_messages,
    output_messages,
    request_attributes,
    usage_attributes,
)
from gateway.telemetry.recorder import RecordedSpan, Recorder

if TYPE_CHECKING:
    from gateway.relay import ChunkRelay

T = TypeVar("T")
# The propagator is W3C Trace Context only (traceparent and tracestate):
# what vLLM and nomoat edge nodes read.
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")


def _status_of(error: BaseException) -> int:
    return error.status_code if isinstance(error, GatewayError) else 500


class Tracing:
    """The tracer and what spans need to know of the backends.

    ``providers`` maps each backend name to its ``gen_ai.provider.name``;
    ``in_process`` names the backends whose engine runs in this process (their
    attempt spans are INTERNAL, the others CLIENT, as the conventions ask).
    ``capture_content``: record prompts and answers (opt-in attributes).
    ``processors``: the provider's span processors, as given to its
    constructor (``active_span_processor``); see recorder.py.
    """

    def __init__(
        self,
        provider: TracerProvider,
        *,
        processors: SpanProcessor | None = None,
        capture_content: bool = False,
        providers: Mapping[str, str] | None = None,
        in_process: frozenset[str] = frozenset(),
    ) -> None:
        self.tracer = provider.get_tracer(names.INSTRUMENTATION_SCOPE, schema_url=names.SCHEMA_URL)
        # nomoat's own spans: the provider's sampler, ids, resource and
        # processors, without the SDK's Span objects (see recorder.py).
        self.recorder = Recorder(
            provider,
            InstrumentationScope(names.INSTRUMENTATION_SCOPE, schema_url=names.SCHEMA_URL),
            processors,
        )
        self.capture_content = capture_content
        self.providers: Mapping[str, str] = providers or {}
        self.in_process = in_process

    def know_backends(self, providers: Mapping[str, str], in_process: frozenset[str]) -> None:
        """Set at start-up, once the backends are known."""
        self.providers = providers
        self.in_process = in_process

    def request(
        self,
        method: str,
        route: str,
        headers: Iterable[tuple[bytes, bytes]],
        request_id: str,
    ) -> RequestSpan:
        """The SERVER span of one HTTP request, continuing the client's trace
        when it sent a ``traceparent``."""
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in _TRACE_HEADERS
        }
        # No traceparent: a new trace (never a child of whatever is current).
        parent = _PROPAGATOR.extract(carrier) if carrier else Context()
        span = self.recorder.start(
            f"{method} {route}",
            parent,
            SpanKind.SERVER,
            {
                names.HTTP_REQUEST_METHOD: method,
                names.HTTP_ROUTE: route,
                names.URL_PATH: route,
                names.REQUEST_ID: request_id,
            },
        )
        return RequestSpan(self, span, request_id)


class RequestSpan:
    """The SERVER span of one request, and the spans below it."""

    def __init__(self, tracing: Tracing, span: RecordedSpan, request_id: str) -> None:
        self.tracing = tracing
        self.span = span
        self.request_id = request_id
        self.context: Context = span.in_context()
        self.attempts = 0
        # The attempt whose answer the client gets: with capture_content it
        # waits for the answer as the hooks left it (see AttemptSpan._end).
        self.last_attempt: AttemptSpan | None = None
        self._ended = False

    # ------------------------------------------------------------- context
    def attach(self) -> object:
        """Make the span current (log records carry its ids); :meth:`detach`
        with the token, in the same task."""
        return otel_context.attach(self.context)

    @staticmethod
    def detach(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    # ------------------------------------------------------------- routing
    def routed(
        self,
        policy: str,
        model: str,
        ranked: Sequence[tuple[Candidate, float, str]],
        *,
        rule: str | None,
        fallbacks: Sequence[str],
        round_number: int,
    ) -> None:
        """One policy call, as an event ``nomoat.route`` on this span: the
        policy, the rule, the candidates best first with their backends,
        scores and reasons (lists in the same order), the fallbacks.
        An event rather than a span, and one event rather than one per
        candidate: a ranking takes microseconds, each span or event costs
        more than that."""
        attributes: dict[str, AttributeValue] = {
            names.MODEL: model,
            names.ROUTE_POLICY: policy,
            names.ROUTE_ROUND: round_number,
            names.ROUTE_CANDIDATES: [c.target.deployment for c, _, _ in ranked],
            names.ROUTE_BACKENDS: [c.backend for c, _, _ in ranked],
            names.ROUTE_SCORES: [score for _, score, _ in ranked],
            names.ROUTE_REASONS: [reason for _, _, reason in ranked],
        }
        if rule is not None:
            attributes[names.ROUTE_RULE] = rule
        if fallbacks:
            attributes[names.ROUTE_FALLBACKS] = list(fallbacks)
        self.span.add_event(names.ROUTE_EVENT, attributes)

    def chosen(self, deployment: str) -> None:
        self.span.set_attributes({names.DEPLOYMENT: deployment})

    # ------------------------------------------------------------ attempts
    def attempt(
        self,
        operation: str,
        request: AnyRequest,
        candidate: Candidate,
        *,
        fallback: bool,
        upstream_id: str,
    ) -> AttemptSpan:
        """The span of one call to one deployment (a child of this span).
        ``upstream_id``: the ``x-request-id`` sent upstream: the gateway's
        own id of the request (the answer's ``id``), never the client's
        ``x-request-id``: vLLM takes that header as its internal request id,
        and a client reusing an id must not reach (or abort) another
        client's request there."""
        self.attempts += 1
        target = candidate.target
        backend = candidate.backend
        kind = SpanKind.INTERNAL if backend in self.tracing.in_process else SpanKind.CLIENT
        attributes = request_attributes(operation, request, target)
        attributes[names.PROVIDER_NAME] = self.tracing.providers.get(backend, names.ERROR_OTHER)
        attributes[names.DEPLOYMENT] = target.deployment
        attributes[names.BACKEND] = backend
        attributes[names.ATTEMPT] = self.attempts
        attributes[names.FALLBACK] = fallback
        if self.tracing.capture_content:
            attributes[names.INPUT_MESSAGES] = input_messages(request)
        span = self.tracing.recorder.child(
            self.span, f"{operation} {target.engine_model}", kind, attributes
        )
        self.last_attempt = AttemptSpan(self.tracing, span, upstream_id)
        return self.last_attempt

    # ----------------------------------------------------------------- end
    def set_model(self, model: str) -> None:
        self.span.set_attributes({names.MODEL: model})

    def sent(self, answer: AnyAnswer) -> None:
        """The answer the client gets, after the response hooks (with
        capture_content: its text goes on the attempt that answered)."""
        if self.tracing.capture_content and self.last_attempt is not None:
            self.last_attempt.output(output_messages(answer))

    def finish(self, status: int, error: BaseException | None = None) -> None:
        """End the span with the response's status (and what failed)."""
        if self._ended:
            return
        self._ended = True
        if self.last_attempt is not None:
            self.last_attempt.output(None)  # if it still waits for its text
        attributes: dict[str, AttributeValue] = {names.HTTP_RESPONSE_STATUS_CODE: status}
        if error is not None:
            attributes[names.ERROR_TYPE] = error_type(error)
        self.span.set_attributes(attributes)
        if status >= 500 or (error is not None and _status_of(error) >= 500):
            # A 4xx is the client's doing: the conventions leave the status
            # of a SERVER span unset for it (error.type still says what). A
            # stream that failed after its 200 went out failed all the same.
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()

    async def watch(self, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        """A stream passed through; the span ends with it: its end, its
        failure (recorded) or the client leaving."""
        failure: BaseException | None = None
        text = StreamText() if self.tracing.capture_content else None
        try:
            async with closing(chunks):
                async for chunk in chunks:
                    if text is not None:
                        text.add(chunk)
                    yield chunk
        except Exception as error:
            failure = error
            raise
        finally:
            if text is not None and failure is None and self.last_attempt is not None:
                self.last_attempt.output(text.messages())
            # The status line (200) went out with the first chunk.
            self.finish(200, failure)


class AttemptSpan:
    """One attempt's span; :class:`~gateway.contract.AttemptTrace` for the
    backend, and what the pipeline records when the attempt ends."""

    def __init__(self, tracing: Tracing, span: RecordedSpan, upstream_id: str) -> None:
        self.tracing = tracing
        self.span = span
        self.started = time.monotonic()
        self.context: Context = span.in_context()
        self._upstream_id = upstream_id
        self._headers: dict[str, str] | None = None
        # Seconds from the attempt's start to a stream's first chunk.
        self.first_chunk: float | None = None
        self._ended = False
        # With capture_content, a successful attempt ends only once the text
        # the client got is known: when it was over (time.time_ns()).
        self._over_ns = 0
        # What the backend recorded itself (kept over what the pipeline infers).
        self._recorded: set[str] = set()

    # ------------------------------------------------------- AttemptTrace
    def headers(self) -> Mapping[str, str]:
        # Made when a backend asks (an in-process engine never does).
        if self._headers is None:
            self._headers = {"x-request-id": self._upstream_id, **_trace_headers(self.span)}
        return self._headers

    def record(self, attributes: Mapping[str, AttributeValue]) -> None:
        self._recorded.update(attributes)
        self.span.set_attributes(attributes)

    def phase(
        self, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, AttributeValue]
    ) -> None:
        child = self.tracing.recorder.child(
            self.span, name, SpanKind.INTERNAL, dict(attributes), start_ns
        )
        child.end(end_ns)

    # ------------------------------------------------------------ its end
    def attach(self) -> object:
        return otel_context.attach(self.context)

    def failed(self, error: BaseException, kind: str | None = None) -> None:
        """The attempt failed before anything reached the client (``kind``:
        its error.type, if not the error's own)."""
        self.span.set_attributes({names.ERROR_TYPE: kind or error_type(error)})
        self.span.set_status(Status(StatusCode.ERROR))
        self._end()

    def embedded(self, answer: wire.EmbeddingList) -> None:
        """Embeddings came back: input tokens only, nothing to capture."""
        self._set_missing(
            {
                names.RESPONSE_MODEL: answer.model,
                names.USAGE_INPUT_TOKENS: answer.usage.prompt_tokens,
                names.USAGE_OUTPUT_TOKENS: 0,
            }
        )
        self._end()

    def answered(self, answer: AnyAnswer) -> None:
        """A whole answer came back."""
        attributes: dict[str, AttributeValue] = {
            names.RESPONSE_ID: answer.id,
            names.RESPONSE_FINISH_REASONS: [
                choice.finish_reason or "" for choice in answer.choices
            ],
            names.RESPONSE_MODEL: answer.model,
        }
        if isinstance(answer.usage, wire.Usage):
            attributes.update(usage_attributes(answer.usage))
        self._set_missing(attributes)
        self._end(awaits_output=True)

    async def watch(self, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        """A stream passed through; the span ends with it: the time to its
        first chunk, its usage (or the chunks counted, when it was cut before
        the usage came: the client left or the upstream failed), its finish
        reasons, and what failed."""
        reasons: dict[int, str] = {}
        content_chunks = 0
        usage: wire.Usage | None = None
        first = self.first_chunk
        response: tuple[str, str] | None = None
        failure: BaseException | None = None
        try:
            async with closing(chunks):
                async for chunk in chunks:
                    if first is None:
                        first = time.monotonic() - self.started
                    if isinstance(chunk, wire.ChatCompletionChunk | wire.Completion):
                        if response is None:
                            response = (chunk.id, chunk.model)
                        if isinstance(chunk.usage, wire.Usage):
                            usage = chunk.usage
                        if has_content(chunk):
                            content_chunks += 1
                        for choice in chunk.choices:
                            if choice.finish_reason:
                                reasons[choice.index] = choice.finish_reason
                    yield chunk
        except Exception as error:
            failure = error
            raise
        finally:
            self._streamed(first, response, reasons, usage, content_chunks, failure)

    def relayed(self, relay: ChunkRelay, failure: BaseException | None) -> None:
        """A stream of the cheap relay ended: what :meth:`watch` records
        (and the model the upstream named, as a typed stream's backend records it)."""
        response = None
        if relay.upstream_model is not None:
            self.record({names.RESPONSE_MODEL: relay.upstream_model})
            response = (relay.request_id, relay.model)
        self._streamed(
            self.first_chunk,
            response,
            relay.reasons,
            relay.usage,
            relay.chunks_since_content,
            failure,
        )

    def _streamed(
        self,
        first: float | None,
        response: tuple[str, str] | None,
        reasons: Mapping[int, str],
        usage: wire.Usage | None,
        content_chunks: int,
        failure: BaseException | None,
    ) -> None:
        attributes: dict[str, AttributeValue] = {}
        if first is not None:
            attributes[names.RESPONSE_TIME_TO_FIRST_CHUNK] = first
        if response is not None:
            attributes[names.RESPONSE_ID] = response[0]
            attributes[names.RESPONSE_MODEL] = response[1]
        if reasons:
            attributes[names.RESPONSE_FINISH_REASONS] = [reasons[i] for i in sorted(reasons)]
        if usage is not None:
            attributes.update(usage_attributes(usage))
        elif names.USAGE_OUTPUT_TOKENS not in self._recorded:
            # Cut before the usage chunk, and the backend did not say how
            # many tokens it generated: one content chunk is one token for
            # the engines nomoat relays (vLLM, llama.cpp), at least.
            attributes[names.USAGE_OUTPUT_TOKENS] = content_chunks
            attributes[names.USAGE_ESTIMATED] = True
        self._set_missing(attributes, override_usage=usage is not None)
        if failure is not None:
            self.span.set_attributes({names.ERROR_TYPE: error_type(failure)})
            self.span.set_status(Status(StatusCode.ERROR))
        self._end(awaits_output=failure is None)

    def _set_missing(
        self, attributes: dict[str, AttributeValue], override_usage: bool = True
    ) -> None:
        """Set ``attributes``, but keep what the backend recorded itself
        (the upstream's own model name; tokens it counted) unless the answer's
        usage is authoritative."""
        for key in self._recorded & attributes.keys():
            if key == names.RESPONSE_MODEL or (
                key.startswith("gen_ai.usage.") and not override_usage
            ):
                del attributes[key]
        self.span.set_attributes(attributes)

    def _end(self, awaits_output: bool = False) -> None:
        """End the span; with capture_content, a successful attempt's span
        stays open (its end time noted) until :meth:`output` gives it the
        text the client got, after the response or stream hooks (a redact
        hook) ran."""
        if self._ended:
            return
        self._ended = True
        if awaits_output and self.tracing.capture_content:
            self._over_ns = time.time_ns()
            return
        self.span.end()

    def output(self, messages: str | None) -> None:
        """``gen_ai.output.messages`` (None: none to record), and the end."""
        if not self._over_ns:
            return
        if messages is not None:
            self.span.set_attributes({names.OUTPUT_MESSAGES: messages})
        self.span.end(self._over_ns)
        self._over_ns = 0


def _trace_headers(span: RecordedSpan) -> dict[str, str]:
    """W3C ``traceparent`` (and ``tracestate``) naming ``span`` as the
    parent: what the SDK's ``TraceContextTextMapPropagator.inject`` writes
    (a test compares them), without its look-up of the span through a
    context: once per attempt on the event loop."""
    context = span.context
    ids = f"{context.trace_id:032x}-{context.span_id:016x}"
    headers = {"traceparent": f"00-{ids}-{context.trace_flags:02x}"}
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()
    return headers
