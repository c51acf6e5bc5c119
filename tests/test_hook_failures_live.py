"""A failing hook in a real gateway (real model, the app's own stack): it
rejects with a typed error naming it, or is skipped when fail-open; either
way it is counted on /metrics and nothing internal reaches the client."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import TestClient
from pydantic import BaseModel, ConfigDict

from gateway.app import Runtime, create_app
from gateway.catalog import plan
from gateway.contract import AnyRequest, HookType, PluginManifest, RequestContext
from gateway.registry import build_registry, discover
from gateway.settings import load_settings

# Loads the real model in process: not part of the fast layer.
pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


class ExplodingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Exploding:
    def __init__(self, options: ExplodingOptions) -> None:
        del options

    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        raise RuntimeError("database password is hunter2")


EXPLODING = PluginManifest("exploding", hooks={"explode": HookType(ExplodingOptions, Exploding)})

CONFIG = f"""
[backends.embedded]
type = "llamacpp"
threads = 1
parallel = 1
smoke_test = false

[models.{MODEL}]
deployments = [{{ backend = "embedded" }}]

[[hooks]]
type = "explode"
name = "strict"

[[hooks]]
type = "explode"
name = "lenient"
fail_open = true
"""


def test_failing_hooks_reject_or_are_skipped_and_are_counted(tmp_path: Path) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    strict_only = tmp_path / "strict.toml"
    strict_only.write_text(CONFIG)
    lenient_only = tmp_path / "lenient.toml"
    lenient_only.write_text(CONFIG.replace('[[hooks]]\ntype = "explode"\nname = "strict"\n', ""))
    registry = build_registry([*discover().plugins, EXPLODING])

    settings = load_settings(strict_only)
    with TestClient(create_app(Runtime(settings, plan(settings, registry)))) as client:
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 500
        error = refused.json()["error"]
        assert error["code"] == "hook_failed" and "strict" in error["message"]
        assert "hunter2" not in refused.text
        metrics = client.get("/metrics").text
        assert 'nomoat_hook_failures_total{hook="strict"} 1' in metrics

    settings = load_settings(lenient_only)
    with TestClient(create_app(Runtime(settings, plan(settings, registry)))) as client:
        answered = client.post("/v1/chat/completions", json=body)
        assert answered.status_code == 200
        assert answered.json()["usage"]["completion_tokens"] > 0
        client.post("/v1/chat/completions", json=body)
        metrics = client.get("/metrics").text
        assert 'nomoat_hook_failures_total{hook="lenient"} 2' in metrics
