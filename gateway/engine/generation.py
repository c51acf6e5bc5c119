"""One generation on a :class:`NativeModel`: the per-token loop.

Runs in the engine's worker thread. Text is produced as exact token pieces,
decoded incrementally (a multi-byte character split across tokens is held
until complete), with stop sequences matched across token boundaries: text that
could still become a stop sequence is held back, so a stream never shows part
of a stop sequence and always equals the non-streamed answer.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.engine.adapters import AdapterSet
from gateway.engine.native import BatchEntry, GrammarError, NativeModel, SamplerSpec


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    stop: tuple[str, ...] = ()
    # None: no logprobs; k >= 0: the chosen token's logprob plus the top k.
    top_logprobs: int | None = None
    # LoRA adapters to apply (empty: the base model).
    adapters: AdapterSet = ()


@dataclass(frozen=True, slots=True)
class Alternative:
    token: str
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A generated token, with its logprob and the top alternatives."""

    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[Alternative, ...]


@dataclass(slots=True)
class Delta:
    """What one step adds: new text (possibly empty) and the token's info."""

    text: str
    tokens: list[TokenInfo] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    tokens: tuple[TokenInfo, ...]
    prompt_tokens: int
    completion_tokens: int
    # "stop", "length", or "cancelled" (the client went away).
    finish_reason: str
    # Leading prompt tokens whose KV cache a previous request left (not evaluated again).
    cached_tokens: int = 0


