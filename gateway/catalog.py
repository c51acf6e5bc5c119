"""The model catalog: what clients may name in ``model``, and where it runs.

Built once at start-up from validated settings (phase two of validation lives
here, because it needs the installed plugins: backend options are checked by
their type's config model, policies and hooks by theirs, and each hook object
must implement at least one hook protocol).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from gateway.auth import key_fingerprint
from gateway.contract import (
    BackendType,
    Candidate,
    ErrorHook,
    RequestHook,
    ResponseHook,
    RoutingPolicy,
    StreamHook,
    Target,
)
from gateway.errors import NotFoundError
from gateway.hooks import BoundHook
from gateway.lora.registry import AdapterRegistry
from gateway.registry import Registry
from gateway.rules import Rule, parse_header
from gateway.settings import (
    ConfigError,
    LoRASettings,
    ModelSettings,
    Settings,
    reference_problems,
    validation_problems,
)


@dataclass(frozen=True, slots=True)
class BackendPlan:
    """A backend to start: its type and its validated options."""

    name: str
    backend_type: BackendType[BaseModel]
    config: BaseModel


@dataclass(frozen=True, slots=True)
class Retry:
    rounds: int = 1
    backoff_seconds: float = 0.25
    retry_after_cap_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    candidates: tuple[Candidate, ...]
    policy: RoutingPolicy
    owned_by: str
    policy_name: str = ""
    fallbacks: tuple[str, ...] = ()
    retry: Retry = Retry()
    timeout_seconds: float | None = None
    rules: tuple[Rule, ...] = ()
    stream_timeout_seconds: float | None = None
    # A request's wait for a slot when every deployment is at its max_concurrency.
    capacity_wait_seconds: float = 10.0
    # What it serves: "chat" (chat and completions), "embeddings".
    capabilities: frozenset[str] = frozenset({"chat"})
    # Matryoshka-trained embeddings: `dimensions` may shorten them.
    matryoshka: bool = False


@dataclass(frozen=True, slots=True)
class Catalog:
    models: Mapping[str, ModelEntry]
    aliases: Mapping[str, str] = field(default_factory=dict)

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a model or an alias of one."""
        return name in self.models or name in self.aliases

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def resolve(self, name: str) -> ModelEntry:
        entry = self.models.get(self.aliases.get(name, name))
        if entry is None:
            raise NotFoundError(
                f"The model `{name}` does not exist or you do not have access to it.",
                param="model",
            )
        return entry


@dataclass(frozen=True, slots=True)
class Plan:
    backends: tuple[BackendPlan, ...]
    catalog: Catalog
    hooks: tuple[BoundHook, ...] = ()
    adapters: AdapterRegistry | None = None


def _backend_plans(
    settings: Settings, registry: Registry, problems: list[str]
) -> list[BackendPlan]:
    plans = []
    for name, backend in settings.backends.items():
        backend_type = registry.backends.get(backend.type)
        if backend_type is None:
            known = ", ".join(sorted(registry.backends)) or "none installed"
            problems.append(f'backends.{name}.type: unknown type "{backend.type}" (known: {known})')
            continue
        try:
            config = backend_type.config_model.model_validate(backend.options())
        except ValidationError as error:
            problems.extend(validation_problems(error, prefix=f"backends.{name}"))
            continue
        plans.append(BackendPlan(name, backend_type, config))
    return plans


def _model_entries(
    settings: Settings, registry: Registry, problems: list[str]
) -> dict[str, ModelEntry]:
    entries = {}
    for name, model in settings.models.items():
        policy_type = registry.policies.get(model.policy)
        if policy_type is None:
            known = ", ".join(sorted(registry.policies)) or "none installed"
            problems.append(
                f'models.{name}.policy: unknown policy "{model.policy}" (known: {known})'
            )
            continue
        try:
            options = policy_type.config_model.model_validate(model.policy_options)
        except ValidationError as error:
            problems.extend(validation_problems(error, prefix=f"models.{name}.policy_options"))
            continue
        candidates = tuple(
            Candidate(
                Target(name, deployment.model or name, f"{name}/{index}"),
                deployment.backend,
                deployment.weight,
                deployment.input_usd_per_million,
                deployment.output_usd_per_million,
                deployment.max_concurrency,
            )
            for index, deployment in enumerate(model.deployments)
        )
        entries[name] = ModelEntry(
            name,
            candidates,
            policy_type.factory(options),
            model.owned_by,
            model.policy,
            tuple(model.fallbacks),
            Retry(model.retries, model.retry_backoff_seconds, model.retry_after_cap_seconds),
            model.timeout_seconds,
            _rules(name, model),
            model.stream_timeout_seconds,
            model.capacity_wait_seconds,
            frozenset(model.capabilities),
            model.matryoshka,
        )
    return entries


