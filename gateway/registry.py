"""Finds plugins through the entry-point group ``nomoat.plugins``.

The built-in backends and policies are registered in ``pyproject.toml`` under
the same group, so they load through exactly the path third-party plugins take.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from gateway.contract import BackendType, HookType, PluginManifest, PolicyType

GROUP = "nomoat.plugins"
T = TypeVar("T")


class PluginLoadError(Exception):
    """A plugin could not be imported, or is not a PluginManifest."""


@dataclass(frozen=True, slots=True)
class Registry:
    """Every backend type, policy and hook offered by the installed plugins."""

    plugins: tuple[PluginManifest, ...] = ()
    backends: Mapping[str, BackendType[Any]] = field(default_factory=dict)
    policies: Mapping[str, PolicyType[Any]] = field(default_factory=dict)
    hooks: Mapping[str, HookType[Any]] = field(default_factory=dict)


def _load(entry: EntryPoint) -> PluginManifest:
    try:
        loaded = entry.load()
        manifest = loaded() if callable(loaded) else loaded
    except Exception as error:
        message = f'plugin "{entry.name}" ({entry.value}) failed to load: {error}'
        raise PluginLoadError(message) from error
    if not isinstance(manifest, PluginManifest):
        raise PluginLoadError(f'plugin "{entry.name}" ({entry.value}) is not a PluginManifest')
    return manifest


def _merge(kind: str, into: dict[str, T], offered: Mapping[str, T], plugin: str) -> None:
    for name, component in offered.items():
        if name in into:
            raise PluginLoadError(f'{kind} "{name}" of plugin "{plugin}" is offered twice')
        into[name] = component


def build_registry(manifests: Iterable[PluginManifest]) -> Registry:
    plugins = tuple(manifests)
    backends: dict[str, BackendType[Any]] = {}
    policies: dict[str, PolicyType[Any]] = {}
    hooks: dict[str, HookType[Any]] = {}
    for manifest in plugins:
        _merge("backend type", backends, manifest.backends, manifest.name)
        _merge("policy", policies, manifest.policies, manifest.name)
        _merge("hook", hooks, manifest.hooks, manifest.name)
    return Registry(plugins, backends, policies, hooks)


def discover(disabled: Iterable[str] = ()) -> Registry:
    """Load every installed plugin except those named in ``disabled``."""
    skip = set(disabled)
    entries = sorted(entry_points(group=GROUP), key=lambda entry: entry.name)
    return build_registry(_load(entry) for entry in entries if entry.name not in skip)
