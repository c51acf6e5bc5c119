"""Issue 11, class 2: every input error is a 4xx, in OpenAI's shape, with
``param`` where one applies, and leaves no traceback in the log. Fast: the
gateway's own validation, before any backend (tests/test_input_errors.py
sends the same requests to the real engine and an edge node)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from .conftest import Start
from .support import ENDPOINTS, body_for, chat_body, error_of, pool

pytestmark = pytest.mark.anyio

# Keys that are not token ids: OpenAI's keys are decimal token ids, and
# str.isdigit() or int() would take some of these (or fail on them: a 500).
BAD_BIAS_KEYS = [
    "\u0661\u0662",  # Arabic-Indic digits: int() reads them as 12
    "\u00b2",  # a superscript two: isdigit() but int() raises
    "\uff11",  # a fullwidth one
    "9" * 5000,  # past int()'s 4300 digits: ValueError
    "99999999999",  # more than fits a token id
    "-1",
    "+1",
    "1e5",
    "0x10",
    " 12 ",
    "12\n",
    "",
]


def nested(depth: int) -> Any:
    value: Any = {"type": "string"}
    for _ in range(depth):
        value = {"type": "array", "items": value}
    return value


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}


# A fake that does structured output and tools: nothing but nesting refuses.
CAPABLE = {"a": {"json_schema": True, "tools": True}}


def tool(parameters: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """A client's mistake is not the operator's: nothing above INFO, no traceback."""
    loud = [r for r in caplog.records if r.levelno > logging.INFO or r.exc_info]
    assert not loud, [r.getMessage()[:200] for r in loud]


@pytest.mark.parametrize("key", BAD_BIAS_KEYS, ids=lambda key: repr(key)[:20])
@pytest.mark.parametrize("path", ENDPOINTS)
async def test_a_logit_bias_key_that_is_not_a_token_id_is_a_400(
    start: Start, path: str, key: str, no_tracebacks: pytest.LogCaptureFixture
) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.post(path, json=body_for(path, logit_bias={key: 1}))
        assert response.status_code == 400, response.text
        error = error_of(response, 400)
        assert error["param"] == "logit_bias"
        assert error["type"] == "invalid_request_error"
        # A huge key is not echoed whole.
        assert len(error["message"]) < 300
        assert not gw.backend("a").calls
    assert_quiet(no_tracebacks)


async def test_ascii_token_ids_are_still_accepted(start: Start) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.post(
            "/v1/chat/completions", json=chat_body(logit_bias={"0": -100, "49151": 5.5})
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": schema_format(nested(100))}, None),
        ({"tools": tool(nested(100)), "tool_choice": "required"}, None),
        ({"metadata": nested(100)}, None),
    ],
    ids=["schema", "tool", "metadata"],
)
async def test_json_nested_past_the_limit_is_a_400(
    start: Start,
    fields: dict[str, Any],
    param: str | None,
    no_tracebacks: pytest.LogCaptureFixture,
) -> None:
    async with start(pool("a", fakes=CAPABLE)) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(**fields))
        assert response.status_code == 400, response.text
        error = error_of(response, 400)
        assert "nest" in error["message"]
        assert str(64) in error["message"]
        assert not gw.backend("a").calls
    assert_quiet(no_tracebacks)


@pytest.mark.parametrize("depth", [1_000, 100_000])
async def test_json_nested_past_the_recursion_limit_is_a_400(
    start: Start, depth: int, no_tracebacks: pytest.LogCaptureFixture
) -> None:
    # Built as bytes: json.dumps itself would overflow the stack.
    schema = b'{"a":' * depth + b"1" + b"}" * depth
    body = (
        b'{"model":"m","messages":[{"role":"user","content":"x"}],'
        b'"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":'
        + schema
        + b"}}}"
    )
    async with start(pool("a", fakes=CAPABLE)) as gw:
        response = await gw.http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert "nest" in error_of(response, 400)["message"]
    assert_quiet(no_tracebacks)


async def test_the_depth_limit_is_the_operators(start: Start) -> None:
    deep = {"response_format": schema_format(nested(20))}
    async with start(pool("a", fakes=CAPABLE, limits={"max_json_depth": 16})) as gw:
        refused = await gw.http.post("/v1/chat/completions", json=chat_body(**deep))
        assert refused.status_code == 400
        assert "16" in error_of(refused, 400)["message"]
    async with start(pool("a", fakes=CAPABLE)) as gw:
        allowed = await gw.http.post("/v1/chat/completions", json=chat_body(**deep))
        assert allowed.status_code == 200, allowed.text


async def test_brackets_inside_strings_do_not_count_as_nesting(start: Start) -> None:
    text = "[" * 5000 + "{" * 5000
    async with start(pool("a")) as gw:
        response = await gw.http.post(
            "/v1/chat/completions",
            json=chat_body(messages=[{"role": "user", "content": text + '\\"' + text}]),
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/v1/chat/completions", "POST"), ("TRACE", "/v1/models", "GET")],
)
async def test_a_405_says_which_methods_the_path_has(
    start: Start, method: str, path: str, allowed: str
) -> None:
    # RFC 9110: a 405 carries Allow (schemathesis's ST204 found it missing).
    async with start(pool("a")) as gw:
        response = await gw.http.request(method, path)
    error_of(response, 405)
    assert allowed in response.headers["allow"].split(", ")


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": [{"role": "x" * 100_000, "content": "Hi"}]},
        {"x" * 100_000: 1},
        {"tool_choice": "y" * 100_000},
    ],
    ids=["role", "field-name", "enum"],
)
async def test_a_refused_value_is_not_echoed_whole(start: Start, fields: dict[str, Any]) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(**fields))
    error = error_of(response, 400)
    assert len(error["message"]) < 1000
    assert error["param"] is None or len(error["param"]) < 400
