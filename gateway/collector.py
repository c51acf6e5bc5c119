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

Under a burst the young generations cost too: hundreds of streams set up at
once keep every object they allocate alive, so each young collection (one
per 700 allocations) scans them all and frees nothing, 15 to 23 ms of a
burst's 300 ms of set-ups. So while ``suspend_at`` or more requests are in
progress (the shedder tells :meth:`QuietCollector.busy`), automatic
collection is off altogether; it is back once they fall to a quarter of that
(:meth:`QuietCollector.quiet`). Meanwhile each tick collects the young
generations itself once ``YOUNG_LIMIT`` allocations are waiting, so memory
stays bounded under load that never falls.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

# Larger than any count of young collections between two full ones: CPython
# itself never starts a full collection.
NEVER = 2**30
# While collection is suspended, the young generations are collected by the
# tick once this many more container objects are alive than at the last
# collection: above a burst of 512 streams' set-ups (about 100 each), a few
# MB of objects at most.
YOUNG_LIMIT = 200_000


class QuietCollector:
    """Runs full collections while nothing is in progress (``in_progress()``
    is 0), or every ``max_interval`` seconds under constant load; suspends
    automatic collection while ``suspend_at`` requests or more are in
    progress (0: never). ``busy_at`` and ``quiet_at`` are what the shedder
    (gateway/shedding.py, ``LoadWatch``) compares its count with."""

    def __init__(
        self,
        in_progress: Callable[[], int],
        max_interval: float,
        check_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        suspend_at: int = 0,
    ) -> None:
        self._in_progress = in_progress
        self._max_interval = max_interval
        self._check_interval = check_interval
        self._clock = clock
        self._last = clock()
        self._thresholds = gc.get_threshold()
        self._was_enabled = gc.isenabled()
        self.busy_at = suspend_at if suspend_at > 0 else -1
        self.quiet_at = suspend_at // 4 if suspend_at > 0 else -1
        self.suspended = False
        self._taken_over = False
        self.full_collections = 0
        self.young_collections = 0
        self.suspensions = 0

    def busy(self) -> None:
        """``busy_at`` requests in progress: automatic collection off."""
        if not self.suspended and self._taken_over:
            self.suspended = True
            self.suspensions += 1
            gc.disable()

    def quiet(self) -> None:
        """Down to ``quiet_at``: automatic (young) collection back."""
        if self.suspended:
            self.suspended = False
            gc.enable()

    def take_over(self) -> None:
        """Stop CPython's own full collections (young ones carry on)."""
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, NEVER)
        self._taken_over = True

    def give_back(self) -> None:
        self._taken_over = False
        self.suspended = False
        gc.set_threshold(*self._thresholds)
        if self._was_enabled:
            gc.enable()

    def tick(self) -> bool:
        """Collect if anything reached the old generation since the last full
        collection and the gateway is quiet or the interval is over; while
        suspended, the young generations once ``YOUNG_LIMIT`` are waiting.
        True when a full collection ran."""
        if self.suspended and gc.get_count()[0] >= YOUNG_LIMIT:
            gc.collect(1)
            self.young_collections += 1
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
