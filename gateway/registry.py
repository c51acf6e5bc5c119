"""Finds plugins through the entry-point group ``nomoat.plugins``.

The built-in backends and policies are registered in ``pyproject.toml`` under
the same group, so they load through exactly the path third-party plugins take.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from pydantic import BaseModel

from gateway.contract import BackendType, PluginManifest, PolicyType

GROUP = "nomoat.plugins"


class PluginLoadError(Exception):
    """A plugin could not be imported, or is not a PluginManifest."""


@dataclass(frozen=True, slots=True)
class Registry:
    """Every backend type and policy offered by the installed plugins."""

    plugins: tuple[PluginManifest, ...] = ()
    backends: Mapping[str, BackendType[BaseModel]] = field(default_factory=dict)
    policies: Mapping[str, PolicyType[BaseModel]] = field(default_factory=dict)


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


def build_registry(manifests: Iterable[PluginManifest]) -> Registry:
    plugins = tuple(manifests)
    backends: dict[str, BackendType[BaseModel]] = {}
    policies: dict[str, PolicyType[BaseModel]] = {}
    for manifest in plugins:
        for kind, backend_type in manifest.backends.items():
            if kind in backends:
                raise PluginLoadError(f'backend type "{kind}" is offered by two plugins')
            backends[kind] = backend_type
        for kind, policy_type in manifest.policies.items():
            if kind in policies:
                raise PluginLoadError(f'policy "{kind}" is offered by two plugins')
            policies[kind] = policy_type
    return Registry(plugins, backends, policies)


def discover(disabled: Iterable[str] = ()) -> Registry:
    """Load every installed plugin except those named in ``disabled``."""
    skip = set(disabled)
    entries = sorted(entry_points(group=GROUP), key=lambda entry: entry.name)
    return build_registry(_load(entry) for entry in entries if entry.name not in skip)
