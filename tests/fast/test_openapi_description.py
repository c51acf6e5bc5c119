"""nomoat's OpenAPI description of its OpenAI endpoints (what the fuzz suite
generates requests from) says exactly which fields the wire types accept, and
is served at GET /openapi.json. (tests/test_fuzz.py loads it with schemathesis,
which validates it as OpenAPI 3.1.)"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway import wire
from gateway.app import OPENAPI_FILE
from gateway.openai_responses import types as rt

from .conftest import Start
from .support import pool

DOCUMENT: dict[str, Any] = json.loads(OPENAPI_FILE.read_text())
SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]

# Each request type and the component describing it.
REQUEST_TYPES: dict[str, type[msgspec.Struct]] = {
    "ChatCompletionRequest": wire.ChatCompletionRequest,
    "CompletionRequest": wire.CompletionRequest,
    "SystemMessage": wire.SystemMessage,
    "DeveloperMessage": wire.DeveloperMessage,
    "UserMessage": wire.UserMessage,
    "AssistantMessage": wire.AssistantMessage,
    "ToolMessage": wire.ToolMessage,
    "TextPart": wire.TextPart,
    "ImagePart": wire.ImagePart,
    "AudioPart": wire.AudioPart,
    "RefusalPart": wire.RefusalPart,
    "ToolCall": wire.ToolCall,
    "FunctionCall": wire.FunctionCall,
    "ResponseFormatText": wire.ResponseFormatText,
    "ResponseFormatJsonObject": wire.ResponseFormatJsonObject,
    "ResponseFormatJsonSchema": wire.ResponseFormatJsonSchema,
    "JsonSchemaSpec": wire.JsonSchemaSpec,
    "Tool": wire.Tool,
    "FunctionDefinition": wire.FunctionDefinition,
    "NamedToolChoice": wire.NamedToolChoice,
    "StreamOptions": wire.StreamOptions,
    "EmbeddingRequest": wire.EmbeddingRequest,
    "ResponsesRequest": rt.ResponsesRequest,
    "ResponseTextConfig": rt.TextConfig,
}


def fields_of(struct: type[msgspec.Struct]) -> tuple[set[str], set[str]]:
    """All the fields a body may hold (the tag too), and the required ones."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    names = {field.encode_name for field in info.fields}
    required = {field.encode_name for field in info.fields if field.required}
    if info.tag_field is not None:
        names.add(info.tag_field)
        required.add(info.tag_field)
    return names, required


@pytest.mark.parametrize("name", sorted(REQUEST_TYPES))
def test_each_request_schema_names_the_fields_the_decoder_accepts(name: str) -> None:
    names, required = fields_of(REQUEST_TYPES[name])
    component = SCHEMAS[name]
    assert set(component["properties"]) == names
    assert set(component.get("required", ())) == required
    # Unknown fields are refused exactly where the decoder refuses them.
    closed = REQUEST_TYPES[name].__struct_config__.forbid_unknown_fields
    assert (component.get("additionalProperties", True) is False) == closed


@pytest.mark.anyio
async def test_the_gateway_serves_it(start: Start) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == DOCUMENT
