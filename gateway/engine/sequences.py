"""Which llama.cpp sequence a new generation runs on, and what it can reuse.

Every sequence has its own slice of the KV cache, and a finished generation
leaves its tokens there. A new request is given the free sequence that already
holds the longest prefix of its prompt, computed under the same LoRA adapter
set, so only the rest of the prompt is evaluated: a chat's next turn, or the
same system prompt again, starts at once. This is llama-server's
``cache_prompt``. KV computed under one adapter set is never reused under
another: the adapters change every layer's keys and values.

Nor is it reused across owners (API keys, by fingerprint): a prefix another
tenant left is not reused, so neither ``cached_tokens`` nor the time to the
first token tells one key what another key's prompts began with. (Without
keys every request has the same owner, and all of them share the cache.)

Among equally good sequences the lowest is taken, so the busy ones stay
consecutive (see :func:`gateway.engine.generation.step` for why that matters).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from gateway.engine.adapters import AdapterSet


@dataclass(frozen=True, slots=True)
class Held:
    """What a sequence's KV cache holds: tokens, computed under ``adapters``
    for ``owner``'s request."""

    tokens: tuple[int, ...] = ()
    adapters: AdapterSet = ()
    owner: str = ""


@dataclass(frozen=True, slots=True)
class Lease:
    """A sequence to run on, and how many leading prompt tokens it already holds."""

    sequence: int
    reusable: int


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    limit = min(len(a), len(b))
    # Halving on slice equality (compared in C) instead of a Python loop per token.
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == tuple(b[:middle]):
            low = middle
        else:
            high = middle - 1
    return low


class SequencePool:
    """The free sequences of one context, and what each one holds.

    Used by the engine's worker thread only. With ``reuse_prompts`` off, every
    lease reuses nothing (the lowest free sequence, wiped by the generation).
    """

    def __init__(self, n_seq: int, *, reuse_prompts: bool) -> None:
        self.reuse_prompts = reuse_prompts
        self._free = list(range(n_seq))  # a heap: the lowest first
        self._held = [Held() for _ in range(n_seq)]

    @property
    def free(self) -> int:
        return len(self._free)

    def lease(self, prompt: list[int], adapters: AdapterSet, owner: str = "") -> Lease:
        """Take the free sequence holding the longest prefix of ``prompt``
        under ``adapters`` and left by ``owner`` (the lowest on a tie, or
        when none holds any).

        At least the prompt's last token is left to evaluate: its logits are
        what the first generated token is sampled from."""
        best = Lease(self._free[0], 0)
        if self.reuse_prompts:
            for sequence in sorted(self._free):
                held = self._held[sequence]
                if held.adapters != adapters or held.owner != owner or not held.tokens:
                    continue
                reusable = min(common_prefix(held.tokens, prompt), len(prompt) - 1)
                if reusable > best.reusable:
                    best = Lease(sequence, reusable)
        self._free.remove(best.sequence)
        heapq.heapify(self._free)
        self._held[best.sequence] = Held()
        return best

    def release(self, sequence: int, held: Held) -> None:
        """``sequence`` is free again; its KV cache holds ``held`` (``Held()``:
        nothing reusable, for example after a failed decode)."""
        self._held[sequence] = held if self.reuse_prompts else Held()
        heapq.heappush(self._free, sequence)
