"""VllmAdapters without vLLM (a stub stands in for vLLM's load, unload and
models endpoints, tests/lora_stubs.py): one load for concurrent requests,
least-recently-used eviction, what the gateway believes while an unload is
in flight, reconciling with what vLLM lists, and the sha256 check before
every load. tests/test_lora_vllm.py runs the same against a real vLLM."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway.contract import Adapter, AdapterUse, Target
from gateway.errors import InternalError, InvalidRequestError
from gateway.lora.remote import RemoteAdapters
from gateway.lora.vllm import IDENTITY, VllmAdapters
from tests.lora_stubs import StubVllm, change, peft_adapter, settle

MAX_LORAS_METRIC = 'vllm:lora_requests_info{max_lora="7",running_lora_adapters=""} 1.0\n'


def target(*uses: Adapter | tuple[Adapter, float]) -> Target:
    adapters = tuple(
        AdapterUse(*use) if isinstance(use, tuple) else AdapterUse(use) for use in uses
    )
    return Target("client-name", "m", "m/0", adapters)


async def ask(adapters: RemoteAdapters, *uses: Adapter | tuple[Adapter, float]) -> str:
    """What one request sends as ``model``, its adapters held only meanwhile."""
    async with adapters.engine_model(target(*uses)) as model:
        return model


def test_concurrent_requests_for_one_adapter_cause_one_load(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        vllm = StubVllm()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=2)
        sql = peft_adapter(tmp_path, "sql")
        vllm.loads.close()
        requests = [asyncio.create_task(ask(adapters, sql)) for _ in range(8)]
        await settle()
        assert not any(request.done() for request in requests)
        vllm.loads.open()
        models = await asyncio.gather(*requests)
        assert vllm.loaded("sql") == 1
        assert vllm.held == {"sql": "/adapters/peft/sql"}
        assert adapters.counters["sql"].loads == 1
        return models

    assert asyncio.run(scenario()) == ["sql"] * 8


def test_the_least_recently_used_adapter_is_unloaded_past_the_limit(tmp_path: Path) -> None:
    async def scenario() -> None:
        vllm = StubVllm()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=2)
        a, b, c = (peft_adapter(tmp_path, name) for name in "abc")
        for adapter in (a, b, a, c):  # b is now the least recently used
            await ask(adapters, adapter)
        assert set(vllm.held) == {"a", "c"} == adapters.names()
        assert (vllm.unloaded("b"), vllm.unloaded("a")) == (1, 0)
        assert adapters.counters["b"].evictions == 1
        await ask(adapters, b)  # loaded again, in place of a
        assert set(vllm.held) == {"c", "b"}
        assert vllm.loaded("b") == 2

    asyncio.run(scenario())


def test_an_adapter_in_use_is_never_unloaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        vllm = StubVllm()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=1)
        a, b = peft_adapter(tmp_path, "a"), peft_adapter(tmp_path, "b")
        async with adapters.engine_model(target(a)):
            assert await ask(adapters, b) == "b"  # one more than the limit
            assert "a" in vllm.held
        assert vllm.unloaded("a") == 0
        await ask(adapters, a)  # a is held: no load, and b is not evicted for it
        assert vllm.loaded("a") == 1

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert "all 1 adapters are in use; loading one more" in caplog.text


def test_an_adapter_being_unloaded_is_loaded_again_before_use(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[str, str]]:
        vllm = StubVllm()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=1)
        a, b = peft_adapter(tmp_path, "a"), peft_adapter(tmp_path, "b")
        await ask(adapters, a)
        vllm.unloads.close()
        loading_b = asyncio.create_task(ask(adapters, b))  # evicts a
        await asyncio.wait_for(vllm.called("/unload_lora_adapter", "a"), 5)
        assert vllm.calls[-1] == ("/unload_lora_adapter", "a")
        assert "a" not in adapters.names()  # so no policy counts on it
        wanting_a = asyncio.create_task(ask(adapters, a))
        await settle()
        assert not wanting_a.done()  # it waits to load a again, not sent on as loaded
        vllm.unloads.open()
        await asyncio.gather(loading_b, wanting_a)
        assert "a" in adapters.names()
        return vllm.calls

    calls = asyncio.run(scenario())
    assert calls[:3] == [
        ("/load_lora_adapter", "a"),
        ("/unload_lora_adapter", "a"),
        ("/load_lora_adapter", "b"),
    ]
    assert calls[-1] == ("/load_lora_adapter", "a")


def test_an_adapter_being_loaded_counts_as_held_for_routing(tmp_path: Path) -> None:
    """Routing sends more requests for it here, to wait for the same load,
    instead of loading it on another replica too."""

    async def scenario() -> None:
        vllm = StubVllm()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=2)
        a = peft_adapter(tmp_path, "a")
        vllm.loads.close()
        first = asyncio.create_task(ask(adapters, a))
        await settle()
        assert adapters.names() == {"a"}
        second = asyncio.create_task(ask(adapters, a))
        await settle()
        vllm.loads.open()
        await asyncio.gather(first, second)
        assert vllm.loaded("a") == 1
        assert adapters.names() == {"a"}

    asyncio.run(scenario())


def test_adapters_vllm_forgot_are_loaded_again_when_next_wanted(tmp_path: Path) -> None:
    """As after a vLLM restart: each probe believes what vLLM lists."""

    async def scenario() -> None:
        vllm = StubVllm()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=2)
        a = peft_adapter(tmp_path, "a")
        await ask(adapters, a)
        vllm.restart()
        await adapters.observe("")
        assert adapters.names() == frozenset()
        await ask(adapters, a)
        assert vllm.loaded("a") == 2
        assert vllm.held == {"a": "/adapters/peft/a"}

    asyncio.run(scenario())


def test_adapters_vllm_holds_unasked_are_believed_and_reloaded_before_use(
    tmp_path: Path,
) -> None:
    """Loaded by someone else (or before a gateway restart): held, so routing
    counts them, but of unknown content, so the first request loads its own."""

    async def scenario() -> None:
        vllm = StubVllm()
        vllm.held["a"] = "/elsewhere/a"
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=2)
        await adapters.observe("")
        assert adapters.names() == {"a"}
        await ask(adapters, peft_adapter(tmp_path, "a"))
        assert (vllm.unloaded("a"), vllm.loaded("a")) == (1, 1)
        assert vllm.held == {"a": "/adapters/peft/a"}

    asyncio.run(scenario())


def test_the_limit_is_vllms_own_unless_configured() -> None:
    async def scenario() -> tuple[int | None, int | None]:
        following = VllmAdapters("gpu", StubVllm(), "/adapters", limit=None)
        fixed = VllmAdapters("gpu", StubVllm(), "/adapters", limit=3)
        for adapters in (following, fixed):
            await adapters.observe(MAX_LORAS_METRIC)
        return following.slots, fixed.slots

    assert asyncio.run(scenario()) == (7, 3)


def test_changed_files_are_refused_before_every_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hashed again before each load, not before each request: a held adapter
    was checked when it was loaded; once evicted, its next load is refused."""

    async def scenario() -> StubVllm:
        vllm = StubVllm()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=1)
        a, b = peft_adapter(tmp_path, "a"), peft_adapter(tmp_path, "b")
        await ask(adapters, a)
        change(a)
        assert await ask(adapters, a) == "a"  # held: no load
        await ask(adapters, b)  # evicts a
        with pytest.raises(InternalError) as refused:
            await ask(adapters, a)
        error = refused.value
        assert (error.status_code, error.code) == (500, "adapter_files_changed")
        assert error.message.startswith("adapter `a` cannot be loaded")
        assert "a" not in adapters.names()
        return vllm

    with caplog.at_level(logging.ERROR, logger="gateway.lora.integrity"):
        vllm = asyncio.run(scenario())
    assert vllm.loaded("a") == 1
    assert "gpu: refused to load adapter a" in caplog.text


