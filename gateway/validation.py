"""Request validation: a body's bytes become a typed request, or a 400.

Decoding is strict (unknown fields, wrong types: OpenAI's own wording, with
``param`` pointing at the field), then the operator's limits apply. Nothing
here does I/O or looks at routing.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from gateway import wire
from gateway.contract import AnyRequest, ModelCapabilities
from gateway.errors import InvalidRequestError, UnsupportedFeatureError
from gateway.media import check_media
from gateway.settings import LimitSettings

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_FIELD = re.compile(r"field `(?P<field>[^`]+)`")

RequestT = TypeVar("RequestT", wire.ChatCompletionRequest, wire.CompletionRequest)


def _param_of(message: str) -> tuple[str, str | None]:
    """msgspec's "Expected `int`, got `str` - at `$.n`" -> (text, "n")."""
    match = _PATH.search(message)
    path = match.group("path").lstrip(".") if match else ""
    text = message[: match.start()] if match else message
    field = _FIELD.search(text)
    if field is not None:
        path = f"{path}.{field.group('field')}" if path else field.group("field")
    return text, path or None


def decode(body: bytes, decoder: msgspec.json.Decoder[RequestT]) -> RequestT:
    if not body:
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as error:
        text, param = _param_of(str(error))
        if text.startswith("Object contains unknown field"):
            text = f"Unrecognized request argument supplied: {param}"
        raise InvalidRequestError(f"{text} (at {param or 'the body'})", param=param) from None
    except msgspec.DecodeError as error:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {error}"
        ) from None


def _at_most(value: int, limit: int, param: str, what: str) -> None:
    if value > limit:
        raise InvalidRequestError(
            f"{param}: at most {limit} {what} allowed, got {value}", param=param
        )


def decode_chat(body: bytes, limits: LimitSettings) -> wire.ChatCompletionRequest:
    request = decode(body, wire.chat_request_decoder)
    if not request.messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    _at_most(len(request.messages), limits.max_messages, "messages", "messages")
    _at_most(len(request.tools or ()), limits.max_tools, "tools", "tools")
    check_media(request, limits.media_urls)
    _check_common(request, limits)
    return request


def decode_completion(body: bytes, limits: LimitSettings) -> wire.CompletionRequest:
    request = decode(body, wire.completion_request_decoder)
    _check_common(request, limits)
    return request


def _check_common(request: AnyRequest, limits: LimitSettings) -> None:
    _at_most(request.n or 1, limits.max_n, "n", "choices")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    _at_most(len(stops), limits.max_stop_sequences, "stop", "stop sequences")
    _at_most(len(request.logit_bias or {}), limits.max_logit_bias, "logit_bias", "entries")
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


# ------------------------------------------------------------- capabilities

# An engine that can do none of the optional features.
_NOTHING = ModelCapabilities(context_length=0)


def needs_capabilities(request: AnyRequest) -> bool:
    """Whether the request uses a feature some engines lack (most do not:
    then no deployment's capabilities need to be asked)."""
    return missing_feature(request, _NOTHING) is not None


def _wants_json(request: wire.ChatCompletionRequest) -> bool:
    return request.response_format is not None and not isinstance(
        request.response_format, wire.ResponseFormatText
    )


def missing_feature(request: AnyRequest, capabilities: ModelCapabilities) -> str | None:
    """The request parameter whose feature these capabilities lack, or None."""
    if (request.n or 1) > capabilities.max_n:
        return "n"
    if isinstance(request, wire.ChatCompletionRequest):
        if request.tools and not capabilities.tools:
            return "tools"
        if _wants_json(request) and not capabilities.json_schema:
            return "response_format"
        wants_logprobs = bool(request.logprobs) or request.top_logprobs is not None
    else:
        wants_logprobs = request.logprobs is not None
    return "logprobs" if wants_logprobs and not capabilities.logprobs else None


def unsupported(model: str, feature: str, backends: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(
        f"model `{model}`: no deployment supports `{feature}` (its backends: {backends})",
        param=feature,
    )
