"""VllmAdapters without vLLM: what the gateway believes while an unload is
in flight (a stub stands in for vLLM's load/unload endpoints)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

from gateway.contract import Adapter
from gateway.lora.vllm import VllmAdapters


class SlowUnloads:
    """Answers loads at once; holds every unload until ``release`` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.release = asyncio.Event()

    async def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        self.calls.append((path, json.loads(body)["lora_name"]))
        if path == "/unload_lora_adapter":
            await self.release.wait()
        return b"Success"


def adapter(name: str) -> Adapter:
    return Adapter(name, "m", "0" * 64, "peft", Path(name), f"peft/{name}")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_an_adapter_being_unloaded_is_loaded_again_before_use() -> None:
    async def scenario() -> list[tuple[str, str]]:
        vllm = SlowUnloads()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=1)  # type: ignore[arg-type]
        await adapters.acquire(adapter("a"))
        adapters.release("a")
        loading_b = asyncio.create_task(adapters.acquire(adapter("b")))  # evicts a
        await settle()
        assert vllm.calls[-1] == ("/unload_lora_adapter", "a")
        assert "a" not in adapters.names()  # so no policy counts on it
        wanting_a = asyncio.create_task(adapters.acquire(adapter("a")))
        await settle()
        assert not wanting_a.done()  # it waits to load a again, not sent on as loaded
        vllm.release.set()
        await loading_b
        adapters.release("b")
        await wanting_a
        assert "a" in adapters.names()
        return vllm.calls

    calls = asyncio.run(scenario())
    assert calls[:3] == [
        ("/load_lora_adapter", "a"),
        ("/unload_lora_adapter", "a"),
        ("/load_lora_adapter", "b"),
    ]
    assert calls[-1] == ("/load_lora_adapter", "a")


class SlowLoads:
    """Holds every load until ``release`` is set."""

    def __init__(self) -> None:
        self.loads = 0
        self.release = asyncio.Event()

    async def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        if path == "/load_lora_adapter":
            self.loads += 1
            await self.release.wait()
        return b"Success"


def test_an_adapter_being_loaded_counts_as_held_for_routing() -> None:
    """Routing sends more requests for it here, to wait for the same load,
    instead of loading it on another replica too."""

    async def scenario() -> None:
        vllm = SlowLoads()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=2)  # type: ignore[arg-type]
        first = asyncio.create_task(adapters.acquire(adapter("a")))
        await settle()
        assert adapters.names() == {"a"}
        second = asyncio.create_task(adapters.acquire(adapter("a")))
        await settle()
        vllm.release.set()
        await asyncio.gather(first, second)
        assert vllm.loads == 1
        assert adapters.names() == {"a"}

    asyncio.run(scenario())
