"""The public plugin contract: its names, and the built-in plugins found
through the same entry-point group third-party plugins use. No model loads."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import gateway.contract as contract
from gateway.backends.llamacpp import LlamaCppBackend, LlamaCppConfig, create_backend
from gateway.contract import (
    Backend,
    BackendHealth,
    BackendType,
    Candidate,
    ModelCapabilities,
    PluginManifest,
    PolicyType,
    ReportsLoad,
    RequestContext,
    RoutingPolicy,
    Target,
)
from gateway.policies import OrderedPolicy
from gateway.registry import GROUP, PluginLoadError, _load, build_registry, discover

# The public contract. Changing it is a decision: update this list on purpose.
EXPECTED_ALL = [
    "Adapter",
    "AdapterCounters",
    "AdapterUse",
    "AnyChunk",
    "AnyRequest",
    "AnyResponse",
    "AssistantMessage",
    "AttemptTrace",
    "AttributeValue",
    "AuthenticationError",
    "Backend",
    "BackendHealth",
    "BackendType",
    "Budget",
    "BusyClock",
    "Candidate",
    "CandidateStats",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "Completion",
    "CompletionRequest",
    "ComputeMeter",
    "ContextLengthExceededError",
    "DeveloperMessage",
    "EmbeddingList",
    "EmbeddingRequest",
    "EngineLoad",
    "EngineOverloadedError",
    "ErrorHook",
    "GatewayError",
    "HookType",
    "InternalError",
    "InvalidRequestError",
    "Message",
    "ModelCapabilities",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PluginManifest",
    "PolicyType",
    "Principal",
    "RankedCandidate",
    "RateLimitError",
    "RateLimits",
    "ReportsAdapterSlots",
    "ReportsLoad",
    "RequestContext",
    "RequestHook",
    "ResponseHook",
    "RoutingPolicy",
    "StreamHook",
    "SupportsEmbeddings",
    "SupportsLoRA",
    "SystemMessage",
    "Target",
    "Team",
    "TextPart",
    "ToolMessage",
    "UnsupportedFeatureError",
    "UpstreamError",
    "Usage",
    "UsageReport",
    "UserMessage",
    "message_role",
]


def test_contract_all_is_exactly_the_expected_sorted_list() -> None:
    assert contract.__all__ == sorted(contract.__all__), "__all__ must stay sorted"
    assert contract.__all__ == EXPECTED_ALL
    assert len(set(contract.__all__)) == len(contract.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_exists(name: str) -> None:
    assert getattr(contract, name, None) is not None


ROOT = Path(__file__).resolve().parent.parent


def test_every_public_name_is_used_by_the_core_or_a_plugin() -> None:
    """No dead exports: each name is used somewhere in gateway/ besides the
    contract itself, or by a first-party plugin (definitions do not count)."""
    sources = [p for p in (ROOT / "gateway").rglob("*.py") if p.name != "contract.py"]
    sources += (ROOT / "plugins").glob("*/nomoat_*/**/*.py")
    text = "\n".join(re.sub(r"(?m)^class \w+", "", p.read_text()) for p in sources)
    unused = [name for name in EXPECTED_ALL if not re.search(rf"\b{name}\b", text)]
    assert unused == []


def test_star_import_gives_exactly_the_contract() -> None:
    namespace: dict[str, Any] = {}
    exec("from gateway.contract import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == EXPECTED_ALL


# ------------------------------------------------------------- discovery


def test_builtins_are_registered_as_entry_points() -> None:
    found = {entry.name: entry.value for entry in entry_points(group=GROUP)}
    assert GROUP == "nomoat.plugins"
    assert found["llamacpp"] == "gateway.backends.llamacpp:manifest"
    assert found["builtin-policies"] == "gateway.policies:manifest"
    assert found["openai-compatible"] == "gateway.backends.openai_compat:manifest"


def test_discover_finds_the_llamacpp_backend_and_the_ordered_policy() -> None:
    registry = discover()
    assert {"llamacpp", "builtin-policies"} <= {plugin.name for plugin in registry.plugins}
    backend_type = registry.backends["llamacpp"]
    assert isinstance(backend_type, BackendType)
    assert backend_type.config_model is LlamaCppConfig
    assert backend_type.factory is create_backend
    policy_type = registry.policies["ordered"]
    assert isinstance(policy_type, PolicyType)
    assert isinstance(policy_type.factory(policy_type.config_model()), OrderedPolicy)
    assert {
        "ordered",
        "weighted-round-robin",
        "least-outstanding",
        "lowest-latency",
        "shortest-queue",
        "lowest-cost",
        "session-affinity",
    } <= set(registry.policies)


def test_discover_skips_disabled_plugins() -> None:
    registry = discover(disabled=["llamacpp"])
    assert "llamacpp" not in registry.backends
    assert "ordered" in registry.policies
    assert "llamacpp" not in {plugin.name for plugin in registry.plugins}


def test_a_plugin_that_fails_to_import_is_reported_by_name() -> None:
    entry = EntryPoint("broken", "gateway.no_such_module:manifest", GROUP)
    with pytest.raises(PluginLoadError, match=r'plugin "broken" \(gateway\.no_such_module'):
        _load(entry)


def test_an_entry_point_that_is_not_a_manifest_is_rejected() -> None:
    entry = EntryPoint("odd", "gateway.registry:GROUP", GROUP)
    with pytest.raises(PluginLoadError, match="is not a PluginManifest"):
        _load(entry)


def test_two_plugins_offering_the_same_backend_type_conflict() -> None:
    registry = discover()
    twin = PluginManifest("twin", backends={"llamacpp": registry.backends["llamacpp"]})
    with pytest.raises(PluginLoadError, match='"llamacpp"'):
        build_registry([*registry.plugins, twin])


def test_config_models_forbid_unknown_keys() -> None:
    registry = discover()
    components = [
        *registry.backends.values(),
        *registry.policies.values(),
        *registry.hooks.values(),
    ]
    assert LlamaCppConfig in {component.config_model for component in components}
    for component in components:
        assert component.config_model.model_config.get("extra") == "forbid", component


# ------------------------------------------------------ protocol conformance


def _unloaded_backend() -> LlamaCppBackend:
    """A LlamaCppBackend object without running __init__ (no model load)."""
    backend = LlamaCppBackend.__new__(LlamaCppBackend)
    backend.name = "embedded"
    return backend


_COROUTINES = ("chat", "completion", "models", "health", "aclose")
_ASYNC_ITERATORS = ("chat_stream", "completion_stream")


def test_llamacpp_backend_satisfies_the_backend_protocol() -> None:
    backend = _unloaded_backend()
    assert isinstance(backend, Backend)
    assert isinstance(backend, ReportsLoad)
    for name in _COROUTINES:
        assert inspect.iscoroutinefunction(getattr(LlamaCppBackend, name)), name
    for name in _ASYNC_ITERATORS:
        assert inspect.isasyncgenfunction(getattr(LlamaCppBackend, name)), name
    assert not inspect.iscoroutinefunction(LlamaCppBackend.capabilities)
    assert not inspect.iscoroutinefunction(LlamaCppBackend.load)


@pytest.mark.parametrize("method", [*_COROUTINES, *_ASYNC_ITERATORS, "capabilities"])
def test_llamacpp_backend_methods_take_the_protocol_parameters(method: str) -> None:
    expected = list(inspect.signature(getattr(Backend, method)).parameters)
    actual = list(inspect.signature(getattr(LlamaCppBackend, method)).parameters)
    assert actual == expected


class _Incomplete:
    """Has most of Backend, but no completion_stream: must not pass."""

    name = "x"

    def capabilities(self, engine_model: str) -> ModelCapabilities:
        return ModelCapabilities(context_length=1)

    async def chat(self, request: object, target: Target, ctx: RequestContext) -> object:
        return None

    async def chat_stream(
        self, request: object, target: Target, ctx: RequestContext
    ) -> AsyncIterator[object]:
        yield None

    async def completion(self, request: object, target: Target, ctx: RequestContext) -> object:
        return None

    async def models(self) -> Sequence[str]:
        return []

    async def health(self) -> BackendHealth:
        return BackendHealth(ready=True)

    async def aclose(self) -> None:
        return None


def test_the_protocol_check_has_teeth() -> None:
    assert not isinstance(_Incomplete(), Backend)


def test_ordered_policy_satisfies_the_routing_policy_protocol() -> None:
    policy = OrderedPolicy()
    assert isinstance(policy, RoutingPolicy)
    candidates = [
        Candidate(Target("m", "m", f"m/{index}"), backend) for index, backend in enumerate("abc")
    ]
    ctx = RequestContext("req-1", 0)
    ranked = policy.rank(
        contract.ChatCompletionRequest(model="m", messages=[]), ctx, candidates, {}
    )
    assert [r.candidate.backend for r in ranked] == ["a", "b", "c"]
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)
    assert all(r.reason for r in ranked)


def test_plugin_manifest_offers_config_models() -> None:
    registry = discover()
    for kind in (registry.backends, registry.policies):
        for component in kind.values():
            assert issubclass(component.config_model, BaseModel)