def test_changed_files_refuse_every_waiting_request_and_nothing_is_loaded(
    tmp_path: Path,
) -> None:
    async def scenario() -> list[BaseException | str]:
        vllm = StubVllm()
        adapters = VllmAdapters("gpu", vllm, "/adapters", limit=2)
        a = peft_adapter(tmp_path, "a")
        change(a)
        results = await asyncio.gather(
            *(ask(adapters, a) for _ in range(3)), return_exceptions=True
        )
        assert vllm.calls == []
        return results

    assert all(isinstance(result, InternalError) for result in asyncio.run(scenario()))


def test_base_requests_go_as_the_identity_adapter_which_is_never_evicted(
    tmp_path: Path,
) -> None:
    """Its path is the vLLM host's: the gateway neither has nor hashes it."""

    async def scenario() -> None:
        vllm = StubVllm()
        adapters = VllmAdapters("gpu", vllm, "/adapters", 1, "/vllm-host/zero")
        assert not adapters.base_is_plain
        assert await ask(adapters) == IDENTITY
        for name in "ab":
            await ask(adapters, peft_adapter(tmp_path, name))
        assert await ask(adapters) == IDENTITY
        assert vllm.loaded(IDENTITY) == 1
        assert vllm.held[IDENTITY] == "/vllm-host/zero"
        assert set(vllm.held) == {IDENTITY, "b"}

    asyncio.run(scenario())


def test_base_requests_go_as_the_base_model_without_an_identity() -> None:
    adapters = VllmAdapters("gpu", StubVllm(), "/adapters", limit=1)
    assert adapters.base_is_plain
    assert asyncio.run(ask(adapters)) == "m"


def test_a_stack_a_scale_or_a_gguf_adapter_is_a_400(tmp_path: Path) -> None:
    adapters = VllmAdapters("gpu", StubVllm(), "/adapters", limit=2)
    a, b = peft_adapter(tmp_path, "a"), peft_adapter(tmp_path, "b")
    gguf = Adapter("g", "m", "0" * 64, "gguf", tmp_path / "g.gguf", "g.gguf")
    for uses, message in (
        ((a, b), "one adapter per request, at scale 1"),
        (((a, 0.5),), "one adapter per request, at scale 1"),
        ((gguf,), "loads PEFT adapters"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            asyncio.run(ask(adapters, *uses))
