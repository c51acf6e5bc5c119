"""Streams the client cuts, against the real embedded engine through a real
`nomoat serve` and the official `openai` SDK: the ledger records the tokens
the engine really evaluated and generated, not what the gateway relayed.

With the default stream buffer (256 tokens) the engine runs far ahead of a
client that reads slowly, and a fresh prompt is evaluated in full: neither
the chunks the client saw nor a prompt of 0 can match llama.cpp's counters.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from conftest import API_KEY, MODEL, running_server
from cut_streams import cut_chat_and_text, evaluated, leave_a_json_request, rows_once_written
from test_ledger_live import sdk, settled_decoded, warm_up

from gateway.accounting.prices import TokenPrices
from gateway.auth import hash_api_key

pytestmark = pytest.mark.e2e

INPUT_USD, OUTPUT_USD = 3.0, 15.0


def config(database: Path) -> str:
    # The engine's defaults (stream buffer, prompt cache) as shipped.
    return f"""
[server]
api_key_hashes = ["{hash_api_key(API_KEY)}"]

[backends.embedded]
type = "llamacpp"
threads = 1
parallel = 2
smoke_test = false

[[models.{MODEL}.deployments]]
backend = "embedded"
input_usd_per_million = {INPUT_USD}
output_usd_per_million = {OUTPUT_USD}

[accounting]
database = "sqlite:///{database}"
"""


def test_cut_streams_record_the_engines_exact_tokens(tmp_path: Path) -> None:
    database = tmp_path / "ledger.db"
    with running_server(tmp_path, config(database)) as server:
        client: openai.OpenAI = sdk(server)
        warm_up(server)
        decoded = cut_chat_and_text(
            client, lambda: settled_decoded(server), chunks=(2, 2), run_ahead=1.5
        )
        rows = rows_once_written(database, 3)[1:]
    prices = TokenPrices.of_usd(INPUT_USD, OUTPUT_USD)
    assert [row["status"] for row in rows] == [499, 499]
    for row, engine in zip(rows, decoded, strict=True):
        assert evaluated(row) == engine, (
            {
                k: row[k]
                for k in ("prompt_tokens", "cached_tokens", "completion_tokens", "finish_reason")
            },
            engine,
        )
        # The engine ran well ahead of the two chunks the client read.
        assert row["completion_tokens"] > 10, row
        assert row["cost_nano"] == prices.charge_nano(
            row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]
        )
    # A fresh prompt: nothing of it was in the cache, all of it was evaluated.
    assert rows[0]["cached_tokens"] == 0 and rows[0]["prompt_tokens"] > 20


def test_a_json_request_the_client_leaves_records_the_engines_exact_tokens(
    tmp_path: Path,
) -> None:
    database = tmp_path / "ledger.db"
    with running_server(tmp_path, config(database)) as server:
        warm_up(server)
        before = settled_decoded(server)
        impatient = openai.OpenAI(
            base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=1.5
        )
        leave_a_json_request(impatient)
        decoded = settled_decoded(server) - before
        [row] = rows_once_written(database, 2)[1:]
    assert row["status"] == 499
    assert evaluated(row) == decoded, row
    assert row["prompt_tokens"] > 20 and row["completion_tokens"] > 10
