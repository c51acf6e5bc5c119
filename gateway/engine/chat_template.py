"""Renders chat messages into a prompt with the model's own Jinja template.

The template comes from the GGUF file, so it runs in Jinja's immutable sandbox:
a model file must not be able to execute code in the gateway.
"""

from __future__ import annotations

import datetime
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


class TemplateRenderError(ValueError):
    """The template rejected the conversation (for example, roles out of order)."""


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str


def _raise(message: str) -> None:
    raise TemplateRenderError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str, eos_token: str) -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = _strftime_now
        self.source = source or CHATML
        self._template = environment.from_string(self.source)
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(self, turns: list[ChatTurn]) -> str:
        messages = [{"role": turn.role, "content": turn.content} for turn in turns]
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
