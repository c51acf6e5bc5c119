"""Figures for docs/security/redact.md: CPU time of the request hooks on
adversarial inputs, and how long a 4 MB body holds the event loop.

    PYTHONPATH=. .venv/bin/python plugins/nomoat-redact/bench/measure.py patterns
    PYTHONPATH=. .venv/bin/python plugins/nomoat-redact/bench/measure.py loop

Times are CPU times of the measuring thread (``time.thread_time``), so other
processes on the machine do not inflate them. ``patterns`` stops growing an
input once one size takes longer than ``--budget`` seconds (the old patterns
take hours at 4 MB) and prints ``-`` for the sizes it skipped.

``loop`` runs each hook's ``on_request`` on a 4 MB body while a ticker task
sleeps 1 ms at a time; "held" is the most CPU the loop's thread spent between
two ticks, i.e. the longest another request would have waited.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from functools import partial

from gateway.contract import AnyRequest
from gateway.testing import chat_request, context

FOUR_MB = 4 * 1024 * 1024
SIZES = (10 * 1024, 100 * 1024, 1024 * 1024, FOUR_MB)

PATTERN_INPUTS = [
    ("email", "%"),
    ("email", "a%"),
    ("email", "a@" + "a1." * 20),
    ("card", "1 "),
    ("card", "4111 1111 1111 1111 "),
    ("phone", "+" + "1" * 29 + "a "),
    ("phone", "+1 (1)" + "1" * 29 + "a "),
    ("all", "Lorem ipsum dolor sit amet, consectetur adipiscing elit 2024. "),
]

LOOP_BODIES = {
    "prose": "Lorem ipsum dolor sit amet, consectetur adipiscing elit 2024. ",
    "percent": "%",
    "phone": "+" + "1" * 29 + "a ",
    "cards": "4111 1111 1111 1111 ",
    "lines": "a\n",
    "indented": " " * 200 + "x\n",
    "cjk": "漢字かな ",
}


def repeated(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def cpu(work: Callable[[], object]) -> float:
    start = time.thread_time()
    work()
    return time.thread_time() - start


def patterns(budget: float) -> None:
    from nomoat_redact import RedactConfig, Redactor

    print("| pattern | input unit | " + " | ".join(f"{size // 1024} KB" for size in SIZES) + " |")
    print("| --- | --- |" + " ---: |" * len(SIZES))
    for kind, unit in PATTERN_INPUTS:
        kinds = ["email", "card", "phone"] if kind == "all" else [kind]
        redactor = Redactor(RedactConfig(kinds=kinds))  # type: ignore[arg-type]
        cells: list[str] = []
        over = False
        for size in SIZES:
            if over:
                cells.append("-")
                continue
            seconds = cpu(partial(redactor.redact, repeated(unit, size)))
            over = seconds > budget
            cells.append(f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms")
        print(f"| {kind} | `{unit[:32]!r}` | " + " | ".join(cells) + " |")


def hooks(names: Sequence[str]) -> dict[str, tuple[object, str]]:
    built: dict[str, tuple[object, str]] = {}
    if "redact" in names:
        from nomoat_redact import RedactConfig, Redactor

        built["redact"] = (Redactor(RedactConfig()), "m")
    if "classifier" in names:
        from nomoat_classifier import Classifier, ClassifierConfig

        config = ClassifierConfig(rules=[{"when": "code", "model": "coder"}])  # type: ignore[list-item]
        built["classifier"] = (Classifier(config), "auto")
    if "cache" in names:
        from nomoat_cache import CacheConfig, ResponseCache

        built["cache"] = (ResponseCache(CacheConfig()), "m")
    return built


async def held(hook: object, request: AnyRequest) -> tuple[float, float]:
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
    await hook.on_request(request, context())  # type: ignore[attr-defined]
    total = time.thread_time() - start
    done.set()
    await ticks
    return total, max(gaps)


def loop(names: Sequence[str], bodies: Sequence[str]) -> None:
    print("| hook | 4 MB body | CPU | loop held at most |")
    print("| --- | --- | ---: | ---: |")
    for name, (hook, model) in hooks(names).items():
        for body in bodies:
            request = chat_request(repeated(LOOP_BODIES[body], FOUR_MB), model=model, temperature=0)
            total, gap = asyncio.run(held(hook, request))
            print(f"| {name} | {body} | {total * 1000:.0f} ms | {gap * 1000:.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["patterns", "loop"])
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per size at most")
    parser.add_argument("--hooks", default="redact,classifier,cache")
    parser.add_argument("--bodies", default=",".join(LOOP_BODIES))
    args = parser.parse_args()
    if args.what == "patterns":
        patterns(args.budget)
    else:
        loop(args.hooks.split(","), args.bodies.split(","))


if __name__ == "__main__":
    main()
