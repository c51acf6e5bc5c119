"""Log records that carry the trace context.

With tracing on, every record that goes through the root logger's handlers
gets ``otelTraceID``, ``otelSpanID`` and ``otelTraceSampled`` (the names
OpenTelemetry's logging instrumentation uses), read from the span current
when the record was made: the request's SERVER span in the handlers, its
attempt span while a backend is called. Outside any span they are "0".
"""

from __future__ import annotations

import logging

from opentelemetry import trace

# The format `nomoat serve` logs in with tracing on.
TRACED_FORMAT = (
    "%(levelname)s %(name)s: %(message)s [trace_id=%(otelTraceID)s span_id=%(otelSpanID)s]"
)


class TraceContextFilter(logging.Filter):
    """Adds the current span's ids to each record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.otelTraceID = format(context.trace_id, "032x")
            record.otelSpanID = format(context.span_id, "016x")
            record.otelTraceSampled = context.trace_flags.sampled
        else:
            record.otelTraceID = "0"
            record.otelSpanID = "0"
            record.otelTraceSampled = False
        return True


def correlate_logs(logger: logging.Logger | None = None) -> TraceContextFilter:
    """Put the filter on every handler of ``logger`` (the root logger), and
    the trace ids in the format of those that use nomoat's format."""
    target = logger or logging.getLogger()
    trace_filter = TraceContextFilter()
    for handler in target.handlers:
        handler.addFilter(trace_filter)
        formatter = handler.formatter
        if formatter is not None and formatter._fmt == "%(levelname)s %(name)s: %(message)s":
            handler.setFormatter(logging.Formatter(TRACED_FORMAT))
    return trace_filter
