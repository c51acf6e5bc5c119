"""EdgeAdapters without an edge node (a stub stands in for its admin API,
tests/lora_stubs.py): one registration for concurrent requests, stacks,
registering again what a restarted node forgot, what the node reports, and
the sha256 check before every registration or upload.
tests/test_lora_edge.py runs the same against real edge nodes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.contract import Adapter, AdapterUse, Target
from gateway.errors import InternalError
from gateway.lora.edge import EdgeAdapters
from gateway.lora.remote import RemoteAdapters
from tests.lora_stubs import StubEdge, change, peft_adapter, settle

METRICS = """\
# TYPE nomoat_adapter_loaded gauge
nomoat_adapter_loaded{backend="local",adapter="a"} 1
nomoat_adapter_loaded{backend="local",adapter="b"} 0
nomoat_adapter_loads_total{backend="local",adapter="a"} 3.0
nomoat_adapter_evictions_total{backend="local",adapter="a"} 2.0
nomoat_adapter_load_seconds_total{backend="local",adapter="a"} 0.25
"""


def edge_adapters(node: StubEdge, *, push: bool = False) -> EdgeAdapters:
    return EdgeAdapters("edge", node, "sk-admin", push=push)


async def ask(adapters: RemoteAdapters, *uses: AdapterUse) -> str:
    async with adapters.engine_model(Target("client-name", "m", "m/0", uses)) as model:
        return model


def use(adapter: Adapter, scale: float = 1.0) -> AdapterUse:
    return AdapterUse(adapter, scale)


@pytest.mark.parametrize("push", [False, True])
def test_concurrent_requests_cause_one_registration(tmp_path: Path, push: bool) -> None:
    async def scenario() -> list[str]:
        node = StubEdge(tmp_path)
        adapters = edge_adapters(node, push=push)
        a = peft_adapter(tmp_path, "a")
        node.registrations.close()
        requests = [asyncio.create_task(ask(adapters, use(a))) for _ in range(5)]
        await settle()
        node.registrations.open()
        models = await asyncio.gather(*requests)
        assert node.registrations_of("a") == 1
        assert node.registered == {"a": a.sha256}
        assert node.headers[0] is not None
        assert node.headers[0]["Authorization"] == "Bearer sk-admin"
        return models

    assert asyncio.run(scenario()) == ["m:a@1"] * 5


def test_stacks_and_scales_are_sent_as_the_node_reads_them(tmp_path: Path) -> None:
    adapters = edge_adapters(StubEdge(tmp_path))
    assert adapters.can_stack and adapters.base_is_plain and adapters.slots is None
    a, b = peft_adapter(tmp_path, "a"), peft_adapter(tmp_path, "b")
    assert asyncio.run(ask(adapters, use(a, 0.7), use(b, 0.3))) == "m:a@0.7+b@0.3"
    assert asyncio.run(ask(adapters)) == "m"


def test_the_pushed_body_is_exactly_what_the_sha256_covers(tmp_path: Path) -> None:
    node = StubEdge(tmp_path / "node")
    a = peft_adapter(tmp_path, "a")
    asyncio.run(ask(edge_adapters(node, push=True), use(a)))
    config = (a.path / "adapter_config.json").read_bytes()
    weights = (a.path / "adapter_model.safetensors").read_bytes()
    assert node.bodies["a"] == config + weights


def test_what_a_restarted_node_forgot_is_registered_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        node = StubEdge(tmp_path)
        adapters = edge_adapters(node)
        a = peft_adapter(tmp_path, "a")
        await ask(adapters, use(a))
        await adapters.observe("")
        await ask(adapters, use(a))
        assert node.registrations_of("a") == 1  # still registered there
        node.registered.clear()  # the node restarted
        await adapters.observe("")
        await ask(adapters, use(a))
        assert node.registrations_of("a") == 2

    asyncio.run(scenario())


def test_what_the_node_holds_and_did_is_read_from_its_metrics(tmp_path: Path) -> None:
    adapters = edge_adapters(StubEdge(tmp_path))
    asyncio.run(adapters.observe(METRICS))
    assert adapters.names() == {"a"}
    counters = adapters.counters["a"]
    assert (counters.loads, counters.evictions, counters.load_seconds) == (3, 2, 0.25)


def test_what_a_node_loaded_is_read_as_prometheus_client_writes_it(tmp_path: Path) -> None:
    """Nodes expose /metrics through prometheus-client, every value a float."""
    adapters = edge_adapters(StubEdge(tmp_path))
    text = METRICS.replace("} 1\n", "} 1.0\n").replace("} 0\n", "} 0.0\n")
    assert "} 1.0\n" in text
    asyncio.run(adapters.observe(text))
    assert adapters.names() == {"a"}


def test_a_removed_adapter_is_removed_from_the_node(tmp_path: Path) -> None:
    async def scenario() -> StubEdge:
        node = StubEdge(tmp_path)
        adapters = edge_adapters(node)
        await ask(adapters, use(peft_adapter(tmp_path, "a")))
        await adapters.forget("a")
        await adapters.forget("never-registered")
        return node

    node = asyncio.run(scenario())
    assert node.registered == {}
    assert node.calls[-1] == ("DELETE", "a")


@pytest.mark.parametrize("push", [False, True])
def test_changed_files_are_refused_before_registering_or_pushing(
    tmp_path: Path, push: bool
) -> None:
    node = StubEdge(tmp_path)
    adapters = edge_adapters(node, push=push)
    a = peft_adapter(tmp_path, "a")
    change(a)
    with pytest.raises(InternalError) as refused:
        asyncio.run(ask(adapters, use(a)))
    assert (refused.value.status_code, refused.value.code) == (500, "adapter_files_changed")
    assert "`a`" in refused.value.message
    assert node.calls == []  # nothing was sent to the node


def test_unreadable_files_are_refused_before_pushing(tmp_path: Path) -> None:
    node = StubEdge(tmp_path)
    a = peft_adapter(tmp_path, "a")
    (a.path / "adapter_model.safetensors").unlink()
    with pytest.raises(InternalError, match="`a` cannot be loaded"):
        asyncio.run(ask(edge_adapters(node, push=True), use(a)))
    assert node.calls == []
