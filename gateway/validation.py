"""Request validation: a body's bytes become a typed request, or a 400.

Decoding is strict (unknown fields, wrong types: OpenAI's own wording, with
``param`` pointing at the field), then the operator's limits apply. Nothing
here does I/O or looks at routing.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
import numpy as np

from gateway import schema_guard, wire
from gateway.contract import AnyRequest, ModelCapabilities
from gateway.errors import InvalidRequestError, UnsupportedFeatureError
from gateway.media import check_media
from gateway.settings import LimitSettings

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_FIELD = re.compile(r"field `(?P<field>[^`]+)`")
# Every byte but those that delimit strings, arrays and objects.
_NOT_STRUCTURE = bytes(byte for byte in range(256) if byte not in b'"[]{}')
# OpenAI's token ids: ASCII decimal digits only (str.isdigit() also takes "²"
# and "١٢"), and few enough of them for any vocabulary.
_TOKEN_ID = re.compile(r"[0-9]{1,9}")
# What an error message quotes of a client's value at most.
_QUOTED_CHARS = 40
# What a decoding error repeats of the decoder's message, and of a path, at most.
_ECHOED_CHARS = 300

RequestT = TypeVar(
    "RequestT", wire.ChatCompletionRequest, wire.CompletionRequest, wire.EmbeddingRequest
)
# Any request body decode() reads (the Responses API's too).
BodyT = TypeVar("BodyT", bound=msgspec.Struct)


def _param_of(message: str) -> tuple[str, str | None]:
    """msgspec's "Expected `int`, got `str` - at `$.n`" -> (text, "n")."""
    match = _PATH.search(message)
    path = match.group("path").lstrip(".") if match else ""
    text = message[: match.start()] if match else message
    field = _FIELD.search(text)
    if field is not None:
        path = f"{path}.{field.group('field')}" if path else field.group("field")
    return text, path or None


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in this JSON text, brackets inside
    strings aside. Whole-buffer passes in C and numpy, no Python loop over
    bytes: 4 MB of adversarial JSON takes tens of milliseconds."""
    # Escaped backslashes, then escaped quotes, go first (left to right, as a
    # JSON parser reads escapes): every quote left opens or closes a string.
    structure = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    data = np.frombuffer(structure, dtype=np.uint8)
    outside_strings = (np.cumsum(data == ord('"'), dtype=np.int32) & 1) == 0
    steps = (data == ord("[")).astype(np.int8) + (data == ord("{"))
    steps -= (data == ord("]")).astype(np.int8) + (data == ord("}"))
    steps *= outside_strings
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def _too_deep(limit: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"The request's JSON nests arrays and objects more than {limit} levels deep; "
        f"at most {limit} are allowed."
    )


def check_depth(body: bytes, limit: int) -> None:
    """Refuse JSON nested deeper than ``limit`` before any decoder recurses
    into it (msgspec keeps schemas as raw bytes, but whatever reads them
    next, a grammar converter or an upstream engine, recurses)."""
    # Nesting needs an opening bracket per level: most bodies skip the scan.
    if body.count(b"[") + body.count(b"{") > limit and json_depth(body) > limit:
        raise _too_deep(limit)


def decode(body: bytes, decoder: msgspec.json.Decoder[BodyT], *, max_depth: int = 64) -> BodyT:
    if not body:
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    check_depth(body, max_depth)
    try:
        return decoder.decode(body)
    except RecursionError:
        # Only reachable past the limit's ceiling; the check above says it first.
        raise _too_deep(max_depth) from None
    except msgspec.ValidationError as error:
        text, param = _param_of(str(error))
        # msgspec quotes what it refused (an enum value, a field's name):
        # a client's megabytes are not echoed back.
        text, param = _clipped(text), None if param is None else _clipped(param)
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
    request = decode(body, wire.chat_request_decoder, max_depth=limits.max_json_depth)
    if not request.messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    _at_most(len(request.messages), limits.max_messages, "messages", "messages")
    _at_most(len(request.tools or ()), limits.max_tools, "tools", "tools")
    check_media(request, limits.media_urls)
    _check_common(request, limits)
    _check_tool_choice(request)
    if request.tools or isinstance(request.response_format, wire.ResponseFormatJsonSchema):
        schema_guard.check_request(request, limits.schema_limits())
    return request


def _check_tool_choice(request: wire.ChatCompletionRequest) -> None:
    """A call the model is made to make needs that tool among ``tools``
    (OpenAI answers 400 too; without the check each engine did something
    else: llama.cpp ignored the choice, vLLM refused with its own error)."""
    choice = request.tool_choice
    if choice is None or choice in ("none", "auto"):
        return
    names = {tool.function.name for tool in request.tools or ()}
    if not names:
        raise InvalidRequestError(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified.",
            param="tool_choice",
        )
    if isinstance(choice, wire.NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequestError(
            f'tool_choice names "{choice.function.name[:_QUOTED_CHARS]}", which is not in tools',
            param="tool_choice",
        )


def decode_completion(body: bytes, limits: LimitSettings) -> wire.CompletionRequest:
    request = decode(body, wire.completion_request_decoder, max_depth=limits.max_json_depth)
    _check_common(request, limits)
    return request


def _check_common(request: AnyRequest, limits: LimitSettings) -> None:
    _at_most(request.n or 1, limits.max_n, "n", "choices")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    _at_most(len(stops), limits.max_stop_sequences, "stop", "stop sequences")
    _at_most(len(request.logit_bias or {}), limits.max_logit_bias, "logit_bias", "entries")
    _check_volume(request, stops, limits)
    _check_token_ids(request.logit_bias)
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


def _prompt_count(request: AnyRequest) -> int:
    if isinstance(request, wire.ChatCompletionRequest) or isinstance(request.prompt, str):
        return 1
    if request.prompt and all(isinstance(item, int) for item in request.prompt):
        return 1  # one prompt, as token ids
    return len(request.prompt)


def _check_volume(request: AnyRequest, stops: list[str], limits: LimitSettings) -> None:
    """What one request may make an engine do: generations (prompts times
    n), stop sequences' length, the completion budget it asks for."""
    n = request.n or 1
    choices = _prompt_count(request) * n
    param = "n" if choices == n else "prompt"
    _at_most(choices, limits.max_choices, param, "choices (prompts times n)")
    for stop in stops:
        _at_most(len(stop), limits.max_stop_length, "stop", "characters in a stop sequence")
    budgets = [("max_tokens", request.max_tokens)]
    if isinstance(request, wire.ChatCompletionRequest):
        budgets.append(("max_completion_tokens", request.max_completion_tokens))
    for name, budget in budgets:
        if budget is not None:
            _at_most(budget, limits.max_tokens_ceiling, name, "tokens")


def _clipped(text: str) -> str:
    return text if len(text) <= _ECHOED_CHARS else f"{text[:_ECHOED_CHARS]}..."


def _quoted(value: str) -> str:
    """A client's value for an error message, cut short: a 4 MB key is not echoed."""
    if len(value) <= _QUOTED_CHARS:
        return repr(value)
    return f"{value[:_QUOTED_CHARS]!r}... ({len(value)} characters)"


def _check_token_ids(bias: dict[str, float] | None) -> None:
    """Whether each key is a token id is the engine's to say (it knows its
    vocabulary); that it is written as one is checked here, for every engine."""
    for key in bias or ():
        if _TOKEN_ID.fullmatch(key) is None:
            raise InvalidRequestError(
                f"logit_bias: keys must be token ids in decimal digits, got {_quoted(key)}",
                param="logit_bias",
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
