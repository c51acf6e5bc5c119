"""Builds OpenAI responses and chunks from llama.cpp generation results."""

from __future__ import annotations

import json
import uuid

import msgspec

from gateway import wire
from gateway.contract import RequestContext, Target
from gateway.engine.generation import GenerationResult, TokenInfo

FINISH_REASONS: dict[str, wire.FinishReason] = {"stop": "stop", "length": "length"}


def finish_reason(result: GenerationResult) -> wire.FinishReason:
    return FINISH_REASONS.get(result.finish_reason, "stop")


def chat_logprobs(tokens: list[TokenInfo] | tuple[TokenInfo, ...]) -> wire.ChoiceLogprobs:
    return wire.ChoiceLogprobs(
        content=[
            wire.TokenLogprob(
                token=info.token,
                logprob=info.logprob,
                bytes=list(info.token_bytes),
                top_logprobs=[
                    wire.TopLogprob(
                        token=alt.token, logprob=alt.logprob, bytes=list(alt.token_bytes)
                    )
                    for alt in info.top
                ],
            )
            for info in tokens
        ]
    )


def tool_calls_from(text: str) -> list[wire.ToolCall] | None:
    """The call the grammar made the model write, or None if it was cut short."""
    try:
        call = json.loads(text)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, KeyError, TypeError):
        return None
    function = wire.FunctionCall(name=str(name), arguments=json.dumps(arguments))
    return [wire.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=function)]


def chat_choice(
    index: int, result: GenerationResult, *, logprobs: bool, tools: bool
) -> wire.ChatChoice:
    calls = tool_calls_from(result.text) if tools else None
    message = wire.ResponseMessage(
        role="assistant",
        content=None if calls else result.text,
        refusal=None,
        tool_calls=calls if calls else msgspec.UNSET,
    )
    return wire.ChatChoice(
        index=index,
        message=message,
        logprobs=chat_logprobs(result.tokens) if logprobs else None,
        finish_reason="tool_calls" if calls else finish_reason(result),
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> wire.Usage:
    return wire.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=cached_tokens),
    )


def chat_completion(
    ctx: RequestContext, target: Target, choices: list[wire.ChatChoice], totals: wire.Usage
) -> wire.ChatCompletion:
    return wire.ChatCompletion(
        id=ctx.request_id,
        object="chat.completion",
        created=ctx.created,
        model=target.model,
        choices=choices,
        usage=totals,
    )


def chat_chunk(
    ctx: RequestContext,
    target: Target,
    choices: list[wire.ChunkChoice],
    totals: wire.Usage | None = None,
) -> wire.ChatCompletionChunk:
    chunk = wire.ChatCompletionChunk(
        id=ctx.request_id,
        object="chat.completion.chunk",
        created=ctx.created,
        model=target.model,
        choices=choices,
    )
    if totals is not None:
        chunk.usage = totals
    return chunk


def completion_logprobs(
    tokens: tuple[TokenInfo, ...] | list[TokenInfo], start_offset: int
) -> wire.CompletionLogprobs:
    offsets = []
    position = start_offset
    for info in tokens:
        offsets.append(position)
        position += len(info.token)
    return wire.CompletionLogprobs(
        tokens=[info.token for info in tokens],
        token_logprobs=[info.logprob for info in tokens],
        top_logprobs=[{alt.token: alt.logprob for alt in info.top} for info in tokens],
        text_offset=offsets,
    )


def completion(
    ctx: RequestContext,
    target: Target,
    choices: list[wire.CompletionChoice],
    totals: wire.Usage | None,
) -> wire.Completion:
    response = wire.Completion(
        id=ctx.request_id,
        object="text_completion",
        created=ctx.created,
        model=target.model,
        choices=choices,
    )
    if totals is not None:
        response.usage = totals
    return response
