"""Phase-two validation of hooks (gateway/catalog.py): an object that
implements none of the hook protocols, or has a method whose name is a near
miss of a hook method's, is refused at start-up, naming it. Fast: no server."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from gateway import contract
from gateway.catalog import HOOK_METHODS, HOOK_PROTOCOLS, hook_problem, plan
from gateway.cli import check
from gateway.contract import AnyChunk, AnyRequest, AnyResponse, GatewayError, RequestContext
from gateway.registry import Registry, build_registry, discover
from gateway.settings import ConfigError, load_settings

NONE_OF = "implements none of on_request, on_response, on_stream, on_error"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Nothing:
    """Options only: no hook method at all."""

    def __init__(self, options: Options) -> None:
        self.options = options


class PluralRequest(Nothing):
    async def on_requests(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        return request


class CamelCase(Nothing):
    async def onRequest(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:  # noqa: N802
        return request


class Squashed(Nothing):
    async def onrequest(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        return request


class RequestAndMisspeltResponse(Nothing):
    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        return request

    async def on_respons(
        self, request: AnyRequest, response: AnyResponse, ctx: RequestContext
    ) -> AnyResponse:
        return response


class RequestHook(Nothing):
    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        return request


class StreamOnly(Nothing):
    async def on_stream(
        self, request: AnyRequest, chunks: AsyncIterator[AnyChunk], ctx: RequestContext
    ) -> AsyncIterator[AnyChunk]:
        async for chunk in chunks:
            yield chunk


class ErrorWithHelpers(Nothing):
    """A real hook with helpers whose names merely resemble hook methods."""

    async def on_error(
        self, request: AnyRequest | None, error: GatewayError, ctx: RequestContext
    ) -> None:
        return None

    def request(self) -> None: ...

    def on_start(self) -> None: ...

    def on_stream_chunk(self) -> None: ...

    def _on_requests(self) -> None: ...  # private: not taken for a hook method


class MisspeltProperty(Nothing):
    """Only methods count: a property named like a hook method is not read."""

    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        return request

    @property
    def on_errors(self) -> int:
        raise AssertionError("validation must not read properties")


def registry_with(**hooks: type[Nothing]) -> Registry:
    manifest = contract.PluginManifest(
        "test-hooks",
        hooks={name: contract.HookType(Options, factory) for name, factory in hooks.items()},
    )
    return build_registry([*discover().plugins, manifest])


def problems_for(tmp_path: Path, hook_type: type[Nothing], name: str = "") -> list[str]:
    config = tmp_path / "nomoat.toml"
    label = f'name = "{name}"\n' if name else ""
    config.write_text(f'[[hooks]]\ntype = "t"\n{label}')
    try:
        plan(load_settings(config), registry_with(t=hook_type))
    except ConfigError as error:
        return error.problems
    return []


def test_the_hook_methods_are_exactly_the_contracts_protocols() -> None:
    assert (
        contract.RequestHook,
        contract.ResponseHook,
        contract.StreamHook,
        contract.ErrorHook,
    ) == HOOK_PROTOCOLS
    members = [
        name
        for protocol in HOOK_PROTOCOLS
        for name, _ in inspect.getmembers(protocol, inspect.isfunction)
        if not name.startswith("_")
    ]
    assert tuple(members) == HOOK_METHODS


def test_a_hook_with_no_hook_method_is_refused_naming_it(tmp_path: Path) -> None:
    problems = problems_for(tmp_path, Nothing, name="audit")
    assert problems == [f'hooks[0]: hook "audit" (type "t") {NONE_OF}']


def test_the_label_defaults_to_the_type(tmp_path: Path) -> None:
    assert problems_for(tmp_path, Nothing) == [f'hooks[0]: hook "t" (type "t") {NONE_OF}']


@pytest.mark.parametrize(
    ("hook_type", "misspelt"),
    [(PluralRequest, "on_requests"), (CamelCase, "onRequest"), (Squashed, "onrequest")],
)
def test_a_misspelt_only_method_is_refused_with_a_suggestion(
    tmp_path: Path, hook_type: type[Nothing], misspelt: str
) -> None:
    problems = problems_for(tmp_path, hook_type, name="audit")
    assert problems == [
        f'hooks[0]: hook "audit" (type "t") {NONE_OF} ({misspelt}: did you mean on_request?)'
    ]


def test_a_misspelt_method_beside_a_real_one_is_refused(tmp_path: Path) -> None:
    problems = problems_for(tmp_path, RequestAndMisspeltResponse)
    assert problems == ['hooks[0]: hook "t" (type "t") has on_respons: did you mean on_response?']


@pytest.mark.parametrize("hook_type", [RequestHook, StreamOnly, ErrorWithHelpers, MisspeltProperty])
def test_a_hook_implementing_a_protocol_is_accepted(
    tmp_path: Path, hook_type: type[Nothing]
) -> None:
    config = tmp_path / "nomoat.toml"
    config.write_text('[[hooks]]\ntype = "t"\nname = "ok"\n')
    [bound] = plan(load_settings(config), registry_with(t=hook_type)).hooks
    assert bound.label == "ok"
    assert isinstance(bound.hook, hook_type)


def test_every_bad_hook_is_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "nomoat.toml"
    config.write_text(
        '[[hooks]]\ntype = "good"\n\n[[hooks]]\ntype = "bad"\n\n[[hooks]]\ntype = "typo"\n'
    )
    found = registry_with(good=RequestHook, bad=Nothing, typo=PluralRequest)
    with pytest.raises(ConfigError) as caught:
        plan(load_settings(config), found)
    assert [problem.split(":", 1)[0] for problem in caught.value.problems] == [
        "hooks[1]",
        "hooks[2]",
    ]


def test_check_config_reports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nomoat check-config` runs the same phase two."""
    monkeypatch.setattr("gateway.cli.discover", lambda disabled=(): registry_with(t=Nothing))
    config = tmp_path / "nomoat.toml"
    config.write_text('[[hooks]]\ntype = "t"\n')
    _, problems = check(config)
    assert problems == [f'hooks[0]: hook "t" (type "t") {NONE_OF}']


def test_hook_problem_on_first_party_hooks() -> None:
    """Every installed hook type, built with its defaults where it has them,
    passes (the first-party plugins are real hooks)."""
    for name, hook_type in discover().hooks.items():
        try:
            options = hook_type.config_model()
        except ValueError:
            continue  # options are required: built by its own tests
        assert hook_problem(hook_type.factory(options)) is None, name
