"""Plugin discovery: entry points, disabled plugins, and two-phase validation."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from gateway import registry
from gateway.catalog import plan
from gateway.contract import HookType, PluginManifest
from gateway.registry import PluginLoadError, build_registry, discover
from gateway.settings import ConfigError, load_settings


class GreeterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    greeting: str
    times: int = 1


class Greeter:
    def __init__(self, options: GreeterOptions) -> None:
        self.options = options

    async def on_request(self, request: object, ctx: object) -> object:
        return request


GREETER = PluginManifest(
    name="greeter",
    hooks={"greet": HookType(GreeterOptions, Greeter)},  # type: ignore[arg-type]
)


def fake_entry_points(*entries: EntryPoint) -> object:
    real = registry.entry_points

    def select(*, group: str) -> list[EntryPoint]:
        return [*real(group=group), *entries] if group == registry.GROUP else []

    return select


def test_builtins_are_discovered_through_the_entry_point_group() -> None:
    found = discover()
    assert "llamacpp" in found.backends
    assert "ordered" in found.policies
    assert {m.name for m in found.plugins} >= {"llamacpp", "builtin-policies"}


def test_a_plugin_that_fails_to_import_stops_discovery_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = EntryPoint("broken", "no_such_module_xyz:manifest", registry.GROUP)
    monkeypatch.setattr(registry, "entry_points", fake_entry_points(broken))
    with pytest.raises(PluginLoadError, match='plugin "broken"'):
        discover()
    assert "llamacpp" in discover(disabled=["broken"]).backends


def test_an_entry_point_that_is_not_a_manifest_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = EntryPoint("wrong", "gateway.settings:Settings", registry.GROUP)
    monkeypatch.setattr(registry, "entry_points", fake_entry_points(wrong))
    with pytest.raises(PluginLoadError, match="not a PluginManifest"):
        discover()


def test_the_same_component_from_two_plugins_is_refused() -> None:
    with pytest.raises(PluginLoadError, match='hook "greet"'):
        build_registry([GREETER, PluginManifest(name="copy", hooks=GREETER.hooks)])


def test_hook_options_are_validated_by_the_plugins_model_with_paths(tmp_path: Path) -> None:
    config = tmp_path / "hooks.toml"
    config.write_text(
        """
[[hooks]]
type = "greet"
options = { greeting = "hi" }

[[hooks]]
type = "greet"
options = { times = "many", colour = "red" }

[[hooks]]
type = "nope"
"""
    )
    found = build_registry([*discover().plugins, GREETER])
    with pytest.raises(ConfigError) as caught:
        plan(load_settings(config), found)
    problems = caught.value.problems
    assert sorted(problems[:3]) == sorted(
        [
            "hooks[1].options.greeting: Field required",
            "hooks[1].options.times: Input should be a valid integer, "
            "unable to parse string as an integer",
            "hooks[1].options.colour: unknown key",
        ]
    )
    assert len(problems) == 4
    assert problems[3].startswith('hooks[2].type: unknown hook "nope" (known: ')
    assert "greet" in problems[3]


def test_hooks_are_built_in_config_order(tmp_path: Path) -> None:
    config = tmp_path / "hooks.toml"
    config.write_text(
        """
[[hooks]]
type = "greet"
name = "first"
options = { greeting = "a" }

[[hooks]]
type = "greet"
fail_open = true
options = { greeting = "b", times = 2 }
"""
    )
    found = build_registry([*discover().plugins, GREETER])
    hooks = plan(load_settings(config), found).hooks
    assert [(h.label, h.fail_open) for h in hooks] == [("first", False), ("greet", True)]
    assert [h.hook.options.greeting for h in hooks] == ["a", "b"]  # type: ignore[attr-defined]
