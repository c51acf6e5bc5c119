"""The gateway config each value set of the Helm chart renders, through the
real `nomoat check-config` command in a child process, with the environment
the gateway's pod would get (key hashes, database URLs, upstream keys from
Secrets). One child process per value set (about a second of CPU each): e2e.
The same check runs in process in test_helm_chart.py (fast layer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helm_chart import ADAPTER_FILES, VALUE_SETS, render_set

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_nomoat_check_config_accepts_the_rendered_config(value_set: str, tmp_path: Path) -> None:
    rendered = render_set(value_set)
    config = tmp_path / "nomoat.toml"
    config.write_text(rendered.nomoat_toml)
    gateway = next(
        c
        for c in rendered.gateway["spec"]["template"]["spec"]["containers"]
        if c["name"] == "gateway"
    )
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name, data in ADAPTER_FILES.items():
        (adapters / name).write_bytes(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOMOAT_", "OTEL_"))}
    env.update(rendered.environment(gateway))
    env["NOMOAT_LORA__ROOT"] = str(adapters)  # the adapter volume, here
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{config}: ok"


def test_nomoat_check_config_refuses_a_broken_render(tmp_path: Path) -> None:
    """The check above can fail: a config the gateway refuses is reported."""
    config = tmp_path / "nomoat.toml"
    config.write_text(
        render_set("default-values").nomoat_toml.replace("parallel = 4", "parallel = 0")
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "parallel" in result.stderr
