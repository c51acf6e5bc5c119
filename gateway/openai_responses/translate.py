"""A Responses request as a chat request, and a chat answer as a Response.

The gateway serves ``POST /v1/responses`` through its chat pipeline
(docs/responses.md says why): :func:`decode_responses` reads the body and
refuses what nomoat does not serve, :func:`chat_request` turns the resolved
conversation into a :class:`~gateway.wire.ChatCompletionRequest` checked by
the very validation chat requests get, and :func:`response_of` turns the
:class:`~gateway.wire.ChatCompletion` back into a Response.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import msgspec

from gateway import wire
from gateway.errors import InvalidRequestError, UnsupportedFeatureError
from gateway.openai_responses import types as rt
from gateway.settings import LimitSettings
from gateway.validation import decode, decode_chat

# What chat's validation names, as the Responses request names it.
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}
_NULL = b"null"
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
# OpenAI's metadata limits: keys up to 64 characters, values up to 512.
_METADATA_KEY = 64
_METADATA_VALUE = 512
# What of a client's value an error message repeats: an item type or a
# Response id of a megabyte is not echoed back.
_SHOWN_CHARS = 40


def shown(value: str) -> str:
    """A client's value for an error message, cut short."""
    if len(value) <= _SHOWN_CHARS:
        return value
    return f"{value[:_SHOWN_CHARS]}... ({len(value)} characters)"


def new_id(prefix: str) -> str:
    """An item's id as OpenAI spells them (``msg_...``, ``fc_...``)."""
    return f"{prefix}_{os.urandom(16).hex()}"


# ---------------------------------------------------------------- decoding


def decode_responses(body: bytes, limits: LimitSettings) -> rt.ResponsesRequest:
    """The request, or a 400 naming what is malformed or not served."""
    request = decode(body, rt.request_decoder, max_depth=limits.max_json_depth)
    _refuse_unserved(request)
    _check_metadata(request.metadata)
    if isinstance(request.input, list) and not request.input:
        raise InvalidRequestError("input must contain at least one item", param="input")
    return request


