"""Requests that crashed, hung or stalled a real engine through its grammar
code, against a real `nomoat serve` and a real `nomoat edge` node: each is now
a 400 naming the place in the schema (or a valid answer), and the server
answers everyone afterwards (docs/security/grammar.md).

Each server here is the module's own: on code without these defences the
first of these requests kills it (SIGSEGV in llama.cpp's grammar parser,
SIGABRT when a grammar allows no token), which must not take the shared
session server down with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Server, config_with_key, running_server
from tests.test_edge_routing import edge_node

pytestmark = pytest.mark.e2e

SCHEMA = "response_format.json_schema.schema"


def response_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


# name: (schema, the param of the 400). Each crashed, hung or stalled the
# engine before (see docs/security/grammar.md for what each did).
CRASHES: dict[str, tuple[Any, str]] = {
    # ~100 bytes: 100000 nested groups overflow llama.cpp's stack (SIGSEGV).
    "huge maxItems": (
        {"type": "array", "items": {"type": "integer"}, "maxItems": 100_000},
        SCHEMA + ".maxItems",
    ),
    "huge maxLength": ({"type": "string", "maxLength": 100_000}, SCHEMA + ".maxLength"),
    # The converter builds a 180 MB grammar string in seconds (1e9: 18 GB, OOM).
    "huge minItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 10_000_000},
        SCHEMA + ".minItems",
    ),
    "huge {n} in a pattern": (
        {"type": "string", "pattern": "^a{0,100000}$"},
        SCHEMA + ".pattern",
    ),
    # No token can produce NUL: every candidate is rejected, the sampler
    # still picks one, and accepting it aborts the process (SIGABRT).
    "pattern that leaves no token": ({"type": "string", "pattern": "^\\x00$"}, SCHEMA + ".pattern"),
    # a ::= a | null: llama.cpp refuses the grammar (left recursion), a 500.
    "left-recursive $ref": (
        {
            "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/a"}},
        },
        SCHEMA,
    ),
    "$ref to a property of itself": (
        {"type": "object", "properties": {"x": {"$ref": "#/properties/x"}}},
        SCHEMA + ".properties.x.$ref",
    ),
    # 10000 alternatives matched against every token: over a second of CPU
    # per token while they last, every generation in the batch waiting.
    "enormous enum": ({"enum": list(range(10_000))}, SCHEMA + ".enum"),
    # 50 levels: past schema_max_depth (32), within the body's max_json_depth (64).
    "deeply nested": (
        json.loads('{"type": "array", "items": ' * 50 + "{}" + "}" * 50),
        SCHEMA + ".items" * 32,
    ),
}


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": 8,
        "temperature": 0,
        **fields,
    }
    return body


def still_serving(client: httpx.Client) -> None:
    """The process is alive and answers a plain request."""
    assert client.get("/health").status_code == 200
    reply = client.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] is not None


def assert_refused(reply: httpx.Response, param: str) -> None:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


# ---------------------------------------------------------------- the gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = config_with_key(
        """
        [backends.embedded]
        type = "llamacpp"
        threads = 1
        parallel = 2

        [models.smollm2-135m-instruct]
        deployments = [{ backend = "embedded" }]
        """
    )
    with running_server(tmp_path_factory.mktemp("grammar"), config) as live:
        yield live


@pytest.fixture
def client(gateway: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    with httpx.Client(base_url=gateway.root_url, headers=headers, timeout=60) as raw:
        yield raw


@pytest.mark.parametrize("name", list(CRASHES))
def test_a_crashing_schema_is_a_400_and_the_server_survives(
    name: str, client: httpx.Client, gateway: Server
) -> None:
    schema, param = CRASHES[name]
    reply = client.post("/v1/chat/completions", json=chat(response_format=response_format(schema)))
    assert_refused(reply, param)
    assert gateway.process.poll() is None, gateway.log()[-2000:]
    still_serving(client)


def test_a_crashing_tool_schema_is_a_400_naming_the_tool(
    client: httpx.Client, gateway: Server
) -> None:
    tools = [
        {"type": "function", "function": {"name": "fine", "parameters": {"type": "object"}}},
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {
                    "type": "object",
                    "properties": {"ids": {"type": "array", "maxItems": 100_000}},
                },
            },
        },
    ]
    for choice in ("required", {"type": "function", "function": {"name": "lookup"}}):
        reply = client.post("/v1/chat/completions", json=chat(tools=tools, tool_choice=choice))
        assert_refused(reply, "tools[1].function.parameters.properties.ids.maxItems")
    still_serving(client)


def test_a_crashing_schema_in_a_stream_is_refused_before_the_first_byte(
    client: httpx.Client,
) -> None:
    schema, param = CRASHES["huge maxItems"]
    body = chat(response_format=response_format(schema), stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.read()
        assert_refused(reply, param)
    still_serving(client)


def test_patterns_that_hung_the_converter_now_work_and_nobody_waits(
    client: httpx.Client,
) -> None:
    """A bare } or ] sent llama-cpp-python's converter into an endless loop in
    one of the gateway's few worker threads; after six, every chat request
    waited forever. Rewritten, the pattern converts and is followed."""
    schema = {"type": "string", "pattern": "^a}]$"}
    body = chat(response_format=response_format(schema), max_tokens=10)

    def ask(_: int) -> httpx.Response:
        return client.post("/v1/chat/completions", json=body, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    for reply in replies:
        assert reply.status_code == 200, reply.text
        content = reply.json()["choices"][0]["message"]["content"]
        if reply.json()["choices"][0]["finish_reason"] == "stop":
            assert json.loads(content) == "a}]"
    still_serving(client)


def test_a_grammar_too_slow_to_follow_ends_with_a_400_and_others_carry_on(
    client: httpx.Client,
) -> None:
    """Ten optional runs of up to 30 letters can split a word in ever more
    ways: each token costs more CPU (0.3 s a token on average, 56 s for 170
    tokens) and every generation batched with it waits. Past its CPU budget
    (2 s, plus 0.1 s a token) the generation ends; a plain request running
    beside it finishes."""
    schema = {"type": "string", "pattern": "^([a-z]{0,30}){10}[a-z]{200}$"}
    slow = chat(response_format=response_format(schema), max_tokens=400)
    with ThreadPoolExecutor(2) as pool:
        stalled = pool.submit(client.post, "/v1/chat/completions", json=slow, timeout=600)
        time.sleep(1)
        started = time.monotonic()
        plain = client.post("/v1/chat/completions", json=chat(max_tokens=16))
        beside = time.monotonic() - started
        reply = stalled.result()
    assert plain.status_code == 200 and beside < 60
    assert_refused(reply, SCHEMA)
    assert "too costly to follow" in reply.json()["error"]["message"]
    still_serving(client)


FOLLOWED: dict[str, Any] = {
    "OpenAI's math reasoning": "math_reasoning",
    "OpenAI's recursive UI": "ui_recursive",
    "OpenAI's linked list": "linked_list",
    "a user profile with patterns": "user_profile",
    "an enum of 1000 values": {"enum": [f"value-{i:04d}" for i in range(1000)]},
    "1000 items": {"type": "array", "items": {"type": "integer"}, "maxItems": 1000},
}


@pytest.mark.parametrize("name", list(FOLLOWED))
def test_real_world_schemas_are_followed_within_the_budget(name: str, client: httpx.Client) -> None:
    from tests.test_schema_guard import REAL_WORLD

    schema = FOLLOWED[name]
    schema = REAL_WORLD[schema] if isinstance(schema, str) else schema
    body = chat(response_format=response_format(schema), max_tokens=48)
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        json.loads(choice["message"]["content"])


# Values whose quotes and backslashes llama-cpp-python's converter left
# unescaped in the grammar: the first closed the literal and offered "zzz"
# as an alternative; the others matched text that is not their JSON.
LITERALS = ['a\\" | "zzz', "back\\slash", 'quote" and \\n']


@pytest.mark.parametrize("value", LITERALS)
def test_quotes_and_backslashes_in_a_const_give_exactly_its_json(
    value: str, client: httpx.Client
) -> None:
    schema = {"type": "object", "properties": {value: {"const": value}}, "required": [value]}
    body = chat(response_format=response_format(schema), max_tokens=64)
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert json.loads(choice["message"]["content"]) == {value: value}


# -------------------------------------------------------------- an edge node


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Any]]:
    with (
        edge_node(tmp_path_factory.mktemp("grammar-edge"), "edge") as (port, process),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as raw,
    ):
        yield raw, process


EDGE_CASES = ["huge maxItems", "pattern that leaves no token", "huge {n} in a pattern"]


@pytest.mark.parametrize("name", EDGE_CASES)
def test_an_edge_node_refuses_crashing_schemas_itself(
    name: str, edge: tuple[httpx.Client, Any]
) -> None:
    """Sent straight to the node, as a wrong gateway would: the node checks."""
    client, process = edge
    schema, param = CRASHES[name]
    reply = client.post("/v1/chat/completions", json=chat(response_format=response_format(schema)))
    assert_refused(reply, param)
    assert process.poll() is None
    still_serving(client)


def test_an_edge_nodes_engine_refuses_patterns_llama_cpp_cannot_take(
    edge: tuple[httpx.Client, Any],
) -> None:
    """Pattern syntax is the engine's own check (other engines take more):
    word boundaries and backreferences are refused by the node's backend."""
    client, _ = edge
    for pattern in ("^\\bword$", "^(a)\\1$"):
        schema = {"type": "object", "properties": {"w": {"type": "string", "pattern": pattern}}}
        body = chat(response_format=response_format(schema))
        reply = client.post("/v1/chat/completions", json=body)
        assert_refused(reply, SCHEMA + ".properties.w.pattern")
    still_serving(client)


