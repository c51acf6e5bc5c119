"""Which running generations share the next decode step.

llama.cpp applies LoRA adapters to a whole context, so one decode step serves
one adapter set; switching sets between steps costs about 20 µs. Generations
with different sets therefore run side by side, their steps interleaved,
instead of one set's batch draining before another may start (which let any
client that sends ``base:a@0.71``, ``@0.72``, ... make every batch a batch of
one, and everyone else wait for its whole generations).

Steps go to owners (API keys) in turns: the owner served longest ago picks
its generation that stepped longest ago, and every runnable generation with
that adapter set, whoever owns it, joins the step. So the usual case (one
set) is one full batch per step, as before, and an owner's variety of
adapter sets divides that owner's turns among its own generations: another
owner still gets at least every other step.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.engine.adapters import AdapterSet

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Seat(Generic[K]):
    """A generation that could step now: its key, owner and adapter set."""

    key: K
    owner: str
    adapters: AdapterSet


class Turns(Generic[K]):
    """Remembers who stepped when; picks the next step's generations."""

    def __init__(self) -> None:
        self._clock = 0
        self._owners: dict[str, int] = {}
        self._keys: dict[K, int] = {}

    def pick(self, seats: Sequence[Seat[K]]) -> list[Seat[K]]:
        """The seats of the next step (all with one adapter set); empty only
        when ``seats`` is."""
        if not seats:
            return []
        owner = min(
            dict.fromkeys(seat.owner for seat in seats),
            key=lambda name: self._owners.get(name, -1),
        )
        first = min(
            (seat for seat in seats if seat.owner == owner),
            key=lambda seat: self._keys.get(seat.key, -1),
        )
        chosen = [seat for seat in seats if seat.adapters == first.adapters]
        self._clock += 1
        for seat in chosen:
            self._keys[seat.key] = self._clock
            self._owners[seat.owner] = self._clock
        return chosen

    def leave(self, key: K, owner: str, owner_done: bool) -> None:
        """``key`` finished; ``owner_done``: its owner has nothing else running."""
        self._keys.pop(key, None)
        if owner_done:
            self._owners.pop(owner, None)
