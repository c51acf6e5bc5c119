"""The Responses API on the wire (``POST /v1/responses``), as msgspec Structs.

The request's top level is strict (an unknown field is OpenAI's
"Unrecognized request argument"); the fields OpenAI has that nomoat does not
serve are declared, so a request that sets one gets a 400 naming it
(:mod:`gateway.openai_responses.translate`). Input items and their content
parts are read leniently: the SDK may send fields of later API versions on
them (``status``, ``annotations``, ``phase``), which change nothing here.

What nomoat answers (the Response object, its output items, the stream's
events) is written as OpenAI's API writes it: the fields its SDK's types
require are always there, ``null`` where OpenAI sends ``null``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Raw, Struct

from gateway.wire import NO_SCHEMA, PositiveInt, Temperature, TopP

# ----------------------------------------------------------------- the request


class _Lenient(Struct, kw_only=True, omit_defaults=True):
    """Read leniently: fields nomoat has no use for are dropped."""


class ContentPart(_Lenient):
    """One part of a message's content: ``input_text``, ``output_text``,
    ``refusal``, ``input_image`` (others are refused by name)."""

    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: str | None = None
    detail: str | None = None
    file_id: str | None = None


class InputItem(_Lenient):
    """One input item: a message (``type`` ``message`` or absent), a
    ``function_call`` the model made, or the ``function_call_output`` the
    client sends back. Stored conversations are lists of these too."""

    type: str = "message"
    role: str | None = None
    content: str | list[ContentPart] | None = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None


class ToolSpec(_Lenient):
    """A tool: only ``function`` ones are served (built-in tools are refused)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: Raw = NO_SCHEMA
    strict: bool | None = None


class ToolChoiceSpec(_Lenient):
    type: str
    name: str | None = None


ToolChoiceValue = Literal["none", "auto", "required"] | ToolChoiceSpec


class TextFormat(_Lenient):
    """``text.format``: ``text``, ``json_object`` or ``json_schema``."""

    type: str
    name: str | None = None
    description: str | None = None
    schema: Raw = NO_SCHEMA
    strict: bool | None = None


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: str | None = None


class StreamOptions(_Lenient):
    include_obfuscation: bool | None = None


Metadata = Annotated[dict[str, str], Meta(max_length=16)]


class ResponsesRequest(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoiceValue | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: Metadata | None = None
    user: str | None = None
    # Accepted, no effect here.
    stream_options: StreamOptions | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # OpenAI's, not served: a value other than null (or false, or empty) is a 400.
    background: bool | None = None
    conversation: Raw = NO_SCHEMA
    include: list[str] | None = None
    max_tool_calls: int | None = None
    prompt: Raw = NO_SCHEMA
    reasoning: Raw = NO_SCHEMA
    top_logprobs: int | None = None
    context_management: Raw = NO_SCHEMA
    moderation: Raw = NO_SCHEMA


# -------------------------------------------------------------- the Response


class OutputText(Struct, kw_only=True, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Raw] = []
    logprobs: list[Raw] = []


class OutputMessage(Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = []


class FunctionCallItem(Struct, kw_only=True, tag_field="type", tag="function_call"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(Struct, kw_only=True):
    cached_tokens: int = 0
    # Required by the SDK's type (OpenAI's prompt-cache writes); never any here.
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Struct, kw_only=True):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(Struct, kw_only=True):
    code: str
    message: str


class Reasoning(Struct, kw_only=True, frozen=True):
    effort: None = None
    summary: None = None


class FunctionTool(Struct, kw_only=True, tag_field="type", tag="function"):
    name: str
    description: str | None
    parameters: Raw
    strict: bool | None


class FormatText(Struct, tag_field="type", tag="text"):
    pass


class FormatJsonObject(Struct, tag_field="type", tag="json_object"):
    pass


class FormatJsonSchema(
    Struct, kw_only=True, omit_defaults=True, tag_field="type", tag="json_schema"
):
    """Written as OpenAI writes it: no `description` or `strict` when not given."""

    name: str
    schema: Raw
    description: str | None = None
    strict: bool | None = None


Format = FormatText | FormatJsonObject | FormatJsonSchema


class TextOut(Struct, kw_only=True):
    format: Format
    verbosity: str = "medium"


class NamedFunction(Struct, kw_only=True, tag_field="type", tag="function"):
    name: str


ResponseStatus = Literal["completed", "incomplete", "in_progress", "failed"]


class Response(Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    background: bool = False
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: Reasoning = Reasoning()
    service_tier: str = "default"
    store: bool
    temperature: float
    text: TextOut
    tool_choice: Literal["none", "auto", "required"] | NamedFunction
    tools: list[FunctionTool]
    top_logprobs: int = 0
    top_p: float
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    completed_at: int | None = None


class Deleted(Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# ------------------------------------------------------------ stream events
# Each has its ``type`` first and a ``sequence_number`` (set as it is sent).


class _Event(Struct, kw_only=True):
    sequence_number: int = 0


class ResponseCreated(_Event, tag_field="type", tag="response.created"):
    response: Response


class ResponseInProgress(_Event, tag_field="type", tag="response.in_progress"):
    response: Response


class ResponseCompleted(_Event, tag_field="type", tag="response.completed"):
    response: Response


class ResponseIncomplete(_Event, tag_field="type", tag="response.incomplete"):
    response: Response


class OutputItemAdded(_Event, tag_field="type", tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class OutputItemDone(_Event, tag_field="type", tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class ContentPartAdded(_Event, tag_field="type", tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ContentPartDone(_Event, tag_field="type", tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDelta(_Event, tag_field="type", tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Raw] = []


class TextDone(_Event, tag_field="type", tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Raw] = []


class ArgumentsDelta(_Event, tag_field="type", tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(_Event, tag_field="type", tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorDetail(Struct, kw_only=True):
    type: str
    code: str | None
    message: str
    param: str | None


class ErrorEvent(_Event, tag_field="type", tag="error"):
    """A failure after the stream began: flat, as the SDK's type reads it,
    and nested under ``error`` too, which makes the SDK raise ``APIError``."""

    code: str | None
    message: str
    param: str | None
    error: ErrorDetail


Event = (
    ResponseCreated
    | ResponseInProgress
    | ResponseCompleted
    | ResponseIncomplete
    | OutputItemAdded
    | OutputItemDone
    | ContentPartAdded
    | ContentPartDone
    | TextDelta
    | TextDone
    | ArgumentsDelta
    | ArgumentsDone
    | ErrorEvent
)

request_decoder = msgspec.json.Decoder(ResponsesRequest)
items_decoder = msgspec.json.Decoder(list[InputItem])
encoder = msgspec.json.Encoder()
