"""Writes tests/data/openai-openapi-answers.json: the schemas of OpenAI's answers
(CreateChatCompletionResponse, CreateChatCompletionStreamResponse,
CreateCompletionResponse, Response, ResponseStreamEvent,
CreateEmbeddingResponse) and every component they reference, copied as they
are from OpenAI's published OpenAPI description.

Usage: python tests/data/extract_openai_schemas.py OPENAPI_JSON COMMIT
(OPENAPI_JSON: openapi.json of github.com/openai/openai-openapi at COMMIT).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ANSWERS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "Response",
    "ResponseStreamEvent",
    "CreateEmbeddingResponse",
)
OUT = Path(__file__).with_name("openai-openapi-answers.json")


def referenced(node: Any, schemas: dict[str, Any], found: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                name = value.rsplit("/", 1)[1]
                if name not in found:
                    found[name] = schemas[name]
                    referenced(schemas[name], schemas, found)
            else:
                referenced(value, schemas, found)
    elif isinstance(node, list):
        for value in node:
            referenced(value, schemas, found)


def main(source: Path, commit: str) -> None:
    schemas = json.loads(source.read_text())["components"]["schemas"]
    found = {name: schemas[name] for name in ANSWERS}
    for name in ANSWERS:
        referenced(schemas[name], schemas, found)
    document = {
        "source": f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.json",
        "commit": commit,
        "note": (
            "Copied unchanged. The description is OpenAPI 3.1 but a few fields still "
            "say `nullable: true` (3.0): the tests read it as 'or null'."
        ),
        "components": {"schemas": dict(sorted(found.items()))},
    }
    OUT.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
