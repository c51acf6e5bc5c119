"""Turns OpenAI requests into llama.cpp generation requests, checking what the
engine cannot do before any work starts."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import msgspec
from llama_cpp.llama_grammar import json_schema_to_gbnf

from gateway import wire
from gateway.engine.chat_template import ChatTurn
from gateway.engine.native import SamplerSpec
from gateway.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    UnsupportedFeatureError,
)

_ANY_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """A tool call forced by grammar: the model writes ``{"name", "arguments"}``."""

    names: tuple[str, ...]
    instruction: str


@functools.lru_cache(maxsize=256)
def grammar_for_schema(schema_json: str) -> str:
    """GBNF for a JSON schema (cached: clients repeat the same schemas)."""
    try:
        return str(json_schema_to_gbnf(schema_json))
    except Exception as error:  # the converter raises bare Exceptions
        raise InvalidRequestError(
            f"response_format: the JSON schema is not supported: {error}", param="response_format"
        ) from error


def _raw_json(raw: msgspec.Raw, *, param: str) -> str:
    text = bytes(raw).decode().strip()
    if text == "null":
        return _ANY_OBJECT_SCHEMA
    if not text.lstrip().startswith("{"):
        raise InvalidRequestError(f"{param} must be a JSON object", param=param)
    return text


def chat_turns(messages: list[wire.Message], model: str) -> list[ChatTurn]:
    turns = []
    for index, message in enumerate(messages):
        if isinstance(message, wire.UserMessage) and not isinstance(message.content, str):
            for part in message.content:
                if not isinstance(part, wire.TextPart):
                    raise UnsupportedFeatureError(
                        f"model {model} accepts text only; "
                        f"messages[{index}] contains {type(part).__name__}",
                        param=f"messages[{index}].content",
                    )
        turns.append(_turn(message))
    return turns


def _part_text(part: wire.UserContentPart | wire.AssistantContentPart) -> str:
    if isinstance(part, wire.TextPart):
        return part.text
    return part.refusal if isinstance(part, wire.RefusalPart) else ""


def _content_text(
    content: str
    | list[wire.TextPart]
    | list[wire.UserContentPart]
    | list[wire.AssistantContentPart]
    | None,
) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(_part_text(part) for part in content)


def _turn(message: wire.Message) -> ChatTurn:
    text = _content_text(message.content)
    if isinstance(message, wire.AssistantMessage) and message.tool_calls:
        calls = [
            {"name": call.function.name, "arguments": call.function.arguments}
            for call in message.tool_calls
        ]
        text = (text + "\n" if text else "") + json.dumps(calls)
    # Templates trained before "developer" existed know it as "system".
    role = (
        "system"
        if isinstance(message, wire.DeveloperMessage)
        else type(message).__struct_config__.tag
    )
    return ChatTurn(str(role), text)


def tool_plan(request: wire.ChatCompletionRequest, model: str) -> ToolPlan | None:
    """How tools will be served, or None when they are not used.

    This engine has no native tool-calling template, so it serves tool calls
    the model is told to make (``tool_choice`` ``"required"`` or a named
    function) by constraining the output with a grammar. Deciding by itself
    whether to call a tool (``"auto"``) needs a model trained for it: refused.
    """
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return None
    if choice is None or choice == "auto":
        raise UnsupportedFeatureError(
            f"model {model} cannot decide by itself whether to call a tool; use tool_choice "
            f'"required", a named function, or "none"',
            param="tool_choice",
        )
    tools = {tool.function.name: tool.function for tool in request.tools}
    if isinstance(choice, wire.NamedToolChoice):
        if choice.function.name not in tools:
            raise InvalidRequestError(
                f'tool_choice names "{choice.function.name}", which is not in tools',
                param="tool_choice",
            )
        tools = {choice.function.name: tools[choice.function.name]}
    lines = [f"- {name}: {spec.description or ''}" for name, spec in tools.items()]
    instruction = (
        "Call one of these functions by replying with JSON "
        '{"name": ..., "arguments": {...}} only:\n' + "\n".join(lines)
    )
    return ToolPlan(tuple(tools), instruction)


def tool_schema(request: wire.ChatCompletionRequest, plan: ToolPlan) -> str:
    variants = []
    for tool in request.tools or []:
        if tool.function.name not in plan.names:
            continue
        arguments = _raw_json(tool.function.parameters, param="tools")
        variants.append(
            '{"type": "object", "properties": {"name": {"const": '
            + json.dumps(tool.function.name)
            + '}, "arguments": '
            + arguments
            + '}, "required": ["name", "arguments"]}'
        )
    return variants[0] if len(variants) == 1 else '{"anyOf": [' + ", ".join(variants) + "]}"


def response_grammar(request: wire.ChatCompletionRequest, plan: ToolPlan | None) -> str | None:
    if plan is not None:
        return grammar_for_schema(tool_schema(request, plan))
    response_format = request.response_format
    if isinstance(response_format, wire.ResponseFormatJsonObject):
        return grammar_for_schema(_ANY_OBJECT_SCHEMA)
    if isinstance(response_format, wire.ResponseFormatJsonSchema):
        schema = _raw_json(response_format.json_schema.schema, param="response_format")
        return grammar_for_schema(schema)
    return None


def logit_bias(bias: dict[str, float] | None, n_vocab: int) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    pairs = []
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= n_vocab:
            raise InvalidRequestError(
                f"logit_bias: {key!r} is not a token id of this model (0..{n_vocab - 1})",
                param="logit_bias",
            )
        pairs.append((int(key), value))
    return tuple(pairs)


def sampler_spec(
    request: wire.ChatCompletionRequest | wire.CompletionRequest,
    *,
    n_vocab: int,
    grammar: str | None,
    choice_index: int,
) -> SamplerSpec:
    seed = request.seed
    return SamplerSpec(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        # Each of n choices gets its own stream of randomness, reproducibly.
        seed=None if seed is None else seed + choice_index,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=logit_bias(request.logit_bias, n_vocab),
        grammar=grammar,
    )


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def completion_budget(
    requested: int | None, prompt_tokens: int, context_length: int, *, param: str
) -> int:
    """Tokens the completion may use; refuses a request that cannot fit."""
    room = context_length - prompt_tokens
    if room <= 0 or (requested is not None and requested > room):
        asked = prompt_tokens + (requested or 0)
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {asked} tokens ({prompt_tokens} in the messages, {requested or 0} in "
            f"the completion). Please reduce the length of the messages or completion.",
            param="messages" if room <= 0 else param,
        )
    return room if requested is None else requested