# ------------------------------------------------------------------ the engine

_DEAD_END = textwrap.dedent(
    """
    import sys
    from gateway.backends.llamacpp import embedded_model_path
    from gateway.engine.generation import GenerationRequest, generate
    from gateway.engine.native import GrammarError, NativeModel, SamplerSpec

    model = NativeModel(embedded_model_path(), n_ctx=256, n_threads=1)
    prompt = model.tokenize("Say something:", add_special=True, parse_special=False)
    # Past every check: a class only NUL matches, after a first character.
    dead_end = 'root ::= "a" [\\\\x00]'
    for temperature in (0.0, 1.0):
        spec = SamplerSpec(temperature=temperature, grammar=dead_end)
        try:
            generate(model, GenerationRequest(prompt, 8, spec))
        except GrammarError as error:
            print("refused:", error)
        else:
            sys.exit("the dead end was followed")
    ok = SamplerSpec(temperature=0.0, grammar='root ::= "ok"')
    fine = generate(model, GenerationRequest(prompt, 4, ok))
    assert fine.text == "ok", fine.text
    print("alive")
    """
)


def test_a_grammar_that_allows_no_token_ends_its_generation_not_the_process() -> None:
    """What validation cannot see for every vocabulary: at some point no
    token fits. llama.cpp then aborts the process (greedy: GGML_ABORT on the
    end token; sampling: an uncaught C++ exception); now that generation ends
    with an error, and the engine goes on."""
    done = subprocess.run(
        [sys.executable, "-c", _DEAD_END],
        capture_output=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    output = done.stdout.decode()
    assert done.returncode == 0, (done.returncode, output, done.stderr.decode()[-2000:])
    assert output.count("refused: the grammar allows no token") == 2
    assert output.rstrip().endswith("alive")