class _StopMatcher:
    """Releases text as it becomes safe: never a (prefix of a) stop sequence."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self._stops:
            return text
        pending = self._held + text
        cut = min((i for i in (pending.find(stop) for stop in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return pending[:cut]
        keep = self._partial_suffix(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def _partial_suffix(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _token_info(model: NativeModel, index: int, token: int, top_k: int) -> TokenInfo:
    logits = model.logits(index).astype(np.float64)
    peak = logits.max()
    log_total = peak + np.log(np.exp(logits - peak).sum())
    top: tuple[Alternative, ...] = ()
    if top_k:
        best = np.argpartition(-logits, top_k)[:top_k]
        best = best[np.argsort(-logits[best])]
        top = tuple(
            Alternative(
                model.piece_text(int(t)), model.pieces[int(t)], float(logits[t] - log_total)
            )
            for t in best
        )
    return TokenInfo(
        model.piece_text(token), model.pieces[token], float(logits[token] - log_total), top
    )


class Generation:
    """One sequence's generation: what to feed the next batch, and what to do
    with the token sampled for it. Driven by :func:`step`, in the engine's
    worker thread, possibly batched with other sequences.
    """

    def __init__(
        self,
        model: NativeModel,
        request: GenerationRequest,
        sequence: int,
        is_cancelled: Callable[[], bool] = lambda: False,
        emit: Callable[[Delta], None] | None = None,
        reusable: int = 0,
    ) -> None:
        """``reusable``: leading prompt tokens that ``sequence``'s KV cache
        already holds (see :mod:`gateway.engine.sequences`); the rest of the
        cache is dropped."""
        self.request = request
        self.sequence = sequence
        self.is_cancelled = is_cancelled
        self._model = model
        self._emit = emit
        self._sampler = model.sampler(request.sampler)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matcher = _StopMatcher(request.stop)
        self.cached = model.keep_prefix(sequence, reusable)
        # Every token evaluated into this sequence's KV cache, in order.
        self._fed = list(request.prompt[: self.cached])
        self._unfed = list(request.prompt[self.cached :])
        self._position = self.cached
        self._parts: list[str] = []
        self._infos: list[TokenInfo] = []
        self.generated = 0
        self.finish: str | None = None if request.max_tokens > 0 else "length"
        # Why this generation failed on its own (its grammar), if it did.
        self.error: GrammarError | None = None

    def feed(self, budget: int) -> list[BatchEntry]:
        """Entries for the next batch (at most ``budget``): a slice of the
        prompt, or the last sampled token. Logits only where we sample next."""
        chunk, self._unfed = self._unfed[:budget], self._unfed[budget:]
        start, self._position = self._position, self._position + len(chunk)
        self._fed.extend(chunk)
        last = len(chunk) - 1
        return [
            (token, start + i, self.sequence, i == last and not self._unfed)
            for i, token in enumerate(chunk)
        ]

    def advance(self, index: int) -> None:
        """Sample from batch entry ``index`` and take the token."""
        request = self.request
        try:
            token = self._sampler.sample(index)
        except GrammarError as error:
            # This generation's grammar, not the batch: the others go on.
            self.error = error
            self.finish = "error"
            return
        if token in self._model.end_tokens:
            # The end token is not part of the completion, so not counted.
            self.finish = "stop"
            return
        self.generated += 1
        step = Delta(self._matcher.feed(self._utf8.decode(self._model.pieces[token])))
        if request.top_logprobs is not None:
            step.tokens.append(_token_info(self._model, index, token, request.top_logprobs))
            self._infos.extend(step.tokens)
        self._parts.append(step.text)
        if self._emit is not None and (step.text or step.tokens):
            self._emit(step)
        if self._matcher.stopped:
            self.finish = "stop"
        elif self.generated >= request.max_tokens:
            self.finish = "length"
        else:
            self._unfed.append(token)

    def cancel(self) -> None:
        self.finish = "cancelled"

    def held(self) -> tuple[int, ...]:
        """The tokens this sequence's KV cache holds (once finished: what a
        later request can reuse)."""
        return tuple(self._fed)

    def result(self) -> GenerationResult:
        """Free the sampler and report; call once, when finished. The KV
        cache is kept (see :meth:`held`)."""
        self._sampler.close()
        if not self._matcher.stopped:
            tail = self._matcher.flush() + self._utf8.decode(b"", final=True)
            if tail:
                self._parts.append(tail)
                if self._emit is not None:
                    self._emit(Delta(tail))
        return GenerationResult(
            "".join(self._parts),
            tuple(self._infos),
            len(self.request.prompt),
            self.generated,
            self.finish or "length",
            self.cached,
        )


def _sequence_of(generation: Generation) -> int:
    return generation.sequence


def step(model: NativeModel, generations: list[Generation]) -> list[tuple[Generation, int]]:
    """Decode one batch for every unfinished generation, then sample for each
    one that asked for logits. Cancelled generations are marked finished
    before any work is spent on them, so a cancel takes effect within a token.
    Returns the generations fed and how many tokens each put in the batch
    (what its share of the step's time is measured by).
    """
    entries: list[BatchEntry] = []
    fed_counts: list[tuple[Generation, int]] = []
    samplers: list[tuple[Generation, int]] = []
    # In ascending sequence order: with one KV stream per sequence, llama.cpp
    # puts only consecutive, ascending sequence ids in one micro-batch and
    # splits anything else into several passes (llama_batch_allocr::
    # split_equal). Four streams in descending order decoded 35 % slower.
    for generation in sorted(generations, key=_sequence_of):
        if generation.finish is None and generation.is_cancelled():
            generation.cancel()
        if generation.finish is not None:
            continue
        budget = model.n_batch - len(entries)
        if budget <= 0:
            break
        fed = generation.feed(budget)
        entries.extend(fed)
        if fed:
            fed_counts.append((generation, len(fed)))
        if fed and fed[-1][3]:
            samplers.append((generation, len(entries) - 1))
    if not entries:
        return fed_counts
    model.decode(entries)
    for generation, index in samplers:
        generation.advance(index)
    return fed_counts


def generate(
    model: NativeModel,
    request: GenerationRequest,
    is_cancelled: Callable[[], bool] = lambda: False,
    emit: Callable[[Delta], None] | None = None,
) -> GenerationResult:
    """Run one generation alone, to the end, on sequence 0 (wiped first and after)."""
    generation = Generation(model, request, 0, is_cancelled, emit)
    try:
        while generation.finish is None:
            step(model, [generation])
    finally:
        result = generation.result()
        model.forget(0)
    if generation.error is not None:
        raise generation.error
    return result
