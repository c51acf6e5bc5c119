"""POST /v1/embeddings through a real `nomoat serve`, with the official SDK.

Two llama.cpp backends: ``embedded`` serves SmolLM2 for chat and
all-MiniLM-L6-v2 (a real embedding model, tests/embedding_model.py) for
embeddings; ``pooled`` serves SmolLM2's own mean-pooled hidden states (what
an engine with no embedding model configured makes). The ledger is SQLite.
"""

from __future__ import annotations

import base64
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp as lc
import numpy as np
import openai
import pytest
from conftest import API_KEY, MODEL, Server, config_with_key, running_server

from tests.embedding_model import minilm_gguf

# The first test also pays for the model: on a machine without ~/.cache/nomoat
# that is the vLLM venv (torch, for llama.cpp's converter; about 2 min) and
# converting MiniLM, past pytest's default 300 s.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

MINILM = "all-minilm-l6-v2"
POOLED = "smollm2-pooled"
# Chat on the backend whose chat model's weights make POOLED's embeddings.
POOLED_CHAT = "smollm2-beside-pooled"
# Pairs that mean the same, each with a sentence about something else.
PAIRS = [
    (
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "Stocks fell sharply today.",
    ),
    (
        "The cat sleeps on the sofa.",
        "A kitten is napping on the couch.",
        "Quantum computers use qubits.",
    ),
    ("How do I bake bread?", "What is a recipe for baking a loaf?", "The train leaves at noon."),
    (
        "It is raining heavily outside.",
        "There is a downpour out there.",
        "He fixed the broken laptop.",
    ),
]


def config(ledger: Path, embedding_gguf: Path) -> str:
    return config_with_key(
        f"""
        [backends.embedded]
        type = "llamacpp"
        threads = 1
        parallel = 2
        smoke_test = false
        embedding_model_path = "{embedding_gguf}"
        embedding_model_name = "{MINILM}"

        [backends.pooled]
        type = "llamacpp"
        threads = 1
        parallel = 1
        smoke_test = false

        [models.{MODEL}]
        deployments = [{{ backend = "embedded" }}]

        [models.{MINILM}]
        deployments = [{{ backend = "embedded", model = "{MINILM}" }}]
        capabilities = ["embeddings"]

        # Declared Matryoshka only to test `dimensions` (truncate, renormalise).
        [models.{POOLED}]
        deployments = [{{ backend = "pooled", model = "{MODEL}" }}]
        capabilities = ["embeddings"]
        matryoshka = true

        [models.{POOLED_CHAT}]
        deployments = [{{ backend = "pooled", model = "{MODEL}" }}]

        [accounting]
        database = "sqlite:///{ledger}"
        """
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("embeddings")
    ledger = root / "ledger.db"
    with running_server(root, config(ledger, minilm_gguf())) as live:
        yield live, ledger


@pytest.fixture(scope="module")
def client(gateway: tuple[Server, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway[0].base_url, api_key=API_KEY, max_retries=0, timeout=120)


def vectors(answer: Any) -> np.ndarray:
    assert [item.index for item in answer.data] == list(range(len(answer.data)))
    return np.array([item.embedding for item in answer.data], dtype=np.float64)


def ledger_rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute("select * from usage order by id")]


def llama_token_count(gguf: Path, text: str) -> int:
    """How many tokens llama.cpp makes of ``text`` with this GGUF's
    vocabulary (special tokens added, as the engine embeds it)."""
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(gguf).encode(), params)
    try:
        vocab = lc.llama_model_get_vocab(model)
        data = text.encode()
        tokens = (lc.llama_token * (len(data) + 8))()
        return int(lc.llama_tokenize(vocab, data, len(data), tokens, len(data) + 8, True, False))
    finally:
        lc.llama_model_free(model)


