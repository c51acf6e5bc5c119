"""The redactor's time is linear in its input, and a 4 MB body does not stall
the event loop.

Times are CPU times of this thread (``time.thread_time``): what the redactor
itself costs, not how long the machine's scheduler kept the process waiting,
so the bounds hold on a busy machine. They are generous (the figures are in
docs/security/redact.md); the code before the fix misses them by orders of
magnitude: ``"%" * 32768`` took seconds, ``"+" + "1" * 29`` a millisecond per
``+``, and every 4 MB body blocked the loop for the whole scan.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable

import pytest
from nomoat_redact import RedactConfig, Redactor, luhn_valid

from gateway.contract import AnyRequest, AnyResponse, ChatCompletionRequest
from gateway.testing import chat_request, context

SMALL = 32 * 1024
LARGE = 16 * SMALL
FOUR_MB = 4 * 1024 * 1024

# For each pattern, the inputs that made it try the most per character: long
# runs it starts in many times ('%' starts an address), many starts that all
# fail at the end, and the splits of a digit run after '+'.
ADVERSARIAL = [
    ("email", "%"),
    ("email", "a%"),
    ("email", "a@" + "a1." * 20),
    ("email", "x." * 40 + "@"),
    ("card", "1 "),
    ("card", "4111 1111 1111 1111 "),
    ("card", "1-" * 20 + " "),
    ("phone", "+" + "1" * 29 + "a "),
    ("phone", "+1 (1)" + "1" * 29 + "a "),
    ("phone", "1 " * 12 + "a "),
    ("phone", "(12)" + " 123" * 10 + "a "),
]


def repeated(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def cpu_seconds(work: Callable[[], object], repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        work()
        best = min(best, time.thread_time() - start)
    return best


@pytest.mark.parametrize(("kind", "unit"), ADVERSARIAL)
def test_time_grows_linearly_with_adversarial_input(kind: str, unit: str) -> None:
    redactor = Redactor(RedactConfig(kinds=[kind]))
    small, large = repeated(unit, SMALL), repeated(unit, LARGE)
    small_time = cpu_seconds(lambda: redactor.redact(small), repeat=3)
    # Absolute: 32 KB takes a few milliseconds (the old patterns took seconds).
    assert small_time < 0.2, f"{kind} {unit!r}: 32 KB took {small_time:.3f} s"
    large_time = cpu_seconds(lambda: redactor.redact(large))
    # 16 times the text: linear is 16 times the time, quadratic 256 times.
    assert large_time < 4 * 16 * small_time + 0.05, (
        f"{kind} {unit!r}: 32 KB {small_time:.4f} s, 512 KB {large_time:.4f} s"
    )


MIXED = (
    "a%b%c jane.doe@example.com +1 (415) 555-2671 4111-1111-1111-1111 "
    "+" + "1" * 29 + "a 1 1 1 1 1 1 1 1 1 1 1 1 1 1 %%%%%%%%%%%%%%%% "
)


def test_a_4mb_body_leaves_the_event_loop_responsive() -> None:
    """A ticker coroutine runs while the hook masks a 4 MB body; between two
    of its ticks the loop thread never works more than a few slices."""
    request = chat_request(repeated(MIXED, FOUR_MB))
    redactor = Redactor(RedactConfig())

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
        result = await redactor.on_request(request, context())
        total = time.thread_time() - start
        done.set()
        await ticks
        return total, max(gaps), result

    total, worst_gap, result = asyncio.run(measure())
    assert total < 8.0, f"4 MB took {total:.2f} s of CPU"
    assert worst_gap < 0.05, f"the loop was busy for {worst_gap * 1000:.0f} ms between ticks"
    assert isinstance(result, ChatCompletionRequest)
    masked = result.messages[0].content
    assert isinstance(masked, str)
    assert "example.com" not in masked and "555-2671" not in masked and "4111" not in masked


# ---------------------------------------------------------------------------
# The patterns before the fix, as the reference: the new ones match exactly
# the same, window by window, except where the old ones were unbounded.
# One deliberate change: '%' now counts as a local-part character in the
# look-behind too (it is one in the address), so "a@b.cc%x@d.ee" masks the
# first address only, as "a@b.cc.x@d.ee" always did.
_OLD_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
OLD_EMAIL = re.compile(
    rf"(?<![\w.+%-])[\w.+%-]+@{_OLD_LABEL}(?:\.{_OLD_LABEL})*\.[A-Za-z]{{2,}}(?![\w-])"
)
OLD_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
OLD_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,5}"
    r"|(?:\(\d{2,5}\)[ .-]?|\d{2,5}[ .-])\d{3,4}[ .-]\d{3,4})(?![\w])(?![ .-]\d)"
)


def old_redact(text: str) -> str:
    def card(match: re.Match[str]) -> str:
        return "[CARD]" if luhn_valid(re.sub(r"\D", "", match.group())) else match.group()

    def phone(match: re.Match[str]) -> str:
        count = len(re.sub(r"\D", "", match.group()))
        international = match.group().startswith("+")
        plausible = 7 <= count <= 15 if international else 9 <= count <= 12
        return "[PHONE]" if plausible else match.group()

    text = OLD_EMAIL.sub("[EMAIL]", text)
    text = OLD_CARD.sub(card, text)
    return OLD_PHONE.sub(phone, text)


ALPHABETS = [
    "0123456789 +-.()a",
    "4111 -",
    "+1 (2)3-4.5",
    "+0123456789 ()",
    "ab.+%-_@1 c",
    "a.b@c.de%x-+ ",
]


def test_the_linear_patterns_match_what_the_old_ones_matched() -> None:
    rng = random.Random(11)
    redactors = [Redactor(RedactConfig(), window=window) for window in (1, 3, 64)]
    for _ in range(2000):
        alphabet = rng.choice(ALPHABETS)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 48)))
        expected = old_redact(text)
        for redactor in redactors:
            assert redactor.redact(text) == expected, (text, redactor)


def test_windows_split_nothing() -> None:
    """A match across a window's end is found whole, with the context that
    decides it (look-behind before the window, look-ahead after it)."""
    text = "x 4111 1111 1111 1111 y jane@example.com +44 20 7946 0958; 415-555-2671." * 3
    whole = Redactor(RedactConfig(), window=1 << 20).redact(text)
    assert whole == "x [CARD] y [EMAIL] [PHONE]; [PHONE]." * 3
    for window in range(1, len(text) + 1):
        assert Redactor(RedactConfig(), window=window).redact(text) == whole, window


def test_addresses_beyond_the_rfc_limits_are_not_addresses() -> None:
    redactor = Redactor(RedactConfig(kinds=["email"]))
    assert redactor.redact("x" * 64 + "@example.com") == "[EMAIL]"
    assert redactor.redact("x" * 65 + "@example.com") == "x" * 65 + "@example.com"
    assert redactor.redact("a@" + "b" * 63 + ".com") == "[EMAIL]"
    assert redactor.redact("a@" + "b." * 126 + "com") == "[EMAIL]"
