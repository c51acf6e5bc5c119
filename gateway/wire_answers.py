"""OpenAI's answers (chat completions, their chunks, text completions) as
msgspec Structs, used both for what the gateway answers and for what it reads
from upstreams (vLLM, edge nodes, hosted APIs).

Reading is lenient, writing is exact, and an upstream's answer is decoded once,
into these same objects. Every field the OpenAI API may leave out or send as
null has a default, and unknown fields (Groq's ``x_groq``, DeepSeek's
``reasoning_content``, vLLM's ``stop_reason``) are dropped by the decoder, so
nothing an upstream adds is forwarded blindly. What OpenAI's published
description does not allow in an answer is folded into what it does: a field
that is "a string or absent" is ``X | None = None`` in an ``omit_defaults``
struct (null and absent both leave it out); fields that must be present even
when null live in structs without ``omit_defaults``; ``__post_init__`` (which
the decoder runs once per object) fixes the rest. Fields OpenAI sends for
request options the gateway does not take (``service_tier``, ``audio``,
``annotations``, ``obfuscation``) are dropped too. The description itself is
kept in tests/data/openai-openapi-answers.json, and the tests validate every
shape the gateway sends against it.
"""

from __future__ import annotations

from typing import Literal

from msgspec import UNSET, Struct, UnsetType


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str


class ToolCall(Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# Finish reasons as OpenAI names them, and other engines' words for the same
# ends (TGI, Together, Mistral, llama.cpp). Anything else (vLLM's "abort",
# Mistral's "error", DeepSeek's "insufficient_system_resource") is an answer
# that did not finish: the decoder refuses it and the attempt fails.
FINISH_REASONS: dict[str, str] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "function_call",
    "eos": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "model_length": "length",
    "max_tokens": "length",
}

# "stop", "length", "tool_calls", "content_filter" (or "function_call").
FinishReason = str


def _finish_reason(reason: str) -> str:
    known = FINISH_REASONS.get(reason)
    if known is None:
        # A ValueError in __post_init__ becomes the decoder's ValidationError.
        raise ValueError(f"finish_reason {reason!r} is not one OpenAI sends")
    return known


class PromptTokensDetails(Struct, kw_only=True, omit_defaults=True):
    # Prompt tokens served from a cache of earlier requests, not evaluated again.
    cached_tokens: int | None = None
    audio_tokens: int | None = None
    text_tokens: int | None = None
    image_tokens: int | None = None
    cache_write_tokens: int | None = None


class CompletionTokensDetails(Struct, kw_only=True, omit_defaults=True):
    reasoning_tokens: int | None = None
    audio_tokens: int | None = None
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None
    text_tokens: int | None = None


class Usage(Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Objects or absent (upstreams may send null: left out).
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ResponseMessage(Struct, kw_only=True):
    role: Literal["assistant"]
    # Both always sent, null when empty.
    content: str | None = None
    refusal: str | None = None
    # A non-empty list or absent: null and [] (vLLM, Together) are left out.
    tool_calls: list[ToolCall] | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        if not self.tool_calls:
            self.tool_calls = UNSET


class ChatChoice(Struct, kw_only=True):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        self.finish_reason = _finish_reason(self.finish_reason)


class ChatCompletion(Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    # A string or absent, never null.
    system_fingerprint: str | None = None


class FunctionCallDelta(Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


def whole_call_delta(index: int, call: ToolCall) -> ToolCallDelta:
    """A whole tool call as the one delta that carries it."""
    function = FunctionCallDelta(name=call.function.name, arguments=call.function.arguments)
    return ToolCallDelta(index=index, id=call.id, type="function", function=function)


class ChunkDelta(Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | UnsetType | None = UNSET
    refusal: str | UnsetType | None = UNSET
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(Struct, kw_only=True):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        if self.finish_reason is not None:
            self.finish_reason = _finish_reason(self.finish_reason)


class ChatCompletionChunk(Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    # UNSET: left out (no include_usage); None: "usage": null on every chunk but
    # the last, as OpenAI sends it when include_usage is on (the pipeline sets
    # it; an upstream's null is read as UNSET).
    usage: Usage | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        if self.usage is None:
            self.usage = UNSET


class CompletionLogprobs(Struct, kw_only=True, omit_defaults=True):
    tokens: list[str] | None = None
    # null for the first token of an echoed prompt (it has no predecessor).
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] | None = None


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    # null in every chunk of a stream but the last, as OpenAI sends it.
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        if self.finish_reason is not None:
            self.finish_reason = _finish_reason(self.finish_reason)


class Completion(Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        if self.usage is None:
            self.usage = UNSET
