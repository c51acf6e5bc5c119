"""Embeddings through a gateway to a real `nomoat edge` node that serves an
embedding model (`--embedding-model`, all-MiniLM-L6-v2) beside its chat model."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import API_KEY, MODEL, Server, config_with_key, running_server
from tests.embedding_model import minilm_gguf
from tests.test_edge_routing import edge_node

pytestmark = pytest.mark.e2e

ON_NODE = "all-minilm-l6-v2"
THROUGH = "minilm-on-edge"


@pytest.fixture(scope="module")
def node_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("edge-embeddings")
    args = ("--embedding-model", str(minilm_gguf()), "--embedding-name", ON_NODE)
    with edge_node(tmp, "edge", *args) as (port, _):
        yield port


@pytest.fixture(scope="module")
def gateway(node_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    extra = f"""
        [backends.node]
        type = "edge"
        base_url = "http://127.0.0.1:{node_port}/v1"
        models = ["{MODEL}", "{ON_NODE}"]
        embedding_models = ["{ON_NODE}"]

        [models.{MODEL}]
        deployments = [{{ backend = "node" }}]

        [models.{THROUGH}]
        deployments = [{{ backend = "node", model = "{ON_NODE}" }}]
        capabilities = ["embeddings"]
        """
    with running_server(tmp_path_factory.mktemp("gateway"), config_with_key(extra)) as live:
        yield live


def test_the_node_says_what_it_serves(node_port: int) -> None:
    listed = httpx.get(f"http://127.0.0.1:{node_port}/v1/models", timeout=30).json()["data"]
    assert {m["id"]: m["capabilities"] for m in listed} == {
        MODEL: ["chat"],
        ON_NODE: ["embeddings"],
    }


def test_embeddings_are_forwarded_to_the_edge_node(gateway: Server, node_port: int) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "Stocks fell."]
    through = client.embeddings.create(model=THROUGH, input=texts)
    direct = openai.OpenAI(
        base_url=f"http://127.0.0.1:{node_port}/v1", api_key="none", max_retries=0, timeout=120
    ).embeddings.create(model=ON_NODE, input=texts, encoding_format="float")
    assert through.model == THROUGH
    assert through.usage.prompt_tokens == direct.usage.prompt_tokens > len(texts)
    mine = np.array([item.embedding for item in through.data])
    theirs = np.array([item.embedding for item in direct.data])
    assert mine.shape == (3, 384)
    assert np.allclose(mine, theirs, atol=1e-6)
    assert mine[0] @ mine[1] > 0.5 > mine[0] @ mine[2]
    # The node's chat model chats; through the gateway it cannot embed.
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="hello")
