"""The OpenAI API surface, through the official `openai` SDK (sync and async).

Everything runs against the live gateway serving the real SmolLM2-135M model.
Prompts were chosen for what greedy decoding (temperature 0) makes of them, so
each check exercises the feature rather than a lucky sample.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from conftest import MODEL
from openai.types.chat import ChatCompletion, ChatCompletionChunk

# Starts an engine or a server: not part of the fast layer.
pytestmark = pytest.mark.e2e

# Greedy: "1, 2, 3, 4, 5, 6, 7, 8, 9, 10" then the end token (~29 tokens).
COUNT: Any = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
# Greedy output is repetitive: penalties visibly change it.
FRANCE: Any = [{"role": "user", "content": "What is the capital of France?"}]
# Long answer: a small max_tokens is always hit.
POEM: Any = [{"role": "user", "content": "Write a long poem about the sea."}]
PERSON: Any = [{"role": "user", "content": "Describe a person as JSON with name and age."}]
WEATHER: Any = [{"role": "user", "content": "What's the weather in Paris?"}]

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def chat(client: openai.OpenAI, **kwargs: Any) -> ChatCompletion:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", COUNT)
    kwargs.setdefault("max_tokens", 16)
    return client.chat.completions.create(**kwargs)


def text_of(chunks: list[ChatCompletionChunk], index: int = 0) -> str:
    return "".join(
        choice.delta.content or ""
        for chunk in chunks
        for choice in chunk.choices
        if choice.index == index
    )


def check_usage(usage: Any) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens


# ------------------------------------------------------------------ chat basics


def test_chat_completion(client: openai.OpenAI) -> None:
    response = chat(client, temperature=0, max_tokens=40)
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == MODEL
    [choice] = response.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert "1, 2, 3" in choice.message.content
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    check_usage(response.usage)
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 40


@pytest.mark.anyio
async def test_chat_completion_async(async_client: openai.AsyncOpenAI) -> None:
    response = await async_client.chat.completions.create(
        model=MODEL, messages=COUNT, temperature=0, max_tokens=40
    )
    assert response.choices[0].message.content is not None
    assert "1, 2, 3" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
    check_usage(response.usage)


def test_chat_stream_without_usage(client: openai.OpenAI) -> None:
    chunks = list(chat(client, temperature=0, stream=True))
    assert len(chunks) > 2
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    # No include_usage: no usage anywhere, and no choice-less usage chunk.
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert text_of(chunks).startswith("1, 2, 3")


def test_chat_stream_include_usage(client: openai.OpenAI) -> None:
    stream = chat(client, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == []
    check_usage(last.usage)
    assert last.usage is not None and last.usage.completion_tokens == 16
    assert all(chunk.usage is None and chunk.choices for chunk in body)
    assert body[-1].choices[0].finish_reason == "length"


@pytest.mark.anyio
async def test_chat_stream_async_include_usage(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model=MODEL,
        messages=COUNT,
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    check_usage(chunks[-1].usage)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert text_of(chunks) == "1, 2, 3, 4, 5, 6, 7, 8, 9, 10"


@pytest.mark.anyio
async def test_stream_equals_non_stream_async(async_client: openai.AsyncOpenAI) -> None:
    kwargs: Any = {"model": MODEL, "messages": POEM, "temperature": 0, "max_tokens": 24}
    whole = await async_client.chat.completions.create(**kwargs)
    stream = await async_client.chat.completions.create(**kwargs, stream=True)
    streamed = [chunk async for chunk in stream]
    assert text_of(streamed) == whole.choices[0].message.content


# ------------------------------------------------------------- length and stop


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_token_limit(client: openai.OpenAI, param: str) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=POEM, temperature=0, **{param: 7}
    )
    assert response.usage is not None
    assert response.usage.completion_tokens == 7
    assert response.choices[0].finish_reason == "length"


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_token_limit_streamed(client: openai.OpenAI, param: str) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=POEM,
        temperature=0.7,
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        **{param: 5},
    )
    chunks = list(stream)
    tokens = sum(
        len(c.choices[0].logprobs.content or [])
        for c in chunks
        if c.choices and c.choices[0].logprobs
    )
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == tokens <= 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stop_sequence(client: openai.OpenAI) -> None:
    free = chat(client, temperature=0, max_tokens=40).choices[0].message.content
    assert free is not None and ", 5" in free  # the stop would trigger
    stopped = chat(client, temperature=0, max_tokens=40, stop=", 5")
    content = stopped.choices[0].message.content
    assert content is not None and ", 5" not in content
    assert content == free[: free.index(", 5")]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens < 29


def test_stop_sequences_streamed(client: openai.OpenAI) -> None:
    stream = chat(client, temperature=0, max_tokens=40, stop=["7", ", 4"], stream=True)
    chunks = list(stream)
    assert text_of(chunks) == "1, 2, 3"
    assert chunks[-1].choices[0].finish_reason == "stop"


# ----------------------------------------------------------------- sampling


def test_temperature_zero_is_deterministic(client: openai.OpenAI) -> None:
    first = chat(client, messages=POEM, temperature=0, max_tokens=24)
    second = chat(client, messages=POEM, temperature=0, max_tokens=24)
    assert first.choices[0].message.content == second.choices[0].message.content


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    whole = chat(client, messages=POEM, temperature=0, max_tokens=24)
    streamed = list(chat(client, messages=POEM, temperature=0, max_tokens=24, stream=True))
    assert text_of(streamed) == whole.choices[0].message.content


def test_seed_is_reproducible(client: openai.OpenAI) -> None:
    runs = [
        chat(client, messages=POEM, temperature=1, seed=seed, max_tokens=16)
        .choices[0]
        .message.content
        for seed in (1234, 1234, 99)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the seed matters: sampling is not greedy


def test_top_p(client: openai.OpenAI) -> None:
    greedy = chat(client, messages=FRANCE, temperature=0).choices[0].message.content
    # top_p 0 keeps only the most likely token: greedy, whatever the seed.
    for seed in (1, 2):
        nucleus = chat(client, messages=FRANCE, temperature=1, top_p=0.0, seed=seed)
        assert nucleus.choices[0].message.content == greedy
    assert chat(client, messages=FRANCE, temperature=1, top_p=0.9, seed=3).choices


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties(client: openai.OpenAI, penalty: str) -> None:
    plain = chat(client, messages=FRANCE, temperature=0, max_tokens=32)
    penalised = chat(client, messages=FRANCE, temperature=0, max_tokens=32, **{penalty: 2.0})
    plain_text = plain.choices[0].message.content
    assert plain_text is not None and plain_text.count("la femme au roi") >= 2
    # The greedy answer repeats itself; a penalty steers it elsewhere.
    assert penalised.choices[0].message.content != plain_text


def test_user_is_accepted(client: openai.OpenAI) -> None:
    response = chat(client, temperature=0, user="user-1234")
    assert response.choices[0].message.content


def test_n_choices(client: openai.OpenAI) -> None:
    response = chat(client, messages=POEM, n=3, temperature=0.9, seed=42, max_tokens=10)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    contents = [choice.message.content for choice in response.choices]
    assert all(contents)
    assert len(set(contents)) > 1  # each choice samples on its own
    check_usage(response.usage)
    assert response.usage is not None and response.usage.completion_tokens == 30
    again = chat(client, messages=POEM, n=3, temperature=0.9, seed=42, max_tokens=10)
    assert [choice.message.content for choice in again.choices] == contents


def test_n_choices_streamed(client: openai.OpenAI) -> None:
    whole = chat(client, messages=POEM, n=3, temperature=0.9, seed=42, max_tokens=10)
    chunks = list(
        chat(client, messages=POEM, n=3, temperature=0.9, seed=42, max_tokens=10, stream=True)
    )
    assert {choice.index for chunk in chunks for choice in chunk.choices} == {0, 1, 2}
    for choice in whole.choices:
        assert text_of(chunks, choice.index) == choice.message.content


# ----------------------------------------------------------------- logprobs


def test_logprobs(client: openai.OpenAI) -> None:
    response = chat(client, temperature=0, max_tokens=40, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    for entry in entries:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(value <= 0 for value in values)
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert "".join(entry.token for entry in entries) == choice.message.content
    assert choice.finish_reason == "stop"  # the end token is not reported
    assert response.usage is not None and response.usage.completion_tokens == len(entries)


def test_logprobs_off_by_default(client: openai.OpenAI) -> None:
    assert chat(client, temperature=0).choices[0].logprobs is None


@pytest.mark.parametrize("max_tokens", [8, 40])
def test_streamed_logprobs_match_usage(client: openai.OpenAI, max_tokens: int) -> None:
    stream = chat(
        client,
        temperature=0,
        max_tokens=max_tokens,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    entries = [
        entry
        for chunk in chunks
        for choice in chunk.choices
        if choice.logprobs is not None
        for entry in choice.logprobs.content or []
    ]
    assert all(len(entry.top_logprobs) == 2 for entry in entries)
    assert "".join(entry.token for entry in entries) == text_of(chunks)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(entries)
    expected = "length" if max_tokens == 8 else "stop"
    assert chunks[-2].choices[0].finish_reason == expected


# -------------------------------------------------------------- structured output


def test_json_object(client: openai.OpenAI) -> None:
    response = chat(
        client,
        messages=PERSON,
        temperature=0,
        max_tokens=48,
        response_format={"type": "json_object"},
    )
    assert response.choices[0].finish_reason == "stop"
    content = response.choices[0].message.content
    assert content is not None
    assert isinstance(json.loads(content), dict)


def test_json_object_sampled(client: openai.OpenAI) -> None:
    # Sampling at temperature 1 still cannot leave the grammar.
    response = chat(
        client,
        messages=PERSON,
        temperature=1,
        seed=5,
        max_tokens=32,
        response_format={"type": "json_object"},
    )
    content = response.choices[0].message.content
    assert content is not None and content.lstrip().startswith("{")
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "employed": {"type": "boolean"},
        },
        "required": ["name", "age", "employed"],
        "additionalProperties": False,
    }
    response = chat(
        client,
        messages=PERSON,
        temperature=0,
        max_tokens=32,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    assert response.choices[0].finish_reason == "stop"
    content = response.choices[0].message.content
    assert content is not None
    value = json.loads(content)
    assert isinstance(value, dict)
    assert set(value) == {"name", "age", "employed"}
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert isinstance(value["employed"], bool)


# -------------------------------------------------------------------- tools


def check_weather_call(response: ChatCompletion) -> None:
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) >= {"city", "days"}
    assert isinstance(arguments["city"], str)
    assert isinstance(arguments["days"], int)


def test_tool_choice_required(client: openai.OpenAI) -> None:
    response = chat(
        client,
        messages=WEATHER,
        temperature=0,
        max_tokens=32,
        tools=[WEATHER_TOOL],
        tool_choice="required",
    )
    check_weather_call(response)


def test_tool_choice_named(client: openai.OpenAI) -> None:
    response = chat(
        client,
        messages=WEATHER,
        temperature=0,
        max_tokens=32,
        tools=[TIME_TOOL, WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    check_weather_call(response)


@pytest.mark.anyio
async def test_tool_call_streamed_async(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model=MODEL,
        messages=WEATHER,
        temperature=0,
        max_tokens=32,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    deltas = [
        call
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or []
    ]
    assert deltas and deltas[0].function is not None
    assert deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert isinstance(json.loads(arguments)["city"], str)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["auto", None])
def test_tool_choice_auto_refused(client: openai.OpenAI, tool_choice: str | None) -> None:
    extra: dict[str, Any] = {} if tool_choice is None else {"tool_choice": tool_choice}
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, messages=WEATHER, tools=[WEATHER_TOOL], **extra)
    assert caught.value.status_code == 400
    assert MODEL in caught.value.message
    assert caught.value.param == "tool_choice"


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    response = chat(client, temperature=0, tools=[WEATHER_TOOL], tool_choice="none")
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].message.content


# -------------------------------------------------------------- completions


def test_completion(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=6, temperature=0
    )
    assert response.object == "text_completion"
    assert response.model == MODEL
    [choice] = response.choices
    assert choice.text and not choice.text.startswith("The sky is")
    assert choice.finish_reason == "length"
    check_usage(response.usage)
    assert response.usage is not None and response.usage.completion_tokens == 6


def test_completion_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="The sky is",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


@pytest.mark.anyio
async def test_completion_stream_async(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=6, temperature=0, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].text for c in chunks).strip()
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_echo(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    echoed = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "The sky is" + plain.choices[0].text
    streamed = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_completion_list_prompt(client: openai.OpenAI) -> None:
    prompts = ["The sky is", "One, two, three,"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
    assert [choice.index for choice in response.choices] == [0, 1]
    for prompt, choice in zip(prompts, response.choices, strict=True):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        assert choice.text == alone.choices[0].text
    assert response.usage is not None and response.usage.completion_tokens == 8


def test_completion_logprobs(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert len(logprobs.tokens) == 5
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert logprobs.top_logprobs is not None
    assert all(len(top) == 2 for top in logprobs.top_logprobs)


# ------------------------------------------------------------------- models


def test_models_list(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    assert MODEL in [model.id for model in models]
    assert all(model.object == "model" for model in models)


@pytest.mark.anyio
async def test_models_async(async_client: openai.AsyncOpenAI) -> None:
    page = await async_client.models.list()
    assert MODEL in [model.id for model in page.data]
    model = await async_client.models.retrieve(MODEL)
    assert model.id == MODEL


def test_model_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL
    assert model.object == "model"
    assert model.owned_by
    assert isinstance(model.created, int)


def test_model_retrieve_unknown(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
