"""Log records carry the trace context: with tracing on, the server's log
handlers get the trace and span ids of the span current when a record was
written, and nomoat's log format prints them."""

from __future__ import annotations

import io
import logging

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import use_span

from gateway.telemetry.logs import correlate_logs

NOMOAT_FORMAT = "%(levelname)s %(name)s: %(message)s"


def test_nomoats_log_lines_name_the_current_span() -> None:
    logger = logging.Logger("test-correlation")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(NOMOAT_FORMAT))
    logger.addHandler(handler)
    correlate_logs(logger)
    span = TracerProvider().get_tracer("t").start_span("request")
    with use_span(span, end_on_exit=True):
        logger.warning("inside")
    logger.warning("outside")
    context = span.get_span_context()
    inside, outside = out.getvalue().splitlines()
    assert inside == (
        f"WARNING test-correlation: inside "
        f"[trace_id={context.trace_id:032x} span_id={context.span_id:016x}]"
    )
    assert outside == "WARNING test-correlation: outside [trace_id=0 span_id=0]"


def test_another_format_keeps_its_own_and_still_gets_the_ids() -> None:
    logger = logging.Logger("test-correlation-json")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s %(otelTraceID)s"))
    logger.addHandler(handler)
    correlate_logs(logger)
    span = TracerProvider().get_tracer("t").start_span("request")
    with use_span(span, end_on_exit=True):
        logger.warning("x")
    assert out.getvalue().strip() == f"x {span.get_span_context().trace_id:032x}"
