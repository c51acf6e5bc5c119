"""The chart's pods, run here as processes the way Kubernetes would start them
(no cluster, no container engine): the container's arguments, its environment
with the Secrets resolved, the rendered nomoat.toml, a HOME of its own, the
network address 0.0.0.0. The gateway of the default values serves the SDK with
the key the chart generated, answers the probes' paths, and drains on SIGTERM
within the pod's grace period; an edge node takes the gateway's key the chart
made for it and refuses any other."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.helm_chart import RELEASE, Manifest, Rendered, render_set

pytestmark = pytest.mark.e2e

STARTUP_SECONDS = 180


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _pod_environment(rendered: Rendered, container: Manifest, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOMOAT_", "OTEL_"))}
    env.update(rendered.environment(container))
    # The pod's emptyDir at /data, here.
    for name in ("HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        env[name] = env[name].replace("/data", str(home), 1)
    return env


def _with_port(args: list[str], port: int) -> list[str]:
    if "--port" in args:
        index = args.index("--port")
        return [*args[: index + 1], str(port), *args[index + 2 :]]
    return [*args, "--port", str(port)]


@contextmanager
def pod(
    rendered: Rendered, container: Manifest, tmp_path: Path, config: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The container's command (nomoat ...) as a process; its root URL."""
    home = tmp_path / "data"
    home.mkdir()
    args = list(container["args"])
    if config is not None:
        args[args.index("--config") + 1] = str(config)
    port = _free_port()
    argv = [sys.executable, "-m", "gateway.cli", *_with_port(args, port)]
    log = (tmp_path / "pod.log").open("wb")
    process = subprocess.Popen(
        argv, env=_pod_environment(rendered, container, home), stdout=log, stderr=log
    )
    root = f"http://127.0.0.1:{port}"
    try:
        _wait(root, process, tmp_path / "pod.log")
        yield root, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _wait(root: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the pod's process exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{root}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"not ready after {STARTUP_SECONDS} s:\n{log.read_text()}")


def _container(workload: Manifest, name: str) -> Manifest:
    spec = workload["spec"]["template"]["spec"]
    found: Manifest = next(c for c in spec["containers"] if c["name"] == name)
    return found


def test_gateway_pod_of_the_default_values(tmp_path: Path) -> None:
    rendered = render_set("default-values")
    gateway = _container(rendered.gateway, "gateway")
    config = tmp_path / "nomoat.toml"
    config.write_text(rendered.nomoat_toml)
    key = rendered.secret_values()[f"{RELEASE}-nomoat-keys"]["api-key"]
    model = next(iter(tomllib.loads(rendered.nomoat_toml)["models"]))
    spec = rendered.gateway["spec"]["template"]["spec"]
    with pod(rendered, gateway, tmp_path, config) as (root, process):
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            path = gateway[probe]["httpGet"]["path"]
            assert httpx.get(f"{root}{path}", timeout=10).status_code == 200, probe
        client = openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
        )
        assert reply.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"{root}/v1", api_key="sk-not-a-key-of-this-gateway", max_retries=0
            ).models.list()
        # No admin key hashes: the admin API is closed, even to the API key.
        admin = httpx.get(
            f"{root}/admin/adapters", headers={"authorization": f"Bearer {key}"}, timeout=10
        )
        assert admin.status_code in (401, 403)
        # A stream in flight when the pod is told to stop still finishes.
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Count to twenty."}],
            max_tokens=48,
            stream=True,
        )
        chunks = iter(stream)
        first = next(chunks)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert first.choices or rest
        assert any(c.choices and c.choices[0].finish_reason for c in rest)
        assert process.wait(timeout=spec["terminationGracePeriodSeconds"]) == 0
        assert time.monotonic() - started < spec["terminationGracePeriodSeconds"]


def test_edge_pod_takes_the_key_the_chart_made_for_the_gateway(tmp_path: Path) -> None:
    rendered = render_set("gpu-edge-values")
    edge = rendered.named("StatefulSet", f"{RELEASE}-nomoat-edge")
    node = _container(edge, "edge")
    # The adapter volume is a mounted claim in the cluster; here, a folder of its own.
    node = {**node, "args": _without_adapter_root(node["args"], tmp_path / "adapters")}
    gateway_env = rendered.environment(_container(rendered.gateway, "gateway"))
    with pod(rendered, node, tmp_path) as (root, _):
        models = httpx.get(
            f"{root}/v1/models",
            headers={"authorization": f"Bearer {gateway_env['NOMOAT_EDGE_API_KEY']}"},
            timeout=10,
        )
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["smollm2-135m-instruct"]
        refused = httpx.get(
            f"{root}/v1/models", headers={"authorization": "Bearer sk-anyone-else-0000"}
        )
        assert refused.status_code == 401
        adapters = httpx.get(
            f"{root}/admin/adapters",
            headers={"authorization": f"Bearer {gateway_env['NOMOAT_EDGE_ADMIN_KEY']}"},
            timeout=10,
        )
        assert adapters.status_code == 200


def _without_adapter_root(args: list[str], folder: Path) -> list[str]:
    folder.mkdir()
    index = args.index("--adapter-root")
    return [*args[: index + 1], str(folder), *args[index + 2 :]]
