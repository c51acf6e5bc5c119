"""OpenAI wire types, as msgspec Structs: decoded and encoded on the hot path.

Requests reject unknown fields (as OpenAI does: "Unrecognized request
argument"), and range limits are declared on the fields, so a bad value fails in
the decoder with the offending path, before any work starts. Responses encode
exactly what OpenAI sends: required fields are always present (``null`` where
OpenAI sends ``null``); optional ones use ``UNSET`` and are left out.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

# --------------------------------------------------------------------------- requests

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]


NO_SCHEMA = Raw(b"null")


class _Request(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Requests: unknown fields refused; unset fields left out when forwarded."""


class TextPart(_Request, tag_field="type", tag="text"):
    text: str


class ImageUrl(_Request):
    url: str
    detail: str | None = None


class ImagePart(_Request, tag_field="type", tag="image_url"):
    image_url: ImageUrl


class InputAudio(_Request):
    data: str
    format: str


class AudioPart(_Request, tag_field="type", tag="input_audio"):
    input_audio: InputAudio


class RefusalPart(_Request, tag_field="type", tag="refusal"):
    refusal: str


UserContentPart = TextPart | ImagePart | AudioPart
AssistantContentPart = TextPart | RefusalPart


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str


class ToolCall(Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Request, tag_field="role", tag="system"):
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(_Request, tag_field="role", tag="developer"):
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Request, tag_field="role", tag="user"):
    content: str | list[UserContentPart]
    name: str | None = None


class AssistantMessage(_Request, tag_field="role", tag="assistant"):
    content: str | list[AssistantContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Request, tag_field="role", tag="tool"):
    content: str | list[TextPart]
    tool_call_id: str


Message = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage


class ResponseFormatText(_Request, tag_field="type", tag="text"):
    pass


class ResponseFormatJsonObject(_Request, tag_field="type", tag="json_object"):
    pass


class JsonSchemaSpec(_Request):
    name: str
    description: str | None = None
    # Kept as raw JSON: the engine turns it into a grammar; no dict crosses
    # modules. (msgspec cannot put Raw in a union: "absent" is Raw(b"null").)
    schema: Raw = NO_SCHEMA
    strict: bool | None = None


class ResponseFormatJsonSchema(_Request, tag_field="type", tag="json_schema"):
    json_schema: JsonSchemaSpec


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: Raw = NO_SCHEMA
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str
    messages: list[Message]
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    n: PositiveInt | None = None
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # Accepted for compatibility with clients that always send them; no effect.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


PromptItem = str | int | list[int]


class CompletionRequest(_Request):
    model: str
    prompt: str | list[PromptItem]
    best_of: PositiveInt | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    n: PositiveInt | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None


# -------------------------------------------------------------------------- responses


class PromptTokensDetails(Struct, kw_only=True):
    # Prompt tokens served from a cache of earlier requests, not evaluated again.
    cached_tokens: int = 0


class Usage(Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Left out when the backend does not say; upstreams may send null.
    prompt_tokens_details: PromptTokensDetails | UnsetType | None = UNSET


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob] | None
    refusal: None = None


class ResponseMessage(Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[ToolCall] | UnsetType = UNSET


# "stop", "length", "tool_calls" or "content_filter" from OpenAI; engines
# behind the gateway may add their own (vLLM: "abort"), which pass through.
FinishReason = str


class ChatChoice(Struct, kw_only=True):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: FunctionCall | UnsetType = UNSET


class ChunkDelta(Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType | None = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChunkChoice(Struct, kw_only=True):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    # UNSET: left out (no include_usage); None: "usage": null on every chunk but
    # the last, as OpenAI sends it when include_usage is on.
    usage: Usage | UnsetType | None = UNSET


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | UnsetType | None = UNSET


class Model(Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | UnsetType = UNSET
    parent: str | UnsetType | None = UNSET


class ModelList(Struct, kw_only=True):
    object: Literal["list"]
    data: list[Model]


class Status(Struct, kw_only=True):
    status: str


class DeploymentStatus(Struct, kw_only=True):
    deployment: str
    backend: str
    engine_model: str
    ready: bool
    detail: str
    # Requests this gateway has on it now (streams until their last byte).
    in_flight: int = 0


class GatewayStatus(Struct, kw_only=True):
    """``GET /status``: every model's deployments and their health."""

    draining: bool
    models: dict[str, list[DeploymentStatus]]


class AdapterRegistration(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /admin/adapters``: register an adapter under the adapter root."""

    name: str
    base: str
    path: str
    sha256: str


class AdapterInfo(Struct, kw_only=True):
    id: str
    object: Literal["adapter"]
    base: str
    format: str
    path: str
    sha256: str
    # Backends that hold it loaded now.
    loaded_on: list[str]


class StackInfo(Struct, kw_only=True):
    id: str
    object: Literal["adapter_stack"]
    base: str
    adapters: list[str]


class AdapterList(Struct, kw_only=True):
    object: Literal["list"]
    data: list[AdapterInfo]
    stacks: list[StackInfo]


class Deleted(Struct, kw_only=True):
    id: str
    object: str
    deleted: bool


chat_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_request_decoder = msgspec.json.Decoder(CompletionRequest)
adapter_registration_decoder = msgspec.json.Decoder(AdapterRegistration)
encoder = msgspec.json.Encoder()
