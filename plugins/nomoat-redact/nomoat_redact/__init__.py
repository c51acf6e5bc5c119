"""nomoat-redact: mask personal data in prompts before they leave the gateway.

A request hook (``type = "redact"``). In every message of a chat request (the
text content, as a string or as text parts, of every role) and in the prompt
of a completion request, it replaces:

* e-mail addresses with ``[EMAIL]``: a local part of at most 64 characters
  and a domain of labels of at most 63 (the limits of RFC 5321 and RFC 1035:
  anything longer is not a deliverable address);
* card numbers with ``[CARD]``: 13 to 19 digits, optionally grouped by single
  spaces or dashes, that pass the Luhn check. Other long numbers (order ids,
  timestamps) are left alone; about one random number in ten passes Luhn,
  so a long id may still be masked now and then;
* phone numbers with ``[PHONE]``: international ``+CC ...`` numbers of 7 to 15
  digits, and national numbers written with separators (``(415) 555-2671``,
  ``415-555-2671``, ``020 7946 0958``). A bare run of digits is not taken for a
  phone number: it is far more often an id.

Masks and which kinds are masked are configurable. Token-id prompts and tool
call arguments are not touched. The request is copied only when something
was masked.

Time is linear in the text: every pattern matches at most a bounded number of
characters and tries a bounded number of ways from each position (no nested
unbounded repetition), so a text is scanned in windows of :data:`WINDOW`
characters. The hook gives the event loop a turn whenever it has worked for
:data:`SLICE_SECONDS`: a 4 MB body delays the gateway's other requests by a
few milliseconds at a time, never by the whole scan (docs/security/redact.md).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from gateway.contract import (
    AnyRequest,
    AnyResponse,
    ChatCompletionRequest,
    HookType,
    PluginManifest,
    RequestContext,
)

__all__ = ["RedactConfig", "Redactor", "luhn_valid", "manifest"]

Kind = Literal["email", "phone", "card"]

# Characters scanned per regex call, and matches replaced (a Python call
# each): a window takes a few milliseconds at most.
WINDOW = 32 * 1024
MATCHES_PER_WINDOW = 256
# CPU time the hook may take before it lets the event loop run other tasks.
SLICE_SECONDS = 0.005

# Each pattern below has a longest match (its *_LONGEST) and looks at most one
# or two characters past it, so a match that starts in a window is decided by
# the text up to `reach` characters past the window's end. The local part and
# the labels are possessive or end in a fixed character: from each position a
# pattern tries a bounded number of ways, never one per split of a long run.
_LOCAL = r"[\w.+%-]{1,64}+"  # RFC 5321: at most 64 characters
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # RFC 1035: at most 63
_MORE_LABELS = 125  # with the first and the top-level one: 127, as in 253 characters
EMAIL = re.compile(
    # Not inside a longer local part: '%' is a local-part character too, so
    # no match starts after one (a start after every '%' of a long run of
    # them, each scanning the rest of the run, was the quadratic case).
    r"(?<![\w.+%-])"
    + _LOCAL
    + "@"
    + _LABEL
    + rf"(?:\.{_LABEL}){{0,{_MORE_LABELS}}}"
    + r"\.[A-Za-z]{2,63}(?![\w-])"
)
EMAIL_LONGEST = 64 + 1 + 63 + _MORE_LABELS * 64 + 1 + 63
# Digits in groups separated by at most one space or dash; Luhn decides.
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
CARD_LONGEST = 1 + 18 * 2
# Not inside a longer number or word, nor followed by more digit groups.
_EDGE_BEFORE = r"(?<![\w+])(?<!\d[ .-])"
_EDGE_AFTER = r"(?![\w])(?![ .-]\d)"
PHONE = re.compile(
    _EDGE_BEFORE
    + r"(?:"
    # +44 20 7946 0958. Each group is atomic: it takes all the digits it can
    # (up to 5). Letting a group give digits back to the next one made a
    # failing run of 30 digits try every split of it (about a millisecond
    # per '+', minutes for a body full of them); the split never changes
    # where a match can end, only how many groups it takes, and greedy groups
    # take the fewest.
    + r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?>[ .-]?\d{1,5}){1,5}"
    + r"|(?:\(\d{2,5}\)[ .-]?|\d{2,5}[ .-])\d{3,4}[ .-]\d{3,4}"  # (415) 555-2671
    + r")"
    + _EDGE_AFTER
)
PHONE_LONGEST = 1 + 3 + 7 + 5 * 6


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


_NOT_DIGIT = re.compile(r"\D")


def _digits(text: str) -> str:
    return _NOT_DIGIT.sub("", text)


@dataclass(frozen=True, slots=True)
class _Pass:
    """One pattern and what its matches become, applied window by window."""

    pattern: re.Pattern[str]
    replace: Callable[[re.Match[str]], str]
    # Characters past a window's end that decide a match starting in it: the
    # longest match plus the pattern's look-ahead.
    reach: int

    def pieces(self, text: str, window: int = WINDOW) -> Iterator[str]:
        """The text with every match replaced, in consecutive pieces: what
        ``pattern.sub(replace, text)`` returns, one regex call per window.

        A match is taken by the window it starts in, whole; the next window
        starts after it. Searching up to ``reach`` past the window's end sees
        all the text that decides such a match, and look-behinds see the
        whole text whatever the start position, so the matches are those of
        one call over the whole text."""
        pos = 0
        while pos < len(text):
            end = pos + window
            last = pos
            piece: list[str] = []
            for match in self.pattern.finditer(text, pos, end + self.reach):
                if match.start() >= end:
                    break
                piece += (text[last : match.start()], self.replace(match))
                last = match.end()
                if len(piece) == 2 * MATCHES_PER_WINDOW:
                    end = last  # the next window searches on from this match
                    break
            pos = max(last, min(end, len(text)))
            piece.append(text[last:pos])
            yield "".join(piece)


class _Pacer:
    """Gives the event loop a turn once the work since the last one has
    taken ``slice_seconds``: other requests wait at most about that long."""

    def __init__(self, slice_seconds: float) -> None:
        self._slice = slice_seconds
        self._until = time.monotonic() + slice_seconds

    async def __call__(self) -> None:
        if time.monotonic() >= self._until:
            await asyncio.sleep(0)
            self._until = time.monotonic() + self._slice


class RedactConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # What to mask, out of "email", "phone", "card".
    kinds: Annotated[frozenset[Kind], Field(min_length=1)] = frozenset(("email", "phone", "card"))
    # What each kind is replaced with.
    email_mask: str = "[EMAIL]"
    phone_mask: str = "[PHONE]"
    card_mask: str = "[CARD]"


class Redactor:
    """Masks, in order: e-mail addresses, card numbers, phone numbers (cards
    first, so a card number is never half-taken for a phone number)."""

    def __init__(
        self, config: RedactConfig, window: int = WINDOW, slice_seconds: float = SLICE_SECONDS
    ) -> None:
        self.config = config
        self._window = window
        self._slice = slice_seconds
        passes: list[_Pass] = []
        if "email" in config.kinds:
            passes.append(_Pass(EMAIL, lambda _: config.email_mask, EMAIL_LONGEST + 1))
        if "card" in config.kinds:
            passes.append(_Pass(CARD, self._card, CARD_LONGEST + 1))
        if "phone" in config.kinds:
            passes.append(_Pass(PHONE, self._phone, PHONE_LONGEST + 2))
        self._passes = passes

    def redact(self, text: str) -> str:
        for step in self._passes:
            text = "".join(step.pieces(text, self._window))
        return text

    def _card(self, match: re.Match[str]) -> str:
        digits = _digits(match.group())
        return self.config.card_mask if luhn_valid(digits) else match.group()

    def _phone(self, match: re.Match[str]) -> str:
        count = len(_digits(match.group()))
        plausible = 7 <= count <= 15 if match.group().startswith("+") else 9 <= count <= 12
        return self.config.phone_mask if plausible else match.group()

    async def on_request(
        self, request: AnyRequest, ctx: RequestContext
    ) -> AnyRequest | AnyResponse:
        pace = _Pacer(self._slice)
        if isinstance(request, ChatCompletionRequest):
            messages = [await self._message(message, pace) for message in request.messages]
            if any(new is not old for new, old in zip(messages, request.messages, strict=True)):
                return msgspec.structs.replace(request, messages=messages)
            return request
        prompt = request.prompt
        if isinstance(prompt, str):
            masked: Any = await self._redact(prompt, pace)
        else:
            masked = [
                await self._redact(item, pace) if isinstance(item, str) else item for item in prompt
            ]
        return request if masked == prompt else msgspec.structs.replace(request, prompt=masked)

    async def _redact(self, text: str, pace: _Pacer) -> str:
        """:meth:`redact`, pausing between windows when the slice is used up."""
        for step in self._passes:
            pieces: list[str] = []
            for piece in step.pieces(text, self._window):
                pieces.append(piece)
                await pace()
            text = "".join(pieces)
        return text

    async def _message(self, message: Any, pace: _Pacer) -> Any:
        """The message with its text masked; the same object if unchanged."""
        content = message.content
        if isinstance(content, str):
            masked = await self._redact(content, pace)
            return (
                message if masked == content else msgspec.structs.replace(message, content=masked)
            )
        if not isinstance(content, list):
            return message  # an assistant message with only tool calls
        parts = [await self._part(part, pace) for part in content]
        if all(new is old for new, old in zip(parts, content, strict=True)):
            return message
        return msgspec.structs.replace(message, content=parts)

    async def _part(self, part: Any, pace: _Pacer) -> Any:
        # Text parts carry `text`, refusal parts `refusal`; images and audio neither.
        for field in ("text", "refusal"):
            value = getattr(part, field, None)
            if isinstance(value, str):
                masked = await self._redact(value, pace)
                if masked != value:
                    return msgspec.structs.replace(part, **{field: masked})
        return part


def _factory(config: RedactConfig) -> Redactor:
    return Redactor(config)


manifest = PluginManifest(name="redact", hooks={"redact": HookType(RedactConfig, _factory)})
