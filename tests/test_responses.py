"""The Responses API of a real `nomoat serve` with the embedded llama.cpp
engine (SmolLM2-135M), through the official `openai` SDK.

Prompts are greedy (temperature 0) and chosen for what the small model makes
of them: a list that ends by itself, a call it is made to make. That the
model saw the earlier turns of a conversation is shown by the engine's own
prompt token counts, not by the model's knowledge: a Responses turn through
``previous_response_id`` costs exactly the prompt tokens of the chat request
that spells the whole conversation out.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import API_KEY, MODEL, Server, running_server
from openai.types.responses import ResponseFunctionToolCall
from pydantic import BaseModel

from gateway.auth import hash_api_key

pytestmark = pytest.mark.e2e

OTHER_KEY = "sk-nomoat-other-0123456789abcdef"
COUNT = "Count from 1 to 10, separated by commas."
WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A gateway with two keys and its ledger in a file the test reads."""
    directory = tmp_path_factory.mktemp("responses")
    database = directory / "ledger.db"
    config = f"""
[server]
api_key_hashes = ["{hash_api_key(API_KEY)}", "{hash_api_key(OTHER_KEY)}"]
shutdown_grace_seconds = 20

[accounting]
database = "sqlite:///{database}"
ledger_flush_seconds = 0.05
"""
    with running_server(directory, config) as server:
        yield server, database


@pytest.fixture
def client(live: tuple[Server, Path]) -> openai.OpenAI:
    server, _ = live
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def stranger(live: tuple[Server, Path]) -> openai.OpenAI:
    server, _ = live
    return openai.OpenAI(base_url=server.base_url, api_key=OTHER_KEY, max_retries=0, timeout=120)


def responses_rows(database: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(database) as connection:
        connection.row_factory = sqlite3.Row
        query = "select * from usage where endpoint = '/v1/responses' order by id"
        return [dict(row) for row in connection.execute(query)]


def rows_quiet(database: Path) -> list[dict[str, Any]]:
    """The Responses rows once no more come for a while (the ledger writes
    every 50 ms here; the requests before have all been answered)."""
    rows = responses_rows(database)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = responses_rows(database)
        if len(again) == len(rows):
            return rows
        rows = again
    return rows


def test_string_input_and_instructions(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL, input=COUNT, temperature=0, max_output_tokens=100
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.output_text.startswith("1, 2, 3")
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    # Instructions go first, as a system message: the engine counts exactly
    # the prompt of the chat request that has it so.
    instructions = "You are a helpful assistant who counts."
    instructed = client.responses.create(
        model=MODEL, input=COUNT, instructions=instructions, temperature=0, max_output_tokens=5
    )
    assert instructed.instructions == instructions
    spelled = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": instructions}, {"role": "user", "content": COUNT}],
        max_tokens=5,
    )
    assert spelled.usage is not None and instructed.usage is not None
    assert instructed.usage.input_tokens == spelled.usage.prompt_tokens
    # Cut at its budget: incomplete, and why.
    cut = client.responses.create(model=MODEL, input=COUNT, temperature=0, max_output_tokens=3)
    assert cut.status == "incomplete" and cut.completed_at is None
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage is not None and cut.usage.output_tokens == 3


def test_message_items_with_every_role(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "developer", "content": [{"type": "input_text", "text": "Answer briefly."}]},
            {"role": "user", "content": "Say hello."},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello!", "annotations": []}],
            },
            {"role": "user", "content": [{"type": "input_text", "text": COUNT}]},
        ],
        temperature=0,
        max_output_tokens=100,
    )
    assert response.output_text.startswith("1, 2, 3")


def test_a_forced_function_call_and_its_output(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input="What's the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=40,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert isinstance(call, ResponseFunctionToolCall)
    assert call.name == "get_weather" and call.call_id and call.id
    assert isinstance(json.loads(call.arguments)["city"], str)
    # The function's result goes back as the next turn's input.
    answered = client.responses.create(
        model=MODEL,
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        temperature=0,
        max_output_tokens=30,
    )
    assert answered.output_text
    assert answered.usage is not None and response.usage is not None
    assert answered.usage.input_tokens > response.usage.input_tokens


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input="Describe a person as JSON with name and age.",
        text={
            "format": {
                "type": "json_schema",
                "name": "person",
                "schema": PERSON_SCHEMA,
                "strict": True,
            }
        },
        temperature=0,
        max_output_tokens=40,
    )
    value = json.loads(response.output_text)
    assert set(value) == {"name", "age"}
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


