"""Issue 11, class 2, against the real engine: malformed input is a 400 in
OpenAI's shape with ``param`` where one applies, never a 500, and leaves no
traceback (nor an error line) in the log, on a gateway and on an edge node.

Each request here was a 500 (or a 200 for a wrong request) before: logit_bias
keys that ``str.isdigit`` takes but ``int`` does not, JSON nested past the
decoder's recursion limit, and schemas whose grammar llama.cpp refuses to
compile (which failed only once the request ran, as an engine error).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Server
from tests.test_edge_routing import edge_node

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 1, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 1, **fields}


def schema(value: Any) -> dict[str, Any]:
    return chat(
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": value}}
    )


def tool(parameters: Any) -> dict[str, Any]:
    function = {"name": "f", "parameters": parameters}
    return chat(tools=[{"type": "function", "function": function}], tool_choice="required")


def nested_body(depth: int) -> bytes:
    deep = b'{"a":' * depth + b"1" + b"}" * depth
    head = json.dumps(schema(None))[: -len("null}}}")].encode()
    return head + deep + b"}}}"


# (name, path, body, the param the 400 names; None: none applies)
CASES: list[tuple[str, str, dict[str, Any] | bytes, str | None]] = [
    ("bias-superscript", "chat", chat(logit_bias={"\u00b2": 1}), "logit_bias"),
    ("bias-arabic-digits", "chat", chat(logit_bias={"\u0661\u0662": 1}), "logit_bias"),
    ("bias-5000-digits", "chat", chat(logit_bias={"9" * 5000: 1}), "logit_bias"),
    ("bias-past-vocabulary", "chat", chat(logit_bias={"49152": 1}), "logit_bias"),
    ("bias-completion", "completions", completion(logit_bias={"\u00b2": 1}), "logit_bias"),
    ("nested-20000", "chat", nested_body(20_000), None),
    ("schema-empty-enum", "chat", schema({"enum": []}), "response_format"),
    ("schema-empty-type", "chat", schema({"type": []}), "response_format"),
    ("schema-empty-anyof", "chat", schema({"anyOf": []}), "response_format"),
    (
        "schema-nul-pattern",
        "chat",
        schema({"type": "string", "pattern": "^\u0000$"}),
        "response_format",
    ),
    (
        "schema-odd-property",
        "chat",
        schema({"type": "object", "properties": {'a"\\\n\u0000': {"type": "string"}}}),
        "response_format",
    ),
    ("tool-empty-enum", "chat", tool({"enum": []}), "tools"),
    ("tool-choice-without-tools", "chat", chat(tool_choice="required"), "tool_choice"),
    (
        "tool-choice-names-no-tool",
        "chat",
        {
            **tool({"type": "object"}),
            "tool_choice": {"type": "function", "function": {"name": "elsewhere"}},
        },
        "tool_choice",
    ),
    ("unknown-field", "chat", chat(colour="blue"), "colour"),
    ("wrong-type", "chat", chat(n="2"), "n"),
    ("negative-token-id", "completions", completion(prompt=[-1]), "prompt"),
]


def post(http: httpx.Client, base: str, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(
        f"{base}/{path.replace('chat', 'chat/completions')}",
        content=content,
        headers={"content-type": "application/json"},
    )


def check(response: httpx.Response, param: str | None) -> None:
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is None:
        assert error["param"] is None
    else:
        # Exactly the field, or a place inside it (a schema's own path).
        assert error["param"] == param or error["param"].startswith((f"{param}.", f"{param}[")), (
            error
        )


def assert_quiet(log: str) -> None:
    """No traceback, and nothing at error level, for a client's mistake."""
    assert "Traceback" not in log, log[-3000:]
    assert "ERROR" not in log, log[-3000:]


@pytest.mark.parametrize(("name", "path", "body", "param"), CASES, ids=[c[0] for c in CASES])
def test_the_gateway_answers_400(
    server: Server,
    http: httpx.Client,
    name: str,
    path: str,
    body: dict[str, Any] | bytes,
    param: str | None,
) -> None:
    before = len(server.log())
    check(post(http, server.base_url, path, body), param)
    # Still serving.
    assert post(http, server.base_url, "chat", chat()).status_code == 200
    assert_quiet(server.log()[before:])


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("edge")
    with edge_node(tmp, "edge") as (port, _):
        yield f"http://127.0.0.1:{port}/v1", tmp / "edge.log"


def test_an_edge_node_answers_400_to_each(edge: tuple[str, Path]) -> None:
    """An edge node protects itself: a gateway in front of it could be wrong."""
    base, log = edge
    before = log.stat().st_size
    with httpx.Client(timeout=120) as http:
        for name, path, body, param in CASES:
            try:
                check(post(http, base, path, body), param)
            except AssertionError as failure:
                raise AssertionError(f"{name}: {failure}") from None
        assert post(http, base, "chat", chat()).status_code == 200
    assert_quiet(log.read_bytes()[before:].decode(errors="replace"))
