"""What the gateway knows about each deployment, for the policies to weigh:
requests in flight, latency averages, the engine's own load, and passive
health (failures put a deployment in cooldown).

Everything here is in-memory arithmetic on the event loop: no I/O, no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeGuard

from gateway.contract import (
    Backend,
    Candidate,
    CandidateStats,
    ReportsAdapterSlots,
    ReportsLoad,
    SupportsLoRA,
)

# isinstance() against a runtime-checkable Protocol inspects every member on
# each call (several microseconds); a backend's class decides it, so it is
# asked once per (capability, class).
_CAPABILITIES: dict[tuple[type, type], bool] = {}


def _has(backend: object, capability: type) -> bool:
    key = (capability, type(backend))
    known = _CAPABILITIES.get(key)
    if known is None:
        known = _CAPABILITIES[key] = isinstance(backend, capability)
    return known


def reports_load(backend: object) -> TypeGuard[ReportsLoad]:
    return _has(backend, ReportsLoad)


def supports_lora(backend: object) -> TypeGuard[SupportsLoRA]:
    return _has(backend, SupportsLoRA)


def reports_adapter_slots(backend: object) -> TypeGuard[ReportsAdapterSlots]:
    return _has(backend, ReportsAdapterSlots)


def serves_adapters(backend: object) -> TypeGuard[SupportsLoRA]:
    """A backend that takes adapter requests now (has the capability and is
    configured for it)."""
    return supports_lora(backend) and backend.serves_adapters()


@dataclass
class _Deployment:
    in_flight: int = 0
    ewma_ttft: float | None = None
    ewma_token_time: float | None = None
    failures: int = 0
    cooldown_until: float = 0.0


def _ewma(previous: float | None, sample: float, alpha: float) -> float:
    return sample if previous is None else previous + alpha * (sample - previous)


class StatsTable:
    def __init__(
        self,
        *,
        alpha: float = 0.3,
        cooldown_seconds: float = 10.0,
        failures_before_cooldown: int = 1,
        max_ejected_share: float = 0.5,
    ) -> None:
        self._alpha = alpha
        self._cooldown = cooldown_seconds
        self._failures_before_cooldown = failures_before_cooldown
        self._max_ejected_share = max_ejected_share
        self._table: dict[str, _Deployment] = {}
        # Requests waiting for a deployment below its max_concurrency, woken
        # (all of them: each checks again) when any attempt ends.
        self._slot_waiters: list[asyncio.Future[None]] = []
        # Requests that waited for a slot, and those whose wait ran out.
        self.capacity_waits = 0
        self.capacity_timeouts = 0

    def _entry(self, deployment: str) -> _Deployment:
        entry = self._table.get(deployment)
        if entry is None:
            entry = self._table[deployment] = _Deployment()
        return entry

    # ------------------------------------------------------------ recording

    def started(self, deployment: str) -> None:
        self._entry(deployment).in_flight += 1

    def finished(self, deployment: str) -> None:
        self._entry(deployment).in_flight -= 1
        if self._slot_waiters:
            waiters, self._slot_waiters = self._slot_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # ------------------------------------------------------------- capacity

    def full(self, candidate: Candidate) -> bool:
        """At its ``max_concurrency``: not to be tried now."""
        limit = candidate.max_concurrency
        return limit is not None and self.in_flight(candidate.target.deployment) >= limit

    @property
    def waiting_for_capacity(self) -> int:
        """Requests waiting now for a deployment below its max_concurrency."""
        return len(self._slot_waiters)

    async def slot_freed(self, seconds: float) -> bool:
        """Wait until an attempt ends (some deployment may have a free slot
        now), at most ``seconds``; whether one ended."""
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(seconds):
                await waiter
        except TimeoutError:
            return False
        finally:
            if waiter in self._slot_waiters:
                self._slot_waiters.remove(waiter)
        return True

    def observe(self, deployment: str, ttft: float | None, seconds: float, tokens: int) -> None:
        """A completed answer: time to its first token (streams only), its
        duration and its completion tokens."""
        entry = self._entry(deployment)
        entry.failures = 0
        if ttft is not None:
            entry.ewma_ttft = _ewma(entry.ewma_ttft, ttft, self._alpha)
        if tokens > 0:
            generating = seconds - (ttft or 0.0)
            entry.ewma_token_time = _ewma(entry.ewma_token_time, generating / tokens, self._alpha)

    def failed(self, deployment: str, now: float | None = None) -> None:
        """A failure before the first byte; enough of them start a cooldown."""
        entry = self._entry(deployment)
        entry.failures += 1
        if entry.failures >= self._failures_before_cooldown:
            entry.cooldown_until = (now or time.monotonic()) + self._cooldown

    def succeeded(self, deployment: str) -> None:
        entry = self._entry(deployment)
        entry.failures = 0
        entry.cooldown_until = 0.0

    # -------------------------------------------------------------- reading

    def in_flight(self, deployment: str) -> int:
        """Attempts started and not ended: an answer until it arrives, a
        stream until its last chunk, its error or its cancellation."""
        entry = self._table.get(deployment)
        return entry.in_flight if entry is not None else 0

    def in_cooldown(self, deployment: str, now: float | None = None) -> bool:
        entry = self._table.get(deployment)
        return entry is not None and entry.cooldown_until > (now or time.monotonic())

    def cooldown_left(self, deployment: str, now: float | None = None) -> float:
        """Seconds until ``deployment`` leaves its cooldown (0: not in one)."""
        entry = self._table.get(deployment)
        if entry is None:
            return 0.0
        return max(entry.cooldown_until - (now or time.monotonic()), 0.0)

    def available(
        self,
        candidates: Sequence[Candidate],
        ready: Mapping[str, bool],
        now: float | None = None,
    ) -> list[Candidate]:
        """The candidates worth trying: healthy backends, not in cooldown,
        below their ``max_concurrency``. At
        most ``max_ejected_share`` of a pool is ever left out (those closest
        to the end of their cooldown come back first): a flaky probe must not
        empty a whole pool."""
        moment = now or time.monotonic()
        out = [
            c
            for c in candidates
            if not ready.get(c.backend, True) or self.in_cooldown(c.target.deployment, moment)
        ]
        keep_out = int(len(candidates) * self._max_ejected_share)
        if len(out) > keep_out:
            # Readmit first what is only cooling down, soonest to recover;
            # keep out last what its active probe says is down.
            out.sort(
                key=lambda c: (
                    not ready.get(c.backend, True),
                    self._entry(c.target.deployment).cooldown_until,
                )
            )
            out = out[len(out) - keep_out :] if keep_out else []
        return [c for c in candidates if c not in out and not self.full(c)]

    def snapshot(
        self, candidates: Sequence[Candidate], backends: Mapping[str, Backend]
    ) -> dict[str, CandidateStats]:
        stats = {}
        for candidate in candidates:
            entry = self._entry(candidate.target.deployment)
            backend = backends.get(candidate.backend)
            load = backend.load() if reports_load(backend) else None
            adapters: frozenset[str] = frozenset()
            slots = None
            if candidate.target.adapters and supports_lora(backend):
                adapters = backend.adapters_loaded()
                slots = backend.adapter_slots() if reports_adapter_slots(backend) else None
            stats[candidate.target.deployment] = CandidateStats(
                in_flight=entry.in_flight,
                queue_depth=load.waiting if load else None,
                running=load.running if load else None,
                kv_cache_usage=load.kv_cache_usage if load else None,
                ewma_ttft=entry.ewma_ttft,
                ewma_token_time=entry.ewma_token_time,
                adapters_loaded=adapters,
                adapter_slots=slots,
            )
        return stats
