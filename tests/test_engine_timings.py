"""The llama.cpp engine's phases as child spans of the attempt, from the
timings its scheduler keeps: each phase where it began and ended, adapter
loads named, a job cut short ending its last phase when it was reported,
and the tokens it had generated as the attempt's usage. No engine here
(tests/test_otlp_export.py and test_trace_edge.py run the real one)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from gateway.contract import AttributeValue
from gateway.engine.timings import EngineTimings, cut_short_usage, report
from gateway.telemetry import semconv as names


class Recorder:
    """An AttemptTrace that keeps what it is given."""

    def __init__(self) -> None:
        self.phases: dict[str, tuple[int, int, Mapping[str, AttributeValue]]] = {}

    def headers(self) -> Mapping[str, str]:
        return {}

    def record(self, attributes: Mapping[str, AttributeValue]) -> None:
        pass

    def phase(
        self, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, AttributeValue]
    ) -> None:
        self.phases[name] = (start_ns, end_ns, attributes)


def test_a_finished_job_reports_every_phase_in_order() -> None:
    job = EngineTimings(
        queued_ns=100,
        adapters_started_ns=110,
        adapters_ended_ns=150,
        adapters=("sql", "polite"),
        admitted_ns=160,
        first_token_ns=300,
        finished_ns=500,
        prompt_tokens=40,
        cached_tokens=32,
        generated=7,
        finish_reason="stop",
    )
    trace = Recorder()
    report(trace, [job])
    assert trace.phases[names.ENGINE_ADAPTER_LOAD_SPAN] == (
        110,
        150,
        {names.ADAPTERS: ["sql", "polite"]},
    )
    assert trace.phases[names.ENGINE_QUEUE_SPAN][:2] == (100, 160)
    start, end, prompt = trace.phases[names.ENGINE_PROMPT_SPAN]
    assert (start, end) == (160, 300)
    assert prompt == {names.ENGINE_PROMPT_TOKENS: 40, names.ENGINE_CACHED_TOKENS: 32}
    start, end, decode = trace.phases[names.ENGINE_DECODE_SPAN]
    assert (start, end) == (300, 500)
    assert decode == {names.ENGINE_OUTPUT_TOKENS: 7, names.ENGINE_FINISH_REASON: "stop"}


def test_a_job_cut_while_decoding_ends_its_decode_phase_when_reported() -> None:
    before = time.time_ns()
    job = EngineTimings(queued_ns=1, admitted_ns=2, first_token_ns=3, prompt_tokens=9, generated=4)
    trace = Recorder()
    report(trace, [job])
    assert names.ENGINE_ADAPTER_LOAD_SPAN not in trace.phases
    start, end, decode = trace.phases[names.ENGINE_DECODE_SPAN]
    assert start == 3 and end >= before
    assert decode == {names.ENGINE_OUTPUT_TOKENS: 4}
    usage = cut_short_usage([job, EngineTimings(generated=2)], prompt_tokens=9)
    assert usage == {names.USAGE_INPUT_TOKENS: 9, names.USAGE_OUTPUT_TOKENS: 6}


def test_a_job_still_queued_reports_only_its_wait_and_one_never_queued_nothing() -> None:
    trace = Recorder()
    report(trace, [EngineTimings(queued_ns=5), EngineTimings()])
    assert set(trace.phases) == {names.ENGINE_QUEUE_SPAN}
    assert trace.phases[names.ENGINE_QUEUE_SPAN][0] == 5
