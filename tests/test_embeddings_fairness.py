"""The embedding queue is fair on the real engine (all-MiniLM-L6-v2 on
llama.cpp, in process): a key that floods it does not make another key's
request wait behind the whole flood, and cannot hold more than its share."""

from __future__ import annotations

import asyncio

import pytest

from gateway.engine.embedding import EmbeddingEngine, EmbeddingModel, KeyFullError
from tests.embedding_model import minilm_gguf

pytestmark = pytest.mark.e2e

FLOOD = 4
# Enough inputs that the flood's requests are still queued when the other
# key's arrives (a few tens of milliseconds each on one thread).
INPUTS = [f"sentence number {i} about the weather in a city" for i in range(24)]


async def flooded(engine: EmbeddingEngine) -> list[str]:
    finished: list[str] = []

    async def request(name: str, owner: str, inputs: list[str]) -> None:
        done = await engine.embed(inputs, owner)
        assert len(done.vectors) == len(inputs)
        finished.append(name)

    flood = [asyncio.create_task(request(f"a{i}", "key-a", INPUTS)) for i in range(FLOOD)]
    await asyncio.sleep(0)
    # key-a holds its share (max_per_key) of the queue: refused, at once.
    with pytest.raises(KeyFullError):
        await engine.embed(["one more"], "key-a")
    await request("b", "key-b", ["a short one"])
    # Behind the running request and key-a's turn that was queued before
    # b, not behind the whole flood.
    assert finished == ["a0", "a1", "b"]
    await asyncio.gather(*flood)
    return finished


def test_a_flooding_key_does_not_make_another_wait_behind_it() -> None:
    model = EmbeddingModel.load(minilm_gguf(), n_ctx=0, threads=1)
    engine = EmbeddingEngine(model, max_waiting=8, max_per_key=FLOOD)
    try:
        finished = asyncio.run(flooded(engine))
    finally:
        engine.close()
    assert finished == ["a0", "a1", "b", "a2", "a3"]