def _rules(name: str, model: ModelSettings) -> tuple[Rule, ...]:
    """Rules name deployments; candidates are known by "<model>/<index>"."""
    ids: dict[str, set[str]] = {}
    for index, deployment in enumerate(model.deployments):
        ids.setdefault(deployment.name or deployment.backend, set()).add(f"{name}/{index}")
    return tuple(
        Rule(
            pool=frozenset().union(*(ids.get(member, set()) for member in rule.pool)),
            min_prompt_tokens=rule.min_prompt_tokens,
            max_prompt_tokens=rule.max_prompt_tokens,
            header=parse_header(rule.header),
            api_key_ids=frozenset(key_fingerprint(h) for h in rule.api_key_hashes),
        )
        for rule in model.rules
    )


def _hooks(settings: Settings, registry: Registry, problems: list[str]) -> list[BoundHook]:
    hooks = []
    for index, entry in enumerate(settings.hooks):
        hook_type = registry.hooks.get(entry.type)
        if hook_type is None:
            known = ", ".join(sorted(registry.hooks)) or "none installed"
            problems.append(f'hooks[{index}].type: unknown hook "{entry.type}" (known: {known})')
            continue
        try:
            options = hook_type.config_model.model_validate(entry.options)
        except ValidationError as error:
            problems.extend(validation_problems(error, prefix=f"hooks[{index}].options"))
            continue
        hook = hook_type.factory(options)
        problem = hook_problem(hook)
        if problem is not None:
            problems.append(f'hooks[{index}]: hook "{entry.label}" (type "{entry.type}") {problem}')
            continue
        hooks.append(BoundHook(entry.label, entry.fail_open, hook))
    return hooks


# The hook protocols of the contract, and the one method each asks for.
HOOK_PROTOCOLS = (RequestHook, ResponseHook, StreamHook, ErrorHook)
HOOK_METHODS = ("on_request", "on_response", "on_stream", "on_error")
# How close (difflib's ratio) a method's name must be to a hook method's to be
# taken for a misspelling of it: "on_requests", "onRequest", "on_err" are;
# "request", "on_start", "on_stream_chunk" are not.
_NEAR_MISS = 0.85


def hook_problem(hook: object) -> str | None:
    """Why ``hook`` cannot serve as a hook, or None.

    Like pluggy refusing a misspelt hook at registration: an object that
    implements none of the hook protocols would be called by nobody, and a
    method named like a hook method but not quite (``on_requests``) would
    silently never run.
    """
    guesses = "; ".join(f"{name}: did you mean {meant}?" for name, meant in _misspelt(hook))
    if not any(isinstance(hook, protocol) for protocol in HOOK_PROTOCOLS):
        none = "implements none of " + ", ".join(HOOK_METHODS)
        return f"{none} ({guesses})" if guesses else none
    return f"has {guesses}" if guesses else None


def _misspelt(hook: object) -> list[tuple[str, str]]:
    """Public methods whose names are near misses of a hook method's."""
    found = []
    for name in dir(hook):
        if name.startswith("_") or name in HOOK_METHODS:
            continue
        # Static lookup: reading an attribute must not run a property.
        attribute = inspect.getattr_static(hook, name, None)
        if isinstance(attribute, staticmethod | classmethod):
            attribute = attribute.__func__
        if not callable(attribute):
            continue
        close = difflib.get_close_matches(name.lower(), HOOK_METHODS, n=1, cutoff=_NEAR_MISS)
        if close:
            found.append((name, close[0]))
    return found


def plan(settings: Settings, registry: Registry) -> Plan:
    """Phase two of validation; raises :class:`ConfigError` with every problem."""
    problems = reference_problems(settings)
    backends = _backend_plans(settings, registry, problems)
    models = _model_entries(settings, registry, problems)
    hooks = _hooks(settings, registry, problems)
    aliases = {alias: name for name, model in settings.models.items() for alias in model.aliases}
    catalog = Catalog(models, aliases)
    adapters = _adapters(settings.lora, catalog, problems)
    if problems:
        raise ConfigError(problems)
    return Plan(tuple(backends), catalog, tuple(hooks), adapters)


def _adapters(lora: LoRASettings, catalog: Catalog, problems: list[str]) -> AdapterRegistry:
    """Declared adapters, their files checked against their sha256 (blocking:
    this runs once, before the server starts)."""
    registry = AdapterRegistry(lora.root, catalog.knows, catalog.canonical)
    for name, adapter in lora.adapters.items():
        try:
            registry.add_verified(name, adapter.base, adapter.path, adapter.sha256)
        except ValueError as error:
            problems.append(f"lora.adapters.{name}: {error}")
    for name, stack in lora.stacks.items():
        try:
            registry.add_stack(name, stack.base, stack.adapters)
        except ValueError as error:
            problems.append(f"lora.stacks.{name}: {error}")
    return registry
