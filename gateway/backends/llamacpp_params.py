"""Turns OpenAI requests into llama.cpp generation requests, checking what the
engine cannot do before any work starts."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from gateway import wire
from gateway.engine.chat_template import ChatTurn
from gateway.engine.grammar import GrammarCache, canonical_schema, grammar_for
from gateway.engine.native import DEFAULT_GRAMMAR_BUDGET, GrammarBudget, SamplerSpec
from gateway.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    UnsupportedFeatureError,
)
from gateway.schema_guard import SCHEMA_CEILINGS, Json, refuse

_ANY_OBJECT: Json = {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """A tool call forced by grammar: the model writes ``{"name", "arguments"}``."""

    names: tuple[str, ...]
    instruction: str


@dataclass(frozen=True, slots=True)
class Grammar:
    """GBNF that constrains the output, and the request param it comes from."""

    text: str
    param: str


@dataclass(frozen=True, slots=True)
class GrammarBuilder:
    """What building a grammar needs from the engine: llama.cpp's verdict on
    the text, and the cache of grammars that compiled."""

    compiles: Callable[[str], bool]
    cache: GrammarCache


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


def tool_schema(request: wire.ChatCompletionRequest, plan: ToolPlan) -> tuple[Json, str]:
    """The schema of the tool call the model must write, and its param.

    Each tool's parameters are checked (with the engine's ceilings) where they
    are, so a refusal names ``tools[i].function.parameters...``; together they
    must still fit one grammar.
    """
    variants: list[Json] = []
    params = []
    estimate = 0
    for index, tool in enumerate(request.tools or []):
        if tool.function.name not in plan.names:
            continue
        param = f"tools[{index}].function.parameters"
        checked = canonical_schema(bytes(tool.function.parameters), param)
        estimate += checked.grammar_estimate
        if estimate > SCHEMA_CEILINGS.max_grammar_bytes:
            raise refuse(param, "the tools' schemas together make too large a grammar")
        arguments = _ANY_OBJECT if checked.document is None else checked.document
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
                "required": ["name", "arguments"],
            }
        )
        params.append(param)
    if len(variants) == 1:
        return variants[0], params[0]
    return {"anyOf": variants}, "tools"


def response_grammar(
    request: wire.ChatCompletionRequest, plan: ToolPlan | None, builder: GrammarBuilder
) -> Grammar | None:
    """The grammar the output must follow, if any (checked: a 400 otherwise)."""
    if plan is not None:
        schema, param = tool_schema(request, plan)
    elif isinstance(request.response_format, wire.ResponseFormatJsonObject):
        schema, param = _ANY_OBJECT, "response_format"
    elif isinstance(request.response_format, wire.ResponseFormatJsonSchema):
        param = "response_format.json_schema.schema"
        checked = canonical_schema(bytes(request.response_format.json_schema.schema), param)
        schema = _ANY_OBJECT if checked.document is None else checked.document
    else:
        return None
    text = grammar_for(schema, param, compiles=builder.compiles, cache=builder.cache)
    return Grammar(text, param)


def logit_bias(bias: dict[str, float] | None, n_vocab: int) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    pairs = []
    for key, value in bias.items():
        # ASCII digits only: "²" is a digit to str.isdigit but not to int().
        if not (key.isascii() and key.isdigit()) or len(key) > 9 or int(key) >= n_vocab:
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
    grammar_budget: GrammarBudget = DEFAULT_GRAMMAR_BUDGET,
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
        grammar_budget=grammar_budget,
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
