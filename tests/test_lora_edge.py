"""LoRA adapters on a remote `nomoat edge` node that reads the same adapter
root: the gateway registers each adapter on the node through the node's
admin API (the node checks the sha256 itself) and sends stacks there."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from gateway.auth import hash_api_key
from tests.conftest import API_KEY, MODEL, Server, config_with_key, running_server
from tests.lora_assets import Assets, ask, metric
from tests.test_edge_routing import edge_node

EDGE_ADMIN_KEY = "sk-nomoat-edge-admin-0123456789"
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


@contextmanager
def lora_edge(root: Path, log_dir: Path) -> Iterator[int]:
    """An edge node with an adapter root and an admin key; its port."""
    admin = ("--adapter-root", str(root), "--admin-key-hash", hash_api_key(EDGE_ADMIN_KEY))
    with edge_node(log_dir, "edge", *admin) as (port, _):
        yield port


@pytest.fixture(scope="module")
def edge(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An edge node that reads the gateway's adapter root (a shared volume)."""
    with lora_edge(assets.root, tmp_path_factory.mktemp("lora-edge")) as port:
        yield port


@pytest.fixture(scope="module")
def private_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge-private-root")


@pytest.fixture(scope="module")
def lonely_edge(private_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An edge node with only its own, empty adapter root: adapters are pushed."""
    with lora_edge(private_root, tmp_path_factory.mktemp("lora-edge2")) as port:
        yield port


@pytest.fixture(scope="module")
def gateway(
    edge: int, lonely_edge: int, assets: Assets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    os.environ["TEST_EDGE_ADMIN_KEY"] = EDGE_ADMIN_KEY
    extra = f"""
        [backends.edge]
        type = "edge"
        base_url = "http://127.0.0.1:{edge}/v1"
        probe_interval = 0.5
        adapter_root = "shared"
        admin_api_key_env = "TEST_EDGE_ADMIN_KEY"

        [models.remote]
        deployments = [{{ backend = "edge", model = "{MODEL}" }}]

        [backends.pushed-edge]
        type = "edge"
        base_url = "http://127.0.0.1:{lonely_edge}/v1"
        probe_interval = 0.5
        push_adapters = true
        admin_api_key_env = "TEST_EDGE_ADMIN_KEY"

        [models.pushed]
        deployments = [{{ backend = "pushed-edge", model = "{MODEL}" }}]

        [lora]
        root = "{assets.root}"

        [lora.adapters.e-alpha]
        base = "remote"
        path = "peft/alpha"
        sha256 = "{assets.sha("peft/alpha")}"

        [lora.adapters.e-beta]
        base = "remote"
        path = "gguf/beta.gguf"
        sha256 = "{assets.sha("gguf/beta.gguf")}"

        [lora.adapters.p-alpha]
        base = "pushed"
        path = "peft/alpha"
        sha256 = "{assets.sha("peft/alpha")}"

        [lora.adapters.p-beta]
        base = "pushed"
        path = "gguf/beta.gguf"
        sha256 = "{assets.sha("gguf/beta.gguf")}"
        """
    with running_server(tmp_path_factory.mktemp("lora-edge-gw"), config_with_key(extra)) as live:
        yield live


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0)


def test_adapters_and_stacks_are_served_by_the_edge_node(
    client: openai.OpenAI, assets: Assets
) -> None:
    alpha, beta = assets.markers["alpha"], assets.markers["beta"]
    base = ask(client, "remote")
    assert alpha not in base and beta not in base
    assert alpha in ask(client, "e-alpha")
    assert beta in ask(client, "remote:e-beta")
    assert ask(client, "remote:e-alpha@0+e-beta@1") == ask(client, "e-beta")


def test_the_edge_node_registered_them_itself_and_reports_what_it_holds(
    client: openai.OpenAI, edge: int, gateway: Server
) -> None:
    ask(client, "e-alpha", max_tokens=2)
    listing = httpx.get(
        f"http://127.0.0.1:{edge}/admin/adapters",
        headers={"Authorization": f"Bearer {EDGE_ADMIN_KEY}"},
        timeout=10,
    ).json()
    assert {"e-alpha", "e-beta"} <= {adapter["id"] for adapter in listing["data"]}
    deadline = time.monotonic() + 10
    while metric(gateway, "nomoat_adapter_loaded", backend="edge", adapter="e-alpha") != 1:
        assert time.monotonic() < deadline, "the gateway never saw the edge node load e-alpha"
        time.sleep(0.2)


def test_the_edge_nodes_admin_api_refuses_other_keys(edge: int) -> None:
    answer = httpx.get(
        f"http://127.0.0.1:{edge}/admin/adapters",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    assert answer.status_code == 401


def test_adapters_pushed_to_an_edge_node_are_checked_stored_and_served(
    client: openai.OpenAI, assets: Assets, lonely_edge: int, private_root: Path
) -> None:
    alpha, beta = assets.markers["alpha"], assets.markers["beta"]
    assert alpha in ask(client, "p-alpha")  # a PEFT folder: the node converts it
    assert beta in ask(client, "pushed:p-beta")  # a GGUF file
    assert ask(client, "pushed:p-alpha@0+p-beta@1") == ask(client, "p-beta")
    stored = {path.name for path in (private_root / "uploads").iterdir()}
    assert {assets.sha("peft/alpha"), assets.sha("gguf/beta.gguf")} <= stored


def test_an_upload_whose_bytes_do_not_match_its_sha256_is_refused(lonely_edge: int) -> None:
    answer = httpx.put(
        f"http://127.0.0.1:{lonely_edge}/admin/adapters/evil/files",
        content=b"not what was announced",
        headers={
            "Authorization": f"Bearer {EDGE_ADMIN_KEY}",
            "x-nomoat-base": MODEL,
            "x-nomoat-sha256": "0" * 64,
            "x-nomoat-format": "gguf",
        },
        timeout=10,
    )
    assert answer.status_code == 400
    assert "sha256" in answer.json()["error"]["message"]