def _unsupported(feature: str, param: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(
        f"{feature} is not supported by this gateway's Responses API "
        "(see docs/responses.md for what is).",
        param=param,
    )


def _refuse_unserved(request: rt.ResponsesRequest) -> None:
    if request.background:
        raise _unsupported("Background mode (`background: true`)", "background")
    raw_fields = {
        "conversation": request.conversation,
        "prompt": request.prompt,
        "reasoning": request.reasoning,
        "context_management": request.context_management,
        "moderation": request.moderation,
    }
    for name, value in raw_fields.items():
        if bytes(value) != _NULL:
            raise _unsupported(f"`{name}`", name)
    if request.include:
        raise _unsupported(f"`include` ({shown(', '.join(request.include))})", "include")
    if request.max_tool_calls is not None:
        raise _unsupported("`max_tool_calls`", "max_tool_calls")
    if request.top_logprobs:
        raise _unsupported("`top_logprobs`", "top_logprobs")
    for index, tool in enumerate(request.tools or ()):
        if tool.type != "function":
            raise _unsupported(
                f"The built-in tool `{shown(tool.type)}` (only function tools are)",
                f"tools[{index}].type",
            )
        if not tool.name:
            raise InvalidRequestError("A function tool needs a name.", param=f"tools[{index}].name")
    choice = request.tool_choice
    if isinstance(choice, rt.ToolChoiceSpec) and (choice.type != "function" or not choice.name):
        raise _unsupported(f"tool_choice of type `{shown(choice.type)}`", "tool_choice")
    text_format = request.text.format if request.text is not None else None
    if text_format is not None:
        _check_format(text_format)


def _check_format(text_format: rt.TextFormat) -> None:
    if text_format.type not in ("text", "json_object", "json_schema"):
        kind = shown(text_format.type)
        raise _unsupported(f"text.format of type `{kind}`", "text.format.type")
    if text_format.type == "json_schema":
        if not text_format.name:
            raise InvalidRequestError(
                "text.format.name is required for json_schema.", param="text.format.name"
            )
        if bytes(text_format.schema) == _NULL:
            raise InvalidRequestError(
                "text.format.schema is required for json_schema.", param="text.format.schema"
            )


def _check_metadata(metadata: dict[str, str] | None) -> None:
    for key, value in (metadata or {}).items():
        if len(key) > _METADATA_KEY or len(value) > _METADATA_VALUE:
            raise InvalidRequestError(
                f"metadata: keys may have at most {_METADATA_KEY} characters and values "
                f"at most {_METADATA_VALUE}.",
                param="metadata",
            )


# ------------------------------------------------------------ conversation


def input_items(request: rt.ResponsesRequest) -> list[rt.InputItem]:
    """This turn's input as items (a string is one user message)."""
    if isinstance(request.input, str):
        return [rt.InputItem(type="message", role="user", content=request.input)]
    return request.input


def output_as_input(output: list[rt.OutputItem]) -> list[rt.InputItem]:
    """A Response's output as the items a later turn's input carries."""
    items: list[rt.InputItem] = []
    for item in output:
        if isinstance(item, rt.OutputMessage):
            parts = [rt.ContentPart(type="output_text", text=part.text) for part in item.content]
            items.append(rt.InputItem(type="message", role="assistant", content=parts))
        else:
            items.append(
                rt.InputItem(
                    type="function_call",
                    call_id=item.call_id,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
    return items


def _text_of(parts: list[rt.ContentPart], where: str, allowed: tuple[str, ...]) -> str:
    texts: list[str] = []
    for index, part in enumerate(parts):
        if part.type not in allowed:
            kind = shown(part.type)
            raise _unsupported(f"Content of type `{kind}` here", f"{where}[{index}].type")
        text = part.refusal if part.type == "refusal" else part.text
        if text is None:
            raise InvalidRequestError(
                f"A `{part.type}` part needs its text.", param=f"{where}[{index}].text"
            )
        texts.append(text)
    return "".join(texts)


def _user_content(
    content: str | list[rt.ContentPart], where: str
) -> str | list[wire.UserContentPart]:
    if isinstance(content, str):
        return content
    parts: list[wire.UserContentPart] = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        if part.type == "input_text" and part.text is not None:
            parts.append(wire.TextPart(text=part.text))
        elif part.type == "input_image" and part.image_url:
            parts.append(
                wire.ImagePart(image_url=wire.ImageUrl(url=part.image_url, detail=part.detail))
            )
        elif part.type in ("input_text", "input_image"):
            missing = "text" if part.type == "input_text" else "image_url (file_id is not served)"
            raise InvalidRequestError(f"A `{part.type}` part needs its {missing}.", param=at)
        else:
            raise _unsupported(f"Input content of type `{shown(part.type)}`", f"{at}.type")
    return parts


def _message(item: rt.InputItem, where: str) -> wire.Message:
    if item.role not in _MESSAGE_ROLES:
        got = "none" if item.role is None else repr(shown(item.role))
        raise InvalidRequestError(
            f"A message's role must be one of {', '.join(_MESSAGE_ROLES)}; got {got}.",
            param=f"{where}.role",
        )
    if item.content is None:
        raise InvalidRequestError("A message needs its content.", param=f"{where}.content")
    content = item.content
    at = f"{where}.content"
    if item.role == "user":
        return wire.UserMessage(content=_user_content(content, at))
    if item.role == "assistant":
        text = (
            content
            if isinstance(content, str)
            else _text_of(content, at, ("output_text", "input_text", "refusal"))
        )
        return wire.AssistantMessage(content=text)
    text = content if isinstance(content, str) else _text_of(content, at, ("input_text",))
    if item.role == "system":
        return wire.SystemMessage(content=text)
    return wire.DeveloperMessage(content=text)


def _tool_call(item: rt.InputItem, where: str) -> wire.ToolCall:
    if not item.call_id or not item.name or item.arguments is None:
        raise InvalidRequestError(
            "A function_call item needs call_id, name and arguments.", param=where
        )
    function = wire.FunctionCall(name=item.name, arguments=item.arguments)
    return wire.ToolCall(id=item.call_id, function=function)


def _tool_output(item: rt.InputItem, where: str) -> wire.ToolMessage:
    if not item.call_id or item.output is None:
        raise InvalidRequestError(
            "A function_call_output item needs call_id and output.", param=where
        )
    output = item.output
    text = (
        output
        if isinstance(output, str)
        else _text_of(output, f"{where}.output", ("input_text", "output_text"))
    )
    return wire.ToolMessage(content=text, tool_call_id=item.call_id)


def chat_messages(instructions: str | None, items: list[rt.InputItem]) -> list[wire.Message]:
    """The conversation as chat messages: instructions first (a system
    message), consecutive function calls folded into one assistant message
    with ``tool_calls`` (as chat writes parallel calls)."""
    messages: list[wire.Message] = []
    if instructions:
        messages.append(wire.SystemMessage(content=instructions))
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if item.type == "message":
            messages.append(_message(item, where))
        elif item.type == "function_call":
            call = _tool_call(item, where)
            last = messages[-1] if messages else None
            if isinstance(last, wire.AssistantMessage):
                last.tool_calls = [*(last.tool_calls or ()), call]
            else:
                messages.append(wire.AssistantMessage(tool_calls=[call]))
        elif item.type == "function_call_output":
            messages.append(_tool_output(item, where))
        else:
            raise _unsupported(f"Input items of type `{shown(item.type)}`", f"{where}.type")
    return messages


# ----------------------------------------------------------- the chat request


def _tools(request: rt.ResponsesRequest) -> list[wire.Tool] | None:
    if not request.tools:
        return None
    return [
        wire.Tool(
            type="function",
            function=wire.FunctionDefinition(
                name=tool.name or "",
                description=tool.description,
                parameters=tool.parameters,
                strict=tool.strict,
            ),
        )
        for tool in request.tools
    ]


def _tool_choice(choice: rt.ToolChoiceValue | None) -> wire.ToolChoice | None:
    if choice is None or isinstance(choice, str):
        return choice
    return wire.NamedToolChoice(
        type="function", function=wire.NamedFunction(name=choice.name or "")
    )


def _response_format(request: rt.ResponsesRequest) -> wire.ResponseFormat | None:
    text_format = request.text.format if request.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return wire.ResponseFormatJsonObject()
    spec = wire.JsonSchemaSpec(
        name=text_format.name or "",
        description=text_format.description,
        schema=text_format.schema,
        strict=text_format.strict,
    )
    return wire.ResponseFormatJsonSchema(json_schema=spec)


def chat_request(
    request: rt.ResponsesRequest, conversation: list[rt.InputItem], limits: LimitSettings
) -> wire.ChatCompletionRequest:
    """The chat request that serves ``request`` over ``conversation`` (the
    earlier turns and this one's input), checked as a chat request is:
    the same limits, schema checks and media rules, its errors naming the
    Responses request's parameters."""
    chat = wire.ChatCompletionRequest(
        model=request.model,
        messages=chat_messages(request.instructions, conversation),
        max_tokens=request.max_output_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        tools=_tools(request),
        tool_choice=_tool_choice(request.tool_choice),
        parallel_tool_calls=request.parallel_tool_calls,
        response_format=_response_format(request),
        user=request.user,
        stream=True if request.stream else None,
        stream_options=wire.StreamOptions(include_usage=True) if request.stream else None,
    )
    try:
        # Encoded and decoded once more: exactly chat's validation, no twin of it.
        return decode_chat(wire.encoder.encode(chat), limits)
    except InvalidRequestError as error:
        error.param = renamed(error.param)
        raise


def renamed(param: str | None) -> str | None:
    """A chat request's parameter as the Responses request names it."""
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    if head.startswith("messages["):
        # A chat message's index is not its input item's (the instructions
        # and earlier turns come first): the input, as a whole.
        return "input"
    return _PARAMS.get(head, head) + dot + rest


# --------------------------------------------------------------- the Response


@dataclass(frozen=True, slots=True)
class Echo:
    """What a Response repeats of its request (and the turn it continues)."""

    instructions: str | None
    max_output_tokens: int | None
    model: str
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float
    text: rt.TextOut
    tool_choice: rt.ToolChoiceValue
    tools: list[rt.FunctionTool]
    top_p: float
    truncation: str
    user: str | None
    metadata: dict[str, str]
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


def echo_of(request: rt.ResponsesRequest, model: str) -> Echo:
    return Echo(
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        model=model,
        parallel_tool_calls=True
        if request.parallel_tool_calls is None
        else request.parallel_tool_calls,
        previous_response_id=request.previous_response_id,
        store=True if request.store is None else request.store,
        temperature=1.0 if request.temperature is None else request.temperature,
        text=rt.TextOut(format=_format_out(request)),
        tool_choice=request.tool_choice or "auto",
        tools=[
            rt.FunctionTool(
                name=tool.name or "",
                description=tool.description,
                parameters=tool.parameters,
                strict=tool.strict,
            )
            for tool in request.tools or ()
        ],
        top_p=1.0 if request.top_p is None else request.top_p,
        truncation=request.truncation or "disabled",
        user=request.user,
        metadata=request.metadata or {},
        prompt_cache_key=request.prompt_cache_key,
        safety_identifier=request.safety_identifier,
    )


def _format_out(request: rt.ResponsesRequest) -> rt.Format:
    text_format = request.text.format if request.text is not None else None
    if text_format is None or text_format.type == "text":
        return rt.FormatText()
    if text_format.type == "json_object":
        return rt.FormatJsonObject()
    return rt.FormatJsonSchema(
        name=text_format.name or "",
        schema=text_format.schema,
        description=text_format.description,
        strict=text_format.strict,
    )


def usage_of(usage: wire.Usage | None) -> rt.ResponseUsage | None:
    if usage is None:
        return None
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else None
    return rt.ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=rt.InputTokensDetails(cached_tokens=cached or 0),
        output_tokens=usage.completion_tokens,
        output_tokens_details=rt.OutputTokensDetails(),
        total_tokens=usage.total_tokens,
    )


def ended_status(
    finish_reason: str | None,
) -> tuple[rt.ResponseStatus, rt.IncompleteDetails | None]:
    """A chat finish reason as the Response's status (cut at the token
    budget or by a filter: ``incomplete``, and why)."""
    if finish_reason == "length":
        return "incomplete", rt.IncompleteDetails(reason="max_output_tokens")
    if finish_reason == "content_filter":
        return "incomplete", rt.IncompleteDetails(reason="content_filter")
    return "completed", None


def built_response(
    response_id: str,
    created_at: int,
    echo: Echo,
    output: list[rt.OutputItem],
    status: rt.ResponseStatus,
    incomplete: rt.IncompleteDetails | None = None,
    usage: rt.ResponseUsage | None = None,
    completed_at: int | None = None,
) -> rt.Response:
    choice = echo.tool_choice
    return rt.Response(
        id=response_id,
        created_at=created_at,
        status=status,
        incomplete_details=incomplete,
        instructions=echo.instructions,
        max_output_tokens=echo.max_output_tokens,
        model=echo.model,
        output=output,
        parallel_tool_calls=echo.parallel_tool_calls,
        previous_response_id=echo.previous_response_id,
        store=echo.store,
        temperature=echo.temperature,
        text=echo.text,
        tool_choice=choice if isinstance(choice, str) else rt.NamedFunction(name=choice.name or ""),
        tools=echo.tools,
        top_p=echo.top_p,
        truncation="auto" if echo.truncation == "auto" else "disabled",
        usage=usage,
        user=echo.user,
        prompt_cache_key=echo.prompt_cache_key,
        safety_identifier=echo.safety_identifier,
        metadata=echo.metadata,
        completed_at=completed_at,
    )


def response_of(
    answer: wire.ChatCompletion, response_id: str, created_at: int, echo: Echo, now: int
) -> rt.Response:
    """A whole chat answer as a Response: its text as one message item, its
    tool calls as function_call items (after the text, as OpenAI orders them)."""
    choice = answer.choices[0] if answer.choices else None
    status, incomplete = ended_status(choice.finish_reason if choice else None)
    output: list[rt.OutputItem] = []
    if choice is not None:
        message = choice.message
        text = message.content or message.refusal
        if text:
            output.append(
                rt.OutputMessage(
                    id=new_id("msg"),
                    status="incomplete" if status == "incomplete" else "completed",
                    content=[rt.OutputText(text=text)],
                )
            )
        for call in message.tool_calls or ():
            output.append(
                rt.FunctionCallItem(
                    id=new_id("fc"),
                    status="completed",
                    call_id=call.id,
                    name=call.function.name,
                    arguments=call.function.arguments,
                )
            )
    return built_response(
        response_id,
        created_at,
        echo,
        output,
        status,
        incomplete,
        usage_of(answer.usage),
        now if status == "completed" else None,
    )


def stored_conversation(conversation: list[rt.InputItem], output: list[rt.OutputItem]) -> bytes:
    """What a later turn continues from: this turn's whole input and its output."""
    return rt.encoder.encode([*conversation, *output_as_input(output)])


def conversation_of(stored: bytes) -> list[rt.InputItem]:
    try:
        return rt.items_decoder.decode(stored)
    except msgspec.DecodeError as error:  # pragma: no cover - our own writing
        raise InvalidRequestError("The stored conversation cannot be read.") from error