def test_every_input_form_in_both_encodings(client: openai.OpenAI) -> None:
    forms: list[Any] = [
        "The quick brown fox.",
        ["The quick brown fox.", "jumps over", "the lazy dog"],
        [101, 1996, 4248, 102],
        [[101, 1996, 102], [101, 4248, 2829, 4419, 102]],
    ]
    for given in forms:
        count = 1 if isinstance(given, str) or isinstance(given[0], int) else len(given)
        # The SDK asks for base64 unless told otherwise, and decodes it.
        default = client.embeddings.create(model=MINILM, input=given)
        floats = client.embeddings.create(model=MINILM, input=given, encoding_format="float")
        for answer in (default, floats):
            assert answer.object == "list" and answer.model == MINILM
            found = vectors(answer)
            assert found.shape == (count, 384)
            assert np.allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-4)
            assert answer.usage.total_tokens == answer.usage.prompt_tokens > 0
        assert np.allclose(vectors(default), vectors(floats), atol=1e-6)
    # Token ids are embedded as given: [CLS] the [SEP] is the text "the".
    ids = client.embeddings.create(model=MINILM, input=[101, 1996, 102], encoding_format="float")
    text = client.embeddings.create(model=MINILM, input="the", encoding_format="float")
    assert ids.usage.prompt_tokens == 3
    assert np.allclose(vectors(ids), vectors(text), atol=1e-5)


def test_base64_on_the_wire_is_little_endian_float32(gateway: tuple[Server, Path]) -> None:
    server = gateway[0]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body: dict[str, Any] = {"model": MINILM, "input": ["one", "two"]}
    floats = httpx.post(f"{server.base_url}/embeddings", json=body, headers=headers, timeout=60)
    packed = httpx.post(
        f"{server.base_url}/embeddings",
        json={**body, "encoding_format": "base64"},
        headers=headers,
        timeout=60,
    )
    assert floats.status_code == packed.status_code == 200, packed.text
    assert set(floats.json()) == {"object", "data", "model", "usage"}
    assert set(floats.json()["usage"]) == {"prompt_tokens", "total_tokens"}
    for plain, encoded in zip(floats.json()["data"], packed.json()["data"], strict=True):
        assert set(encoded) == {"object", "index", "embedding"}
        assert isinstance(plain["embedding"], list) and isinstance(encoded["embedding"], str)
        raw = np.frombuffer(base64.b64decode(encoded["embedding"]), dtype="<f4")
        assert np.array_equal(raw, np.array(plain["embedding"], dtype="<f4"))


def cosines(client: openai.OpenAI, model: str) -> tuple[list[float], list[float]]:
    similar, unrelated = [], []
    for first, same, other in PAIRS:
        a, b, c = vectors(client.embeddings.create(model=model, input=[first, same, other]))
        similar.append(float(a @ b))
        unrelated.append(float(a @ c))
    return similar, unrelated


def test_similar_texts_are_closer_than_unrelated_ones(client: openai.OpenAI) -> None:
    similar, unrelated = cosines(client, MINILM)
    # all-MiniLM-L6-v2: paraphrases about 0.6-0.8, unrelated near 0.
    assert min(similar) > 0.5, similar
    assert max(unrelated) < 0.25, unrelated
    assert min(similar) - max(unrelated) > 0.3


def test_pooled_embeddings_are_deterministic_unit_vectors(client: openai.OpenAI) -> None:
    first = vectors(client.embeddings.create(model=POOLED, input=["Hello there.", "Bye now."]))
    again = vectors(client.embeddings.create(model=POOLED, input=["Hello there.", "Bye now."]))
    assert first.shape == (2, 576)
    assert np.array_equal(first, again)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(first[0], first[1])
    # Weak but ordered (docs/embeddings.md has the numbers): each pair's
    # paraphrase is closer than its unrelated sentence.
    similar, unrelated = cosines(client, POOLED)
    assert all(s > u for s, u in zip(similar, unrelated, strict=True)), (similar, unrelated)


