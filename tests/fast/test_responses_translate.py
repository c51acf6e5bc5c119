"""The Responses API's translators, without a gateway: a Responses request as
the chat request the pipeline serves, a chat answer as a Response, typed chat
chunks as the Responses event stream. What they write is read back with the
official SDK's own types and stream accumulator."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway import wire
from gateway.errors import InvalidRequestError, UnsupportedFeatureError
from gateway.openai_responses import types as rt
from gateway.openai_responses.events import ResponseEvents, framed
from gateway.openai_responses.translate import (
    chat_request,
    decode_responses,
    echo_of,
    input_items,
    output_as_input,
    renamed,
    response_of,
)
from gateway.settings import LimitSettings

LIMITS = LimitSettings()
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def decoded(**body: Any) -> rt.ResponsesRequest:
    return decode_responses(json.dumps({"model": "m", **body}).encode(), LIMITS)


def as_chat(**body: Any) -> wire.ChatCompletionRequest:
    request = decoded(**body)
    return chat_request(request, input_items(request), LIMITS)


def plain(value: msgspec.Struct | list[Any]) -> Any:
    return json.loads(msgspec.json.encode(value))


def test_every_kind_of_input_becomes_the_chat_conversation() -> None:
    chat = as_chat(
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "S"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
            },
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "rainy"},
        ],
        max_output_tokens=40,
        temperature=0.5,
        top_p=0.9,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        user="u-1",
        stream=True,
    )
    assert plain(chat.messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in French."},
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {
            # The text and both calls that followed it: one assistant turn.
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "tool", "content": "rainy", "tool_call_id": "c2"},
    ]
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.user) == (40, 0.5, 0.9, "u-1")
    assert chat.tools is not None and chat.tools[0].function.name == "get_weather"
    assert plain(chat.tools[0].function)["parameters"] == WEATHER["parameters"]
    assert plain(chat.tool_choice) == {"type": "function", "function": {"name": "get_weather"}}
    # Always with usage: the Response reports it.
    assert chat.stream and chat.stream_options == wire.StreamOptions(include_usage=True)
    assert plain(as_chat(input="Hi").messages) == [{"role": "user", "content": "Hi"}]


def test_text_format_becomes_the_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    chat = as_chat(input="x", text={"format": fmt})
    assert plain(chat.response_format) == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }
    chat = as_chat(input="x", text={"format": {"type": "json_object"}})
    assert isinstance(chat.response_format, wire.ResponseFormatJsonObject)
    assert as_chat(input="x", text={"format": {"type": "text"}}).response_format is None
    # The Response echoes it as OpenAI writes it: a description only when
    # given (OpenAI's description has it a string, never null).
    echoed = echo_of(decoded(input="x", text={"format": fmt}), "m").text
    assert plain(echoed)["format"] == fmt


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [WEATHER, {"type": "code_interpreter", "container": "x"}]}, "tools[1].type"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0].type",
        ),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ],
)
def test_what_is_not_served_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    body.setdefault("input", "Hi")
    with pytest.raises(UnsupportedFeatureError) as refused:
        as_chat(**body)
    assert refused.value.param == param
    assert refused.value.status_code == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "frobnicate": 1}, "frobnicate"),
        ({"input": []}, "input"),
        ({"input": [{"role": "moderator", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user"}]}, "input[0].content"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
        ({"input": "x", "temperature": 3}, "temperature"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
            "text.format.schema",
        ),
        # Chat's own limits, named as the Responses request names the field.
        ({"input": "x", "max_output_tokens": 10**9}, "max_output_tokens"),
        ({"input": "x", "tools": [WEATHER] * 200}, "tools"),
        ({"input": "x", "metadata": {"k": "v" * 600}}, "metadata"),
    ],
)
def test_malformed_requests_are_a_400_with_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        as_chat(**body)
    assert refused.value.param == param


def test_an_error_does_not_echo_a_clients_value_whole() -> None:
    """Found by the fuzz suite: a type, a role or an ``include`` of 100 kB
    came back whole in the error's message."""
    huge = "x" * 100_000
    for body in (
        {"input": [{"type": huge}]},
        {"input": [{"role": huge, "content": "x"}]},
        {"input": [{"role": "user", "content": [{"type": huge}]}]},
        {"input": [{"role": "system", "content": [{"type": huge}]}]},
        {"input": "x", "tools": [{"type": huge}]},
        {"input": "x", "tool_choice": {"type": huge}},
        {"input": "x", "text": {"format": {"type": huge}}},
        {"input": "x", "include": [huge]},
    ):
        with pytest.raises(InvalidRequestError) as refused:
            as_chat(**body)
        assert len(refused.value.message) < 300, body.keys()
        assert "(100000 characters)" in refused.value.message


def test_chat_parameters_are_named_as_the_responses_request_names_them() -> None:
    """The engine's context check and the media rules name chat messages: a
    Responses client is told ``input`` (found by the fuzz suite's cases)."""
    assert renamed("messages") == "input"
    # Instructions and earlier turns come first: no index of the input matches.
    assert renamed("messages[3].content") == "input"
    assert renamed("max_tokens") == "max_output_tokens"
    assert renamed("response_format.json_schema") == "text.format.json_schema"
    assert renamed("temperature") == "temperature"
    assert renamed(None) is None


