"""Where one generation's time went, for its trace: waiting in the queue,
the adapters it needed loaded, its prompt evaluated (part of it perhaps
taken from the prompt cache), its tokens decoded.

The scheduler fills an :class:`EngineTimings` only for jobs that carry one
(tracing on); the worker thread writes it, the event loop reads it once the
job is over (or cut short). :func:`report` turns it into the attempt's
child spans, after the fact.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.contract import AttemptTrace, AttributeValue
from gateway.telemetry import semconv as names


@dataclass(slots=True)
class EngineTimings:
    """``time.time_ns()`` instants (0: not reached) and counts of one job."""

    queued_ns: int = 0
    # A sequence took it: the queue wait ends, prompt evaluation begins.
    admitted_ns: int = 0
    # Its first token was sampled: the prompt is evaluated, decoding begins.
    first_token_ns: int = 0
    finished_ns: int = 0
    # The adapter set switched for it (loads from disk if not cached).
    adapters_started_ns: int = 0
    adapters_ended_ns: int = 0
    adapters: tuple[str, ...] = ()
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated: int = 0
    finish_reason: str = ""


def report(trace: AttemptTrace, timings: Sequence[EngineTimings]) -> None:
    """Each job's phases as child spans of the attempt. A job cut short (the
    client left) ends its last phase now; a phase never reached is left out."""
    now = time.time_ns()
    for job in timings:
        if not job.queued_ns:
            continue
        queue_end = job.admitted_ns or now
        if job.adapters_started_ns:
            trace.phase(
                names.ENGINE_ADAPTER_LOAD_SPAN,
                job.adapters_started_ns,
                job.adapters_ended_ns or now,
                {names.ADAPTERS: list(job.adapters)},
            )
        trace.phase(names.ENGINE_QUEUE_SPAN, job.queued_ns, queue_end, {})
        if not job.admitted_ns:
            continue
        prompt: dict[str, AttributeValue] = {
            names.ENGINE_PROMPT_TOKENS: job.prompt_tokens,
            names.ENGINE_CACHED_TOKENS: job.cached_tokens,
        }
        prompt_end = job.first_token_ns or job.finished_ns or now
        trace.phase(names.ENGINE_PROMPT_SPAN, job.admitted_ns, prompt_end, prompt)
        if not job.first_token_ns:
            continue
        decode: dict[str, AttributeValue] = {names.ENGINE_OUTPUT_TOKENS: job.generated}
        if job.finish_reason:
            decode[names.ENGINE_FINISH_REASON] = job.finish_reason
        trace.phase(names.ENGINE_DECODE_SPAN, job.first_token_ns, job.finished_ns or now, decode)


def cut_short_usage(
    timings: Sequence[EngineTimings], prompt_tokens: int
) -> dict[str, AttributeValue]:
    """The tokens of jobs cut short, as the attempt's usage: what was
    actually generated before the client left or the stream failed."""
    return {
        names.USAGE_INPUT_TOKENS: prompt_tokens,
        names.USAGE_OUTPUT_TOKENS: sum(job.generated for job in timings),
    }