def test_dimensions_where_the_model_is_matryoshka_else_400(client: openai.OpenAI) -> None:
    full = vectors(client.embeddings.create(model=POOLED, input="A short sentence."))[0]
    short = client.embeddings.create(model=POOLED, input="A short sentence.", dimensions=64)
    cut = vectors(short)[0]
    assert cut.shape == (64,)
    assert np.allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)
    with pytest.raises(openai.BadRequestError) as too_many:
        client.embeddings.create(model=POOLED, input="x", dimensions=577)
    assert too_many.value.body["param"] == "dimensions"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MINILM, input="x", dimensions=64)
    assert refused.value.body["param"] == "dimensions"  # type: ignore[index]
    assert MINILM in refused.value.message


def test_a_chat_model_cannot_embed_nor_an_embedding_model_chat(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as chat_only:
        client.embeddings.create(model=MODEL, input="hello")
    assert MODEL in chat_only.value.message
    assert chat_only.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as embeds_only:
        client.chat.completions.create(
            model=MINILM, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    assert MINILM in embeds_only.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=POOLED, prompt="hi", max_tokens=3)
    with pytest.raises(openai.BadRequestError) as mixed:
        client.embeddings.create(model=MINILM, input=["text", 1996])  # type: ignore[list-item]
    assert mixed.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MINILM, input=[[]])


def test_models_say_which_chat_and_which_embed(client: openai.OpenAI) -> None:
    listed = {model.id: model for model in client.models.list()}
    assert listed[MODEL].model_extra == {"capabilities": ["chat"]}
    assert listed[MINILM].model_extra == {"capabilities": ["embeddings"]}
    assert listed[POOLED].model_extra == {"capabilities": ["embeddings"]}
    assert listed[POOLED_CHAT].model_extra == {"capabilities": ["chat"]}
    assert client.models.retrieve(MINILM).owned_by == "nomoat"


def test_one_ledger_row_per_request_with_the_engines_token_count(
    gateway: tuple[Server, Path], client: openai.OpenAI
) -> None:
    _, ledger = gateway
    user = "ledger-probe"  # this test's rows (other tests' may still be flushing)
    texts = ["Ledger rows count tokens.", "Each input's tokens, no output."]
    answer = client.embeddings.create(model=MINILM, input=texts, user=user)
    ids = client.embeddings.create(model=POOLED, input=[[1, 2, 3], [4, 5]], user=user)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="not here", user=user)
    expected = sum(llama_token_count(minilm_gguf(), text) for text in texts)
    assert answer.usage.prompt_tokens == expected
    assert ids.usage.prompt_tokens == 5
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = [row for row in ledger_rows(ledger) if row["user"] == user]
        if len(rows) >= 3:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # a fourth row would be a defect: give it time to show
    rows = [row for row in ledger_rows(ledger) if row["user"] == user]
    assert len(rows) == 3, rows
    assert [row["endpoint"] for row in rows] == ["/v1/embeddings"] * 3
    texted, counted, refused = rows
    assert texted["model"] == MINILM and texted["status"] == 200
    assert texted["prompt_tokens"] == expected and texted["completion_tokens"] == 0
    assert (counted["model"], counted["prompt_tokens"], counted["completion_tokens"]) == (
        POOLED,
        5,
        0,
    )
    assert refused["status"] == 400 and refused["prompt_tokens"] == 0


def test_embeddings_neither_block_the_server_nor_starve_chat(client: openai.OpenAI) -> None:
    """A long embedding request runs on its own context and thread: chat on
    the same engine (the same weights) answers while it is still running."""
    long_inputs = [f"Sentence number {i} of a long batch. " * 12 for i in range(24)]
    finished: list[float] = []

    def embed() -> None:
        client.embeddings.create(model=POOLED, input=long_inputs)
        finished.append(time.monotonic())

    worker = threading.Thread(target=embed)
    worker.start()
    try:
        time.sleep(0.5)  # the embedding request is on its way
        reply = client.chat.completions.create(
            model=POOLED_CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        chat_done = time.monotonic()
        assert reply.choices[0].message.content is not None
        assert not finished, "the embedding request ended first: the test proves nothing"
    finally:
        worker.join(timeout=300)
    assert finished and chat_done < finished[0]
