"""What the spans say: the conventions' attributes of a request, its
usage and error, and (opt-in) its content in the conventions' message
shape. Pure functions of the wire types; names from
:mod:`gateway.telemetry.semconv`."""

from __future__ import annotations

import msgspec

from gateway import wire
from gateway.contract import AnyRequest, AttributeValue, Target, message_role
from gateway.errors import GatewayError
from gateway.telemetry import semconv as names

AnyAnswer = wire.ChatCompletion | wire.Completion
_content_encoder = msgspec.json.Encoder()


def error_type(error: BaseException) -> str:
    """``error.type``: the gateway's error code (``timeout``,
    ``engine_overloaded``...), else its type, else the exception's class."""
    if isinstance(error, GatewayError):
        return error.code or error.error_type
    return type(error).__qualname__


def operation_name(request: AnyRequest) -> str:
    if isinstance(request, wire.ChatCompletionRequest):
        return names.OPERATION_CHAT
    return names.OPERATION_TEXT_COMPLETION


def request_attributes(
    operation: str, request: AnyRequest, target: Target
) -> dict[str, AttributeValue]:
    """The conventions' request attributes: the operation, the model, the
    sampling parameters the client set, the adapters."""
    attributes: dict[str, AttributeValue] = {
        names.OPERATION_NAME: operation,
        names.REQUEST_MODEL: target.engine_model,
        names.REQUEST_STREAM: bool(request.stream),
    }
    max_tokens = request.max_tokens
    if isinstance(request, wire.ChatCompletionRequest):
        max_tokens = request.max_completion_tokens or max_tokens
        output = request.response_format
        if output is not None:
            text = isinstance(output, wire.ResponseFormatText)
            attributes[names.OUTPUT_TYPE] = "text" if text else "json"
    optional: dict[str, float | int | None] = {
        names.REQUEST_MAX_TOKENS: max_tokens,
        names.REQUEST_TEMPERATURE: request.temperature,
        names.REQUEST_TOP_P: request.top_p,
        names.REQUEST_FREQUENCY_PENALTY: request.frequency_penalty,
        names.REQUEST_PRESENCE_PENALTY: request.presence_penalty,
        names.REQUEST_SEED: request.seed,
    }
    attributes.update({key: value for key, value in optional.items() if value is not None})
    if request.n is not None and request.n != 1:
        attributes[names.REQUEST_CHOICE_COUNT] = request.n
    if request.stop:
        stop = request.stop
        attributes[names.REQUEST_STOP_SEQUENCES] = [stop] if isinstance(stop, str) else stop
    if target.adapters:
        attributes[names.ADAPTERS] = [use.adapter.name for use in target.adapters]
        attributes[names.ADAPTER_SCALES] = [use.scale for use in target.adapters]
    return attributes


def usage_attributes(usage: wire.Usage) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        names.USAGE_INPUT_TOKENS: usage.prompt_tokens,
        names.USAGE_OUTPUT_TOKENS: usage.completion_tokens,
    }
    details = usage.prompt_tokens_details
    if isinstance(details, wire.PromptTokensDetails) and isinstance(details.cached_tokens, int):
        attributes[names.USAGE_CACHE_READ_INPUT_TOKENS] = details.cached_tokens
    return attributes


def input_messages(request: AnyRequest) -> str:
    """``gen_ai.input.messages`` (opt-in), in the conventions' shape (role and
    text parts), after the request hooks ran: a chat's messages, or a text
    completion's prompt as one user message."""
    if isinstance(request, wire.ChatCompletionRequest):
        messages = [_message(message_role(m), m.content) for m in request.messages]
    else:
        prompt = request.prompt
        texts = [prompt] if isinstance(prompt, str) else [str(item) for item in prompt]
        messages = [_message("user", text) for text in texts]
    return _content_encoder.encode(messages).decode()


def output_messages(answer: AnyAnswer) -> str:
    """``gen_ai.output.messages`` (opt-in), in the conventions' shape."""
    messages = []
    for choice in answer.choices:
        text = choice.message.content if isinstance(choice, wire.ChatChoice) else choice.text
        message = _message("assistant", text)
        message["finish_reason"] = choice.finish_reason or ""
        messages.append(message)
    return _content_encoder.encode(messages).decode()


class StreamText:
    """A stream's text per choice, as the client got it, for
    ``gen_ai.output.messages``."""

    def __init__(self) -> None:
        self.parts: dict[int, list[str]] = {}
        self.reasons: dict[int, str] = {}

    def add(self, chunk: object) -> None:
        if isinstance(chunk, wire.ChatCompletionChunk):
            for choice in chunk.choices:
                if isinstance(choice.delta.content, str):
                    self.parts.setdefault(choice.index, []).append(choice.delta.content)
                if choice.finish_reason:
                    self.reasons[choice.index] = choice.finish_reason
        elif isinstance(chunk, wire.Completion):
            for text_choice in chunk.choices:
                self.parts.setdefault(text_choice.index, []).append(text_choice.text)
                if text_choice.finish_reason:
                    self.reasons[text_choice.index] = text_choice.finish_reason

    def messages(self) -> str:
        messages = []
        for index in sorted(self.parts.keys() | self.reasons.keys()):
            message = _message("assistant", "".join(self.parts.get(index, [])))
            message["finish_reason"] = self.reasons.get(index, "")
            messages.append(message)
        return _content_encoder.encode(messages).decode()


def _message(role: str, content: object) -> dict[str, object]:
    if content is None:
        texts: list[str] = []
    elif isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = [part.text for part in content if isinstance(part, wire.TextPart)]
    else:
        texts = [str(content)]
    return {"role": role, "parts": [{"type": "text", "content": text} for text in texts]}
