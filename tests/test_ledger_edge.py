"""Streams the client cuts, through a real gateway in front of a real
`nomoat edge` node: the ledger records the tokens the node's engine really
evaluated and generated (the node keeps them for the gateway, which fetches
them after the cut: gateway/edge_usage.py), not what the gateway relayed.

The node's engine runs ahead of a slow reader (its stream buffer) and
evaluates a fresh prompt in full, so neither the chunks relayed nor a prompt
of 0 (the estimate) can match its counters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from cut_streams import cut_chat_and_text, evaluated, leave_a_json_request, rows_once_written

from tests.conftest import MODEL, Server, config_with_key, running_server
from tests.test_edge_routing import edge_node

pytestmark = pytest.mark.e2e


def decoded(port: int) -> int:
    """The edge node's engine's evaluated tokens, once nothing runs there."""
    url = f"http://127.0.0.1:{port}/metrics"

    def counter(name: str) -> int:
        for line in httpx.get(url, timeout=30).text.splitlines():
            if line.startswith(f'{name}{{backend="engine"}} '):
                return int(float(line.split()[-1]))
        raise AssertionError(f"{name} is not on the node's /metrics")

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = counter("nomoat_engine_requests_running")
        if running + counter("nomoat_engine_requests_waiting") == 0:
            first = counter("nomoat_engine_decoded_tokens_total")
            time.sleep(0.3)
            if counter("nomoat_engine_decoded_tokens_total") == first:
                return first
        time.sleep(0.05)
    raise AssertionError("the node's engine stayed busy")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Server, Path, int]]:
    path = tmp_path / "ledger.db"
    with edge_node(tmp_path, "node") as (port, _):
        extra = f"""
            [backends.node]
            type = "edge"
            base_url = "http://127.0.0.1:{port}/v1"
            probe_interval = 0.5

            [models.{MODEL}]
            deployments = [{{ backend = "node", model = "{MODEL}" }}]

            [accounting]
            database = "sqlite:///{path}"
            """
        with running_server(tmp_path, config_with_key(extra)) as live:
            yield live, path, port


def test_cut_streams_through_an_edge_node_record_its_engines_tokens(
    gateway: tuple[Server, Path, int],
) -> None:
    server, path, port = gateway
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    # Warm the node's counters up (llama.cpp reports each as at least 1).
    client.completions.create(model=MODEL, prompt=[1000, 1001, 1002], max_tokens=3)
    spent = cut_chat_and_text(client, lambda: decoded(port), chunks=(3, 2), run_ahead=1.0)
    rows = rows_once_written(path, 3)[1:]
    assert [row["status"] for row in rows] == [499, 499]
    for row, engine in zip(rows, spent, strict=True):
        assert evaluated(row) == engine, (row, engine)
        # The node ran well ahead of the chunks the client read.
        assert row["completion_tokens"] > 10 and row["prompt_tokens"] > 10, row


def test_a_json_request_the_client_leaves_records_the_nodes_tokens(
    gateway: tuple[Server, Path, int],
) -> None:
    server, path, port = gateway
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    client.completions.create(model=MODEL, prompt=[1000, 1001, 1002], max_tokens=3)
    before = decoded(port)
    # Long enough for the prompt and some tokens on a loaded machine.
    impatient = client.with_options(timeout=3.0)
    leave_a_json_request(impatient)
    # The row first: it is written once the node reported the request's
    # final usage, so its engine has stopped counting for it by then.
    [row] = rows_once_written(path, 2)[1:]
    engine = decoded(port) - before
    assert row["status"] == 499
    assert evaluated(row) == engine, (row, engine)
    assert row["prompt_tokens"] > 20 and row["completion_tokens"] > 10
