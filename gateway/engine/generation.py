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

from gateway.engine.native import NativeModel, SamplerSpec


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    stop: tuple[str, ...] = ()
    # None: no logprobs; k >= 0: the chosen token's logprob plus the top k.
    top_logprobs: int | None = None


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


def _token_info(model: NativeModel, token: int, top_k: int) -> TokenInfo:
    logits = model.last_logits().astype(np.float64)
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


def generate(
    model: NativeModel,
    request: GenerationRequest,
    is_cancelled: Callable[[], bool],
    emit: Callable[[Delta], None] | None = None,
) -> GenerationResult:
    """Generate up to ``request.max_tokens`` tokens after ``request.prompt``.

    ``emit`` (if given) receives each step's new text as it becomes final.
    ``is_cancelled`` is checked before every token: a cancelled generation
    stops within one token and reports ``finish_reason="cancelled"``.
    """
    model.reset()
    model.decode(request.prompt)
    sampler = model.sampler(request.sampler)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    matcher = _StopMatcher(request.stop)
    want_logprobs = request.top_logprobs is not None
    parts: list[str] = []
    infos: list[TokenInfo] = []
    generated = 0
    finish = "length"
    try:
        while generated < request.max_tokens:
            if is_cancelled():
                finish = "cancelled"
                break
            token = sampler.sample()
            if token in model.end_tokens:
                # The end token is not part of the completion: not counted,
                # so completion_tokens equals the tokens reported in logprobs.
                finish = "stop"
                break
            generated += 1
            step = Delta(matcher.feed(utf8.decode(model.pieces[token])))
            if want_logprobs:
                # The logits still belong to this position until the next decode.
                step.tokens.append(_token_info(model, token, request.top_logprobs or 0))
                infos.extend(step.tokens)
            parts.append(step.text)
            if emit is not None and (step.text or step.tokens):
                emit(step)
            if matcher.stopped:
                finish = "stop"
                break
            if generated < request.max_tokens:
                model.decode_one(token)
    finally:
        sampler.close()
    if not matcher.stopped:
        tail = matcher.flush() + utf8.decode(b"", final=True)
        if tail:
            parts.append(tail)
            if emit is not None:
                emit(Delta(tail))
    text = "".join(parts)
    return GenerationResult(text, tuple(infos), len(request.prompt), generated, finish)