class Person(BaseModel):
    name: str
    age: int


def test_stream_through_the_sdk_helpers(client: openai.OpenAI) -> None:
    # A schema the grammar closes: the answer surely ends before its budget.
    with client.responses.stream(
        model=MODEL,
        input="Describe a person as JSON with name and age.",
        text_format=Person,
        temperature=0,
        max_output_tokens=60,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert final.status == "completed" and final.output_text == deltas
    assert isinstance(final.output_parsed, Person)
    assert final.usage is not None and final.usage.output_tokens > 0
    # A streamed function call: its arguments come as deltas.
    with client.responses.stream(
        model=MODEL,
        input="What's the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_output_tokens=40,
    ) as stream:
        kinds = [event.type for event in stream]
        called = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    assert [item.type for item in called.output] == ["function_call"]


def test_three_turns_through_previous_response_id(client: openai.OpenAI) -> None:
    turns = ["My name is Ada.", "I live in Paris.", "What is my name?"]
    responses = []
    previous: str | None = None
    for text in turns:
        response = client.responses.create(
            model=MODEL,
            input=text,
            previous_response_id=previous,
            temperature=0,
            max_output_tokens=20,
        )
        responses.append(response)
        previous = response.id
    # The same conversation spelled out as a chat request: the engine counts
    # exactly the prompt tokens the third turn was charged, so the third turn
    # carried both earlier turns, questions and answers.
    messages: list[Any] = []
    for text, response in zip(turns, responses, strict=True):
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": response.output_text})
    spelled = client.chat.completions.create(
        model=MODEL, messages=messages[:-1], temperature=0, max_tokens=20
    )
    third = responses[2]
    assert spelled.usage is not None and third.usage is not None
    assert third.usage.input_tokens == spelled.usage.prompt_tokens
    assert spelled.choices[0].message.content == third.output_text
    first = responses[0].usage
    assert first is not None and third.usage.input_tokens > 2 * first.input_tokens


def test_retrieve_delete_and_another_keys_404(
    client: openai.OpenAI, stranger: openai.OpenAI
) -> None:
    response = client.responses.create(
        model=MODEL, input=COUNT, temperature=0, max_output_tokens=10, metadata={"case": "x"}
    )
    kept = client.responses.retrieve(response.id)
    assert kept.id == response.id and kept.output_text == response.output_text
    assert kept.metadata == {"case": "x"}
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.create(model=MODEL, input="Hi", previous_response_id=response.id)
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    unstored = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_errors_are_the_sdk_exception_classes(
    client: openai.OpenAI, live: tuple[Server, Path]
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])
    assert refused.value.param == "tools[0].type"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="Hi", background=True)
    assert refused.value.param == "background"  # type: ignore[attr-defined]
    # The engine cannot choose between text and a call by itself: named as chat names it.
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="Hi", tools=[WEATHER_TOOL])
    assert refused.value.param == "tool_choice"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_unknown")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="Hi")
    server, _ = live
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0).responses.create(
            model=MODEL, input="Hi"
        )


def test_one_ledger_row_per_request(client: openai.OpenAI, live: tuple[Server, Path]) -> None:
    _, database = live
    before = len(rows_quiet(database))
    answered = client.responses.create(model=MODEL, input=COUNT, temperature=0, max_output_tokens=8)
    # Greedy, the count runs past 8 tokens: sampled, it may end sooner (completed).
    with client.responses.stream(
        model=MODEL, input=COUNT, temperature=0, max_output_tokens=8
    ) as stream:
        last = list(stream)[-1]
    assert last.type == "response.incomplete"
    streamed = last.response
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "file_search"}])
    rows = rows_quiet(database)[before:]
    assert len(rows) == 3
    by_id = {row["request_id"]: row for row in rows}
    for response, stream_flag in ((answered, 0), (streamed, 1)):
        row = by_id[response.id]
        assert response.usage is not None
        assert (row["status"], row["stream"], row["model"]) == (200, stream_flag, MODEL)
        assert row["prompt_tokens"] == response.usage.input_tokens
        assert row["completion_tokens"] == response.usage.output_tokens
    assert sorted(row["status"] for row in rows) == [200, 200, 400]
