"""gateway/lora/ sits below gateway/backends/: backends use adapter managers,
never the other way round; and the OpenAI-compatible backend holds its
engine's adapters through the one RemoteAdapters interface."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

import gateway.lora
from gateway.backends.openai_compat import (
    EngineKind,
    OpenAICompatibleBackend,
    OpenAICompatibleConfig,
)
from gateway.contract import Adapter, AdapterUse, Target
from gateway.errors import InvalidRequestError
from gateway.lora.edge import EdgeAdapters
from gateway.lora.vllm import VllmAdapters

LORA = Path(gateway.lora.__file__).parent


def imported_modules(source: Path) -> set[str]:
    """Every module ``source`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{source.name}: relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_lora_never_imports_backends() -> None:
    offenders = {
        source.name: sorted(m for m in imported_modules(source) if m.startswith("gateway.backends"))
        for source in sorted(LORA.glob("*.py"))
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("def f():\n    from gateway.backends import upstream\n")
    assert "gateway.backends.upstream" in imported_modules(source)


def backend(kind: EngineKind, **options: object) -> OpenAICompatibleBackend:
    config = OpenAICompatibleConfig.model_validate({"base_url": "http://engine.test/v1", **options})
    return OpenAICompatibleBackend("b", kind, config)


@pytest.mark.parametrize(
    ("kind", "options", "manager", "stacks"),
    [
        ("vllm", {"adapter_root": "/adapters"}, VllmAdapters, False),
        ("edge", {"adapter_root": "shared"}, EdgeAdapters, True),
        ("edge", {"push_adapters": True}, EdgeAdapters, True),
    ],
)
def test_engines_holding_adapters_remotely_get_their_manager(
    kind: EngineKind, options: dict[str, object], manager: type, stacks: bool
) -> None:
    engine = backend(kind, **options)
    assert isinstance(engine.adapters, manager)
    assert engine.serves_adapters()
    assert engine.can_stack() is stacks


def test_vllms_slots_are_its_max_adapters_or_its_own_limit() -> None:
    assert backend("vllm", adapter_root="/a", max_adapters=6).adapter_slots() == 6
    assert backend("vllm", adapter_root="/a").adapter_slots() == 4  # vLLM's default, until read


@pytest.mark.parametrize(
    ("kind", "options"),
    [("openai", {"adapter_root": "/adapters"}), ("vllm", {}), ("edge", {})],
)
def test_other_engines_serve_no_adapters(kind: EngineKind, options: dict[str, object]) -> None:
    engine = backend(kind, **options)
    assert engine.adapters is None
    assert not engine.serves_adapters() and not engine.can_stack()
    assert engine.adapters_loaded() == frozenset()
    assert engine.adapter_counters() == {}
    asyncio.run(engine.unload_adapter("anything"))  # no error


def test_an_adapter_sent_to_an_engine_without_adapters_is_a_400(tmp_path: Path) -> None:
    adapter = Adapter("a", "m", "0" * 64, "peft", tmp_path, "a")
    plain, with_adapter = (
        Target("m", "m", "m/0"),
        Target("a", "m", "m/0", (AdapterUse(adapter),)),
    )
    engine = backend("openai")

    async def model_for(target: Target) -> str:
        async with engine._engine_model(target) as model:
            return model

    assert asyncio.run(model_for(plain)) == "m"
    with pytest.raises(InvalidRequestError, match="not configured for adapters"):
        asyncio.run(model_for(with_adapter))
