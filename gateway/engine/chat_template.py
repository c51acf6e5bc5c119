"""Renders chat messages into a prompt with the model's own Jinja template.

The template comes from the GGUF file, so it runs in Jinja's immutable sandbox:
a model file must not be able to execute code in the gateway.

The prompt comes out in parts, each saying whether it is the template's own
text or a message's: the template's markers (``<|im_start|>`` ...) are control
tokens, while the same characters written in a message must stay plain text,
or a user could forge a system turn. Rendering once more with each message's
content replaced by an unguessable sentinel shows where the contents went.
"""

from __future__ import annotations

import datetime
import re
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a model file carries no template: ChatML, which SmolLM2 and many
# other open models were trained on.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# What templates may do to a message's text on its way into the prompt
# (Llama 3's `| trim`); anything else is found out by comparing renders.
_CONTENT_FORMS: tuple[Callable[[str], str], ...] = (lambda text: text, str.strip)


class TemplateRenderError(ValueError):
    """The template rejected the conversation (for example, roles out of order)."""


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class PromptPart:
    """A piece of a rendered prompt. ``special``: the template's own text,
    whose markers are tokenized as control tokens; otherwise a message's
    text, tokenized as plain text whatever it contains."""

    text: str
    special: bool


# Text, and whether control-token markers in it are parsed: the engine's tokenizer.
Tokenize = Callable[[str, bool], list[int]]


def _raise(message: str) -> None:
    raise TemplateRenderError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime(fmt)


class ChatTemplate:
    def __init__(
        self,
        source: str | None,
        *,
        bos_token: str,
        eos_token: str,
        control_texts: Collection[str] = (),
    ) -> None:
        """``control_texts``: how the model's control tokens are written; a
        message containing one is refused when the template alters message text
        so that it cannot be kept apart (see :meth:`render_parts`)."""
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = _strftime_now
        self.source = source or CHATML
        self._template = environment.from_string(self.source)
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._control_texts = tuple(text for text in control_texts if text)

    def render(self, turns: list[ChatTurn]) -> str:
        """The prompt as one text (what a log or an echo shows)."""
        return self._render([turn.content for turn in turns], turns)

    def render_parts(self, turns: list[ChatTurn]) -> list[PromptPart]:
        """The prompt with every message's text apart from the template's.

        The sentinel render is trusted only if putting the contents back into
        it gives exactly the real render; a template that changes message
        text in another way (or branches on it) gets the whole prompt as the
        template's, which is safe only if no message writes a control token:
        one that does is refused.
        """
        rendered = self.render(turns)
        nonce = secrets.token_hex(8)
        sentinels = [f"\ue000{nonce}:{index}\ue001" for index in range(len(turns))]
        masked = self._render(sentinels, turns)
        pieces = re.split(f"\ue000{nonce}:([0-9]+)\ue001", masked)
        for form in _CONTENT_FORMS:
            parts = _parts(pieces, [form(turn.content) for turn in turns])
            if "".join(part.text for part in parts) == rendered:
                return [part for part in parts if part.text]
        self._refuse_control_text(turns)
        return [PromptPart(rendered, special=True)]

    def tokenize(self, turns: list[ChatTurn], tokenize: Tokenize) -> list[int]:
        """The prompt's tokens: control tokens from the template only."""
        tokens: list[int] = []
        for part in self.render_parts(turns):
            tokens += tokenize(part.text, part.special)
        return tokens

    def _render(self, contents: list[str], turns: list[ChatTurn]) -> str:
        messages = [
            {"role": turn.role, "content": content}
            for turn, content in zip(turns, contents, strict=True)
        ]
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except TemplateRenderError:
            raise
        except TemplateError as error:
            raise TemplateRenderError(f"the model's chat template failed: {error}") from error

    def _refuse_control_text(self, turns: list[ChatTurn]) -> None:
        for turn in turns:
            for marker in self._control_texts:
                if marker in turn.content:
                    raise TemplateRenderError(
                        f"a message contains {marker!r}, the text of one of the model's "
                        "control tokens; this model's chat template changes message text, "
                        "so it could not be kept as plain text"
                    )


def _parts(pieces: list[str], contents: list[str]) -> list[PromptPart]:
    """``re.split`` output (template text, message index, template text, ...)
    as parts, each index replaced by that message's content."""
    parts = []
    for position, piece in enumerate(pieces):
        if position % 2 == 0:
            parts.append(PromptPart(piece, special=True))
        else:
            parts.append(PromptPart(contents[int(piece)], special=False))
    return parts
