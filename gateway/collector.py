"""Full garbage collections when the gateway is quiet, not in the middle of a burst.

CPython starts a full (generation 2) collection once the objects promoted
since the last one pass a quarter of those that survived it. With hundreds of
streams open, each holding objects that outlive the young generations, that
happens every second or two and scans every live object the start-up freeze
(gateway/app.py) did not cover: measured 18 to 60 ms with 512 streams, the
event loop stopped for all of them (docs/benchmarks.md, "Streaming at
scale", session 7). Those stalls were most of the misses of the streaming
targets' time-to-first-chunk p99.

So the automatic full collection is turned off and :class:`QuietCollector`
runs it itself: as soon as no request is in progress, or, under load that
never pauses, at most ``max_interval`` seconds after the last one. The young
generations are collected as before (about 1 ms at most). The request path
makes no reference cycle of its own (docs/benchmarks.md, "What was
optimised"), so what waits for the next full collection is little; the
interval bounds it.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

# Larger than any count of young collections between two full ones: CPython
# itself never starts a full collection.
NEVER = 2**30


class QuietCollector:
    """Runs full collections while nothing is in progress (``in_progress()``
    is 0), or every ``max_interval`` seconds under constant load."""

    def __init__(
        self,
        in_progress: Callable[[], int],
        max_interval: float,
        check_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._in_progress = in_progress
        self._max_interval = max_interval
        self._check_interval = check_interval
        self._clock = clock
        self._last = clock()
        self._thresholds = gc.get_threshold()
        self.full_collections = 0

    def take_over(self) -> None:
        """Stop CPython's own full collections (young ones carry on)."""
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, NEVER)

    def give_back(self) -> None:
        gc.set_threshold(*self._thresholds)

    def tick(self) -> bool:
        """Collect if anything reached the old generation since the last full
        collection and the gateway is quiet or the interval is over."""
        if gc.get_count()[2] == 0:
            return False
        now = self._clock()
        if self._in_progress() > 0 and now - self._last < self._max_interval:
            return False
        gc.collect(2)
        self._last = self._clock()
        self.full_collections += 1
        return True

    async def run(self) -> None:
        self.take_over()
        try:
            while True:
                await asyncio.sleep(self._check_interval)
                self.tick()
        finally:
            self.give_back()