def answer(
    content: str | None, calls: list[wire.ToolCall] | None = None, finish: str = "stop"
) -> wire.ChatCompletion:
    message = wire.ResponseMessage(role="assistant", content=content, tool_calls=calls)
    usage = wire.Usage(
        prompt_tokens=12,
        completion_tokens=5,
        total_tokens=17,
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=8),
    )
    choice = wire.ChatChoice(index=0, message=message, finish_reason=finish)
    return wire.ChatCompletion(
        id="x", object="chat.completion", created=1, model="m", choices=[choice], usage=usage
    )


def test_a_chat_answer_is_a_response_the_sdk_reads() -> None:
    request = decoded(
        input="Hi",
        tools=[WEATHER],
        metadata={"k": "v"},
        max_output_tokens=9,
        safety_identifier="s-1",
    )
    call = wire.ToolCall(
        id="call_1", function=wire.FunctionCall(name="get_weather", arguments="{}")
    )
    built = response_of(answer("Hello", [call]), "resp_1", 100, echo_of(request, "m"), 101)
    response = Response.model_validate(plain(built))
    assert (response.id, response.object, response.status, response.model) == (
        "resp_1",
        "response",
        "completed",
        "m",
    )
    assert response.output_text == "Hello"
    assert [item.type for item in response.output] == ["message", "function_call"]
    function_call = response.output[1]
    assert function_call.type == "function_call"
    assert (function_call.call_id, function_call.name) == ("call_1", "get_weather")
    assert response.usage is not None
    assert response.usage.input_tokens == 12 and response.usage.output_tokens == 5
    assert response.usage.total_tokens == 17
    assert response.usage.input_tokens_details.cached_tokens == 8
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.metadata == {"k": "v"} and response.max_output_tokens == 9
    assert response.safety_identifier == "s-1" and response.prompt_cache_key is None
    assert response.tools[0].type == "function" and response.tools[0].name == "get_weather"
    # The next turn continues from the output as input items.
    assert plain(output_as_input(built.output)) == [
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
    ]


def test_an_answer_cut_at_its_budget_is_incomplete() -> None:
    built = response_of(
        answer("Hel", finish="length"), "resp_2", 1, echo_of(decoded(input="x"), "m"), 2
    )
    response = Response.model_validate(plain(built))
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def chunk(
    delta: wire.ChunkDelta | None = None, finish: str | None = None, usage: wire.Usage | None = None
) -> wire.ChatCompletionChunk:
    choices = (
        [] if delta is None else [wire.ChunkChoice(index=0, delta=delta, finish_reason=finish)]
    )
    return wire.ChatCompletionChunk(
        id="c",
        object="chat.completion.chunk",
        created=1,
        model="m",
        choices=choices,
        usage=usage or msgspec.UNSET,
    )


def call_delta(
    index: int, call_id: str | None, name: str | None, arguments: str
) -> wire.ChunkDelta:
    function = wire.FunctionCallDelta(name=name, arguments=arguments)
    return wire.ChunkDelta(
        tool_calls=[wire.ToolCallDelta(index=index, id=call_id, function=function)]
    )


def test_chat_chunks_become_the_event_stream_the_sdk_accumulates() -> None:
    """Text, then two function calls in fragments, then usage: every event
    valid for the SDK's types, numbered in order, framed with its type, and
    the SDK's own stream state reaches the final Response."""
    request = decoded(input="Hi", tools=[WEATHER], stream=True)
    events = ResponseEvents("resp_s", 100, echo_of(request, "m"))
    usage = wire.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11)
    chunks = [
        chunk(wire.ChunkDelta(role="assistant", content="")),
        chunk(wire.ChunkDelta(content="Hel")),
        chunk(wire.ChunkDelta(content="lo")),
        chunk(call_delta(0, "call_a", "get_weather", "")),
        chunk(call_delta(0, None, None, '{"city":')),
        chunk(call_delta(0, None, None, '"Paris"}')),
        chunk(call_delta(1, "call_b", "get_weather", '{"city":"Rome"}')),
        chunk(wire.ChunkDelta(), finish="tool_calls"),
        chunk(usage=usage),
    ]
    sent = events.started()
    for each in chunks:
        sent += events.chunk(each)
    response, closing = events.finished()
    sent += [*closing, events.last(response)]
    wire_events = [framed(event) for event in sent]
    payloads = []
    for frame in wire_events:
        head, data = frame.decode().removesuffix("\n\n").split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert head == f"event: {payload['type']}"
        payloads.append(payload)
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert [p["type"] for p in payloads] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[WEATHER], text_format=omit)
    for payload in payloads:
        state.handle_event(EVENTS.validate_python(payload))
    final = state._completed_response
    assert final is not None and final.id == "resp_s" and final.status == "completed"
    assert final.output_text == "Hello"
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.arguments) for c in calls] == [
        ("call_a", '{"city":"Paris"}'),
        ("call_b", '{"city":"Rome"}'),
    ]
    assert final.usage is not None and final.usage.total_tokens == 11
