"""The classifier's cost is linear in the text and bounded per request, and a
4 MB body does not stall the event loop.

Times are CPU times of this thread (``time.thread_time``), so a busy machine
does not fail the bounds; before the fix, a line of 8,000 spaces took seconds
(every shorter prefix of the indentation was tried) and a 4 MB body held the
loop for one to two seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from nomoat_classifier import SAMPLE_CHARS, Classifier, ClassifierConfig, features, looks_like_code

from gateway.contract import AnyRequest, AnyResponse, ChatCompletionRequest
from gateway.testing import chat_request, context

SMALL = 8 * 1024
LARGE = 16 * SMALL
FOUR_MB = 4 * 1024 * 1024


def repeated(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def cpu_seconds(work: Callable[[], object], repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        work()
        best = min(best, time.thread_time() - start)
    return best


@pytest.mark.parametrize(
    "text",
    [
        lambda size: " " * size + "x",  # one indented line
        lambda size: repeated(" " * 100 + "\n", size),  # blank lines before a fence
        lambda size: repeated("a.a.a.a.a.a.a.a.a.a ", size),
        lambda size: repeated("if x: " * 20 + "\n", size),
        lambda size: repeated("; " * 50 + "x\n", size),
    ],
    ids=["spaces", "blank-lines", "dotted", "colons", "semicolons"],
)
def test_code_detection_grows_linearly(text: Callable[[int], str]) -> None:
    small, large = text(SMALL), text(LARGE)
    small_time = cpu_seconds(lambda: looks_like_code(small), repeat=3)
    assert small_time < 0.2, f"8 KB took {small_time:.3f} s"
    large_time = cpu_seconds(lambda: looks_like_code(large))
    # 16 times the text: linear is 16 times the time, quadratic 256 times.
    assert large_time < 4 * 16 * small_time + 0.05, f"{small_time:.4f} s, {large_time:.4f} s"


@pytest.mark.parametrize("unit", ["漢字かな ", "a\n", " " * 200 + "x = 1;\n"])
def test_a_4mb_body_leaves_the_event_loop_responsive(unit: str) -> None:
    request = chat_request(repeated(unit, FOUR_MB), model="auto")
    classifier = Classifier(ClassifierConfig(rules=[{"when": "code", "model": "coder"}]))

    async def measure() -> tuple[float, float, AnyRequest | AnyResponse]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.thread_time()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.thread_time()
                gaps.append(now - last)
                last = now

        ticks = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = time.thread_time()
        result = await classifier.on_request(request, context())
        total = time.thread_time() - start
        done.set()
        await ticks
        return total, max(gaps), result

    total, worst_gap, result = asyncio.run(measure())
    assert total < 3.0, f"4 MB took {total:.2f} s of CPU"
    assert worst_gap < 0.05, f"the loop was busy for {worst_gap * 1000:.0f} ms between ticks"
    assert isinstance(result, ChatCompletionRequest)
    assert result.model == ("coder" if "x = 1" in unit else "auto")


def test_code_and_language_are_judged_on_the_beginning_and_sizes_on_all() -> None:
    prose = repeated("The river is calm and the light is good for a walk. ", SAMPLE_CHARS)
    code = "def f(x):\n    return x\n" * 1000
    found = features(chat_request(prose + code))
    assert not found.code and found.language == "en"
    assert found.chars == len(prose + code)
    assert found.tokens == -(-len(prose + code) // 4)
    assert features(chat_request(code + prose)).code
