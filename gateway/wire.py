"""OpenAI wire types, as msgspec Structs: decoded and encoded on the hot path.

Requests reject unknown fields (as OpenAI does: "Unrecognized request
argument"), and range limits are declared on the fields, so a bad value fails in
the decoder with the offending path, before any work starts. Responses encode
exactly what OpenAI's published description allows: required fields are always
present (``null`` where OpenAI sends ``null``); optional ones are left out, never
``null`` where the description says "a string or absent". The answers live in
:mod:`gateway.wire_answers` (upstreams' answers are decoded into them,
leniently) and are re-exported here.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from gateway.wire_answers import FINISH_REASONS as FINISH_REASONS
from gateway.wire_answers import ChatChoice as ChatChoice
from gateway.wire_answers import ChatCompletion as ChatCompletion
from gateway.wire_answers import ChatCompletionChunk as ChatCompletionChunk
from gateway.wire_answers import ChoiceLogprobs as ChoiceLogprobs
from gateway.wire_answers import ChunkChoice as ChunkChoice
from gateway.wire_answers import ChunkDelta as ChunkDelta
from gateway.wire_answers import Completion as Completion
from gateway.wire_answers import CompletionChoice as CompletionChoice
from gateway.wire_answers import CompletionLogprobs as CompletionLogprobs
from gateway.wire_answers import CompletionTokensDetails as CompletionTokensDetails
from gateway.wire_answers import FinishReason as FinishReason
from gateway.wire_answers import FunctionCall as FunctionCall
from gateway.wire_answers import FunctionCallDelta as FunctionCallDelta
from gateway.wire_answers import PromptTokensDetails as PromptTokensDetails
from gateway.wire_answers import ResponseMessage as ResponseMessage
from gateway.wire_answers import TokenLogprob as TokenLogprob
from gateway.wire_answers import ToolCall as ToolCall
from gateway.wire_answers import ToolCallDelta as ToolCallDelta
from gateway.wire_answers import TopLogprob as TopLogprob
from gateway.wire_answers import Usage as Usage
from gateway.wire_answers import whole_call_delta as whole_call_delta

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


# Embeddings' ``input``: a string, strings, token ids, or lists of token ids
# (msgspec takes one array type in a union: gateway/embeddings/inputs.py
# refuses mixtures).
EmbeddingItem = str | int | list[int]


class EmbeddingRequest(_Request):
    model: str
    input: str | list[EmbeddingItem]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None
    user: str | None = None

    # Embeddings never stream; what the handlers read of every request.
    @property
    def stream(self) -> bool:
        return False


class Embedding(Struct, kw_only=True):
    object: Literal["embedding"]
    index: int
    # Floats, or base64 of their little-endian float32 bytes.
    embedding: list[float] | str


class EmbeddingUsage(Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct, kw_only=True):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -------------------------------------------------------------------------- responses
# In gateway/wire_answers.py (decoded leniently from upstreams, encoded exactly),
# re-exported here: the rest of the gateway names them ``wire.X``.


class Model(Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | UnsetType = UNSET
    parent: str | UnsetType | None = UNSET
    # nomoat's own: what the model serves, "chat" (chat and completions)
    # and/or "embeddings". OpenAI's clients ignore fields they do not know.
    capabilities: list[str] | UnsetType = UNSET


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
    # Its limit (models.*.deployments[].max_concurrency); null: none.
    max_concurrency: int | None = None


class GatewayStatus(Struct, kw_only=True):
    """``GET /status``: every model's deployments and their health."""

    draining: bool
    models: dict[str, list[DeploymentStatus]]
    # Requests waiting now for a deployment below its max_concurrency.
    waiting_for_capacity: int = 0
    # The worker that answered, of `nomoat serve --workers N`: with several,
    # each answers for itself (its own routing state and counts).
    worker: int = 0
    workers: int = 1


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
embedding_request_decoder = msgspec.json.Decoder(EmbeddingRequest)
embedding_list_decoder = msgspec.json.Decoder(EmbeddingList)
adapter_registration_decoder = msgspec.json.Decoder(AdapterRegistration)
encoder = msgspec.json.Encoder()
