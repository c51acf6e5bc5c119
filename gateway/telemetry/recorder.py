"""Spans recorded in plain dicts and handed to the SDK's span processors
whole, when they end.

The SDK's ``Tracer.start_span`` builds a ``Span`` whose every attribute goes
through ``BoundedAttributes`` (a lock, a type check and a copy of each
value) and whose every call takes a lock: about 35 us for the two spans of
a request and their 30-odd attributes, a third of what tracing cost the
event loop (docs/tracing.md, "Cost"). nomoat's spans are built by this
package alone, from typed values (``AttributeValue``), bounded in number,
on one event loop: none of that protection buys anything here.

So :class:`Recorder` keeps the SDK for everything that is configuration or
export: the provider's sampler (``OTEL_TRACES_SAMPLER``, parent-based by
default), its id generator, its resource, its span processors (the batch
processor and its exporter, or a test's in-memory exporter). It only
replaces the recording object: a :class:`RecordedSpan` collects attributes
and events in a dict and a list, and when it ends it becomes the SDK's
``ReadableSpan`` (what processors and exporters take) and goes to the
provider's processors, as the SDK's own span does on ``end()``. A span the
sampler drops records nothing and reaches no processor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, TraceFlags

from gateway.contract import AttributeValue

_UNSET = Status()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


class Recorder:
    """Starts spans of one provider, under one instrumentation scope."""

    def __init__(self, provider: TracerProvider, scope: InstrumentationScope) -> None:
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.resource = provider.resource
        self.scope = scope
        # The provider's processors, all of them, those added later too (the
        # SDK's span reaches them the same way on end()).
        self.processor: SpanProcessor = provider._active_span_processor

    def start(
        self,
        name: str,
        parent: Context,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        start_time: int | None = None,
    ) -> RecordedSpan:
        """A span below the span current in ``parent`` (an empty ``Context``:
        a new trace), sampled as the provider's sampler decides (the SDK's
        ``Tracer.start_span``, step by step). ``attributes`` is kept, not
        copied."""
        parent_span = trace.get_current_span(parent).get_span_context()
        parent_context: SpanContext | None = parent_span
        if not parent_span.is_valid:
            parent_context = None
            trace_id = self.ids.generate_trace_id()
            random_id = self.ids.is_trace_id_random()
        else:
            trace_id = parent_span.trace_id
            random_id = parent_span.trace_flags.random_trace_id
        result = self.sampler.should_sample(parent, trace_id, name, kind, attributes)
        decision = result.decision
        flags = _SAMPLED if decision is Decision.RECORD_AND_SAMPLE else _NOT_SAMPLED
        if random_id:
            flags = TraceFlags(flags | TraceFlags.RANDOM_TRACE_ID)
        context = SpanContext(
            trace_id,
            self.ids.generate_span_id(),
            is_remote=False,
            trace_flags=flags,
            trace_state=result.trace_state,
        )
        recording = decision is not Decision.DROP
        extra = result.attributes
        if recording and extra is not None and len(extra) != len(attributes):
            # A sampler that adds attributes of its own (the standard ones
            # pass the span's on unchanged).
            attributes = {**extra, **attributes}
        return RecordedSpan(
            self,
            name,
            context,
            parent_context,
            kind,
            attributes if recording else None,
            start_time or time.time_ns(),
        )

    def child(
        self,
        parent: RecordedSpan,
        name: str,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        start_time: int | None = None,
    ) -> RecordedSpan:
        """A span below ``parent``, one of this process's, sampled as it was
        without asking the sampler again: the samplers nomoat configures
        (``OTEL_TRACES_SAMPLER``'s six) decide a child of a local span as
        they decided its parent (the parent-based ones follow it; always
        on, always off and the trace-id ratio decide alike for every span of
        a trace)."""
        above = parent.context
        context = SpanContext(
            above.trace_id,
            self.ids.generate_span_id(),
            is_remote=False,
            trace_flags=above.trace_flags,
            trace_state=above.trace_state,
        )
        recording = parent.recording
        return RecordedSpan(
            self,
            name,
            context,
            above,
            kind,
            attributes if recording else None,
            start_time or time.time_ns(),
        )


class RecordedSpan:
    """One span being recorded (``attributes`` None: not sampled, nothing is
    kept); what :class:`~gateway.telemetry.spans.RequestSpan` and
    ``AttemptSpan`` call on it."""

    __slots__ = (
        "_attributes",
        "_ended",
        "_events",
        "_kind",
        "_name",
        "_parent",
        "_recorder",
        "_start",
        "_status",
        "context",
    )

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue] | None,
        start_time: int,
    ) -> None:
        self._recorder = recorder
        self._name = name
        self.context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._events: list[Event] = []
        self._status = _UNSET
        self._start = start_time
        self._ended = False

    def get_span_context(self) -> SpanContext:
        return self.context

    @property
    def recording(self) -> bool:
        return self._attributes is not None

    def in_context(self) -> Context:
        """A context with this span current (its ids for log records and for
        ``traceparent``; the parent of the spans started below it)."""
        return trace.set_span_in_context(trace.NonRecordingSpan(self.context))

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self._attributes is not None and not self._ended:
            self._attributes.update(attributes)

    def add_event(self, name: str, attributes: Mapping[str, AttributeValue]) -> None:
        if self._attributes is not None and not self._ended:
            self._events.append(Event(name, attributes))

    def set_status(self, status: Status) -> None:
        if not self._ended:
            self._status = status

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._attributes is None:
            return
        recorder = self._recorder
        recorder.processor.on_end(
            ReadableSpan(
                self._name,
                self.context,
                self._parent,
                recorder.resource,
                self._attributes,
                self._events,
                (),
                self._kind,
                None,
                self._status,
                self._start,
                end_time or time.time_ns(),
                recorder.scope,
            )
        )
