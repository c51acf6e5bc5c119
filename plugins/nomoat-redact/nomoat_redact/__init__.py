"""nomoat-redact: mask personal data in prompts before they leave the gateway.

A request hook (``type = "redact"``). In every message of a chat request (the
text content, as a string or as text parts, of every role) and in the prompt
of a completion request, it replaces:

* e-mail addresses with ``[EMAIL]``;
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
"""

from __future__ import annotations

import re
from collections.abc import Callable
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

EMAIL = re.compile(
    r"(?<![\w.+-])[\w.+%-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])"
)
# Digits in groups separated by at most one space or dash; Luhn decides.
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# Not inside a longer number or word, nor followed by more digit groups.
_EDGE_BEFORE = r"(?<![\w+])(?<!\d[ .-])"
_EDGE_AFTER = r"(?![\w])(?![ .-]\d)"
PHONE = re.compile(
    _EDGE_BEFORE
    + r"(?:"
    + r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,5}"  # +44 20 7946 0958
    + r"|(?:\(\d{2,5}\)[ .-]?|\d{2,5}[ .-])\d{3,4}[ .-]\d{3,4}"  # (415) 555-2671
    + r")"
    + _EDGE_AFTER
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


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

    def __init__(self, config: RedactConfig) -> None:
        self.config = config
        steps: list[Callable[[str], str]] = []
        if "email" in config.kinds:
            steps.append(lambda text: EMAIL.sub(config.email_mask, text))
        if "card" in config.kinds:
            steps.append(lambda text: CARD.sub(self._card, text))
        if "phone" in config.kinds:
            steps.append(lambda text: PHONE.sub(self._phone, text))
        self._steps = steps

    def redact(self, text: str) -> str:
        for step in self._steps:
            text = step(text)
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
        if isinstance(request, ChatCompletionRequest):
            messages = [self._message(message) for message in request.messages]
            if any(new is not old for new, old in zip(messages, request.messages, strict=True)):
                return msgspec.structs.replace(request, messages=messages)
            return request
        prompt = request.prompt
        if isinstance(prompt, str):
            masked: Any = self.redact(prompt)
        else:
            masked = [self.redact(item) if isinstance(item, str) else item for item in prompt]
        return request if masked == prompt else msgspec.structs.replace(request, prompt=masked)

    def _message(self, message: Any) -> Any:
        """The message with its text masked; the same object if unchanged."""
        content = message.content
        if isinstance(content, str):
            masked = self.redact(content)
            return (
                message if masked == content else msgspec.structs.replace(message, content=masked)
            )
        if not isinstance(content, list):
            return message  # an assistant message with only tool calls
        parts = [self._part(part) for part in content]
        if all(new is old for new, old in zip(parts, content, strict=True)):
            return message
        return msgspec.structs.replace(message, content=parts)

    def _part(self, part: Any) -> Any:
        # Text parts carry `text`, refusal parts `refusal`; images and audio neither.
        for field in ("text", "refusal"):
            value = getattr(part, field, None)
            if isinstance(value, str):
                masked = self.redact(value)
                if masked != value:
                    return msgspec.structs.replace(part, **{field: masked})
        return part


def _factory(config: RedactConfig) -> Redactor:
    return Redactor(config)


manifest = PluginManifest(name="redact", hooks={"redact": HookType(RedactConfig, _factory)})
