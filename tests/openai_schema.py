"""Validation of answers against OpenAI's published OpenAPI description
(tests/data/openai-openapi-answers.json, copied from openai/openai-openapi).

Read strictly, as "exactly OpenAI's shape": every object of the description
is closed (``additionalProperties: false`` where it lists its properties), so
a field OpenAI never sends fails as surely as a wrong type. Two readings of
the description, both said where they are made:

- some fields still say ``nullable: true`` (OpenAPI 3.0) in a 3.1 document,
  whose JSON Schema ignores that keyword: read as "or null", as meant;
- CreateCompletionResponse says streamed and whole answers share one shape,
  with ``finish_reason`` never null; OpenAI's own streaming example (and its
  API) sends null until the last chunk, so stream chunks may have null there;
- the Response's ``user`` (a string) and ``usage`` (an object) by the
  description are null in OpenAI's own examples of a Response (``usage`` in
  ``response.created``'s) and optional in its SDK's type: read as "or null";
- the Response's ``store`` is in OpenAI's examples of a Response (and sent by
  its API) but not in the description: allowed, a boolean;
- an object put together with ``allOf`` (the Response is) is closed as a
  whole (``unevaluatedProperties: false``), its parts left open: closing each
  part would refuse the other parts' fields. A component that is such a part
  stays open wherever it is used.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

DESCRIPTION = Path(__file__).parent / "data" / "openai-openapi-answers.json"

CHAT = "CreateChatCompletionResponse"
CHUNK = "CreateChatCompletionStreamResponse"
COMPLETION = "CreateCompletionResponse"
COMPLETION_CHUNK = "CompletionStreamChunk"  # derived below
RESPONSE = "Response"
RESPONSE_EVENT = "ResponseStreamEvent"
EMBEDDINGS = "CreateEmbeddingResponse"


def _read_nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_read_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _read_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def _closed(node: Any, part: bool = False) -> Any:
    """``node`` with each object closed; ``part``: it is one of an ``allOf``."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {
        key: [_closed(item, part=True) for item in value] if key == "allOf" else _closed(value)
        for key, value in node.items()
    }
    if "allOf" in node and not part:
        node.setdefault("unevaluatedProperties", False)
    elif "properties" in node and not part:
        node.setdefault("additionalProperties", False)
    return node


def _parts(node: Any) -> set[str]:
    """The components some ``allOf`` lists."""
    found: set[str] = set()
    if isinstance(node, list):
        for item in node:
            found |= _parts(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "allOf":
                found |= {item["$ref"].rsplit("/", 1)[1] for item in value if "$ref" in item}
            found |= _parts(value)
    return found


@cache
def _components() -> dict[str, Any]:
    schemas = json.loads(DESCRIPTION.read_text())["components"]["schemas"]
    schemas = _read_nullable(schemas)
    parts = _parts(schemas)
    schemas = {name: _closed(schema, part=name in parts) for name, schema in schemas.items()}
    stream = copy.deepcopy(schemas[COMPLETION])
    finish = stream["properties"]["choices"]["items"]["properties"]["finish_reason"]
    stream["properties"]["choices"]["items"]["properties"]["finish_reason"] = {
        "anyOf": [finish, {"type": "null"}]
    }
    schemas[COMPLETION_CHUNK] = stream
    for fields in (
        schemas["ModelResponseProperties"]["properties"],
        schemas["Response"]["allOf"][2]["properties"],
    ):
        key = "user" if "user" in fields else "usage"
        fields[key] = {"anyOf": [fields[key], {"type": "null"}]}
    schemas["Response"]["allOf"].append({"properties": {"store": {"type": "boolean"}}})
    return {"schemas": schemas}


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": _components()}
    return jsonschema.Draft202012Validator(schema)


def problems(instance: Any, name: str) -> list[str]:
    """What in ``instance`` the description does not allow, one line each."""
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in _validator(name).iter_errors(instance)
    ]


def assert_valid(instance: Any, name: str) -> None:
    found = problems(instance, name)
    assert not found, f"not a {name} by OpenAI's description:\n" + "\n".join(found)


def assert_answer(instance: Any, *, stream: bool, chat: bool) -> None:
    """``instance``: one answer, or one chunk of a stream."""
    if chat:
        assert_valid(instance, CHUNK if stream else CHAT)
    else:
        assert_valid(instance, COMPLETION_CHUNK if stream else COMPLETION)
