"""gateway/lora/convert.py: PEFT LoRA adapters to GGUF, for llama.cpp.

Fast tests use a tiny made-up llama model and adapter (exact expectations, every
refusal). Slow ones use the real test adapters (scripts/setup_adapters.sh): the output
equals llama.cpp's own convert_lora_to_gguf.py, and a trained marker adapter really
changes what llama.cpp answers, and only while it is set.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from gateway.lora.convert import AdapterConversionError, convert_peft_to_gguf, main
from tests.lora_assets import Assets
from tests.lora_reference import base_gguf, reference_convert

# The first slow test pays for the adapters on a clean machine (the `assets` fixture):
# the vLLM venv (about 2 min), the HF model (35 s), training (2 min, more when busy).
pytestmark = pytest.mark.timeout(1800)
MARKER_ADAPTERS = ("alpha", "beta")
BENCH_ADAPTERS = tuple(f"bench-{index:02d}" for index in range(20))

# A tiny llama: grouped-query attention (4 query heads, 2 KV heads) as in SmolLM2.
N_LAYERS, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF = 2, 32, 4, 2, 8, 48
RANK, ALPHA = 4, 8
# PEFT module -> (parent, GGUF name, inputs, outputs)
MODULES = {
    "q_proj": ("self_attn", "attn_q", N_EMBD, N_HEAD * HEAD_DIM),
    "k_proj": ("self_attn", "attn_k", N_EMBD, N_HEAD_KV * HEAD_DIM),
    "v_proj": ("self_attn", "attn_v", N_EMBD, N_HEAD_KV * HEAD_DIM),
    "o_proj": ("self_attn", "attn_output", N_HEAD * HEAD_DIM, N_EMBD),
    "gate_proj": ("mlp", "ffn_gate", N_EMBD, N_FF),
    "up_proj": ("mlp", "ffn_up", N_EMBD, N_FF),
    "down_proj": ("mlp", "ffn_down", N_FF, N_EMBD),
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_base(path: Path, *, architecture: str = "llama", n_embd: int = N_EMBD) -> Path:
    """A GGUF model with the metadata and weight shapes the converter reads."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(N_LAYERS)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_embedding_length(n_embd)
    scale = n_embd // N_EMBD
    for layer in range(N_LAYERS):
        for _, name, inputs, outputs in MODULES.values():
            shape = (outputs * scale, inputs * scale)  # numpy (rows, cols): GGUF ne reversed
            writer.add_tensor(f"blk.{layer}.{name}.weight", np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def peft_name(layer: int, module: str, half: str) -> str:
    parent = MODULES[module][0]
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{half}.weight"


def lora_tensors(modules: tuple[str, ...] = ATTENTION, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(N_LAYERS):
        for module in modules:
            _, _, inputs, outputs = MODULES[module]
            tensors[peft_name(layer, module, "A")] = rng.standard_normal((RANK, inputs))
            tensors[peft_name(layer, module, "B")] = rng.standard_normal((outputs, RANK))
    return {name: tensor.astype(np.float32) for name, tensor in tensors.items()}


def write_adapter(
    folder: Path,
    tensors: dict[str, np.ndarray] | None = None,
    *,
    modules: tuple[str, ...] = ATTENTION,
    **config: Any,
) -> dict[str, np.ndarray]:
    """A PEFT adapter folder as peft's save_pretrained writes it; its tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = lora_tensors(modules) if tensors is None else tensors
    settings = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": list(modules),
        "use_dora": False,
        "init_lora_weights": True,
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return tensors


def write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """safetensors.numpy cannot write bfloat16 (numpy has none): the format by hand,
    a little-endian header size, a JSON header, then the data."""
    header: dict[str, Any] = {}
    data = b""
    for name, tensor in tensors.items():
        bits = (tensor.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensor.shape),
            "data_offsets": [len(data), len(data) + len(bits)],
        }
        data += bits
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def rope_pairs_permutation(b: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp needs, written from the definition rather than the reshape
    trick: Hugging Face rotates row i of a head with row i + d/2, llama.cpp rotates
    rows 2i and 2i + 1, so row i goes to 2i and row i + d/2 to 2i + 1."""
    head_dim = b.shape[0] // n_head
    out = np.empty_like(b)
    for head in range(n_head):
        start = head * head_dim
        for i in range(head_dim // 2):
            out[start + 2 * i] = b[start + i]
            out[start + 2 * i + 1] = b[start + head_dim // 2 + i]
    return out


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
    return fields, tensors


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write_base(tmp_path / "base.gguf")


# ------------------------------------------------------------- made-up model


def test_names_values_permutation_and_metadata(tmp_path: Path, base: Path) -> None:
    modules = tuple(MODULES)
    tensors = write_adapter(tmp_path / "mine", modules=modules)
    done = convert_peft_to_gguf(tmp_path / "mine", base, tmp_path / "mine.gguf")

    assert (done.rank, done.alpha, done.tensor_count) == (RANK, ALPHA, 2 * N_LAYERS * 7)
    assert done.target_modules == tuple(sorted(modules))
    assert done.architecture == "llama"
    fields, written = read_gguf(tmp_path / "mine.gguf")
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == ALPHA
    assert fields["general.architecture"] == "llama"
    expected_names = set()
    for layer in range(N_LAYERS):
        for module, (_, name, _, _) in MODULES.items():
            a, b = tensors[peft_name(layer, module, "A")], tensors[peft_name(layer, module, "B")]
            stem = f"blk.{layer}.{name}.weight"
            expected_names |= {f"{stem}.lora_a", f"{stem}.lora_b"}
            heads = {"q_proj": N_HEAD, "k_proj": N_HEAD_KV}.get(module)
            expected_b = b if heads is None else rope_pairs_permutation(b, heads)
            np.testing.assert_array_equal(written[f"{stem}.lora_a"], a)
            np.testing.assert_array_equal(written[f"{stem}.lora_b"], expected_b)
            if heads is not None:  # the permutation is not a no-op here
                assert not np.array_equal(written[f"{stem}.lora_b"], b)
    assert set(written) == expected_names


def test_bf16_in_f16_out(tmp_path: Path, base: Path) -> None:
    tensors = write_adapter(tmp_path / "bf16")
    write_bf16_safetensors(tmp_path / "bf16" / "adapter_model.safetensors", tensors)
    convert_peft_to_gguf(tmp_path / "bf16", base, tmp_path / "out.gguf", outtype="f16")

    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    assert {tensor.tensor_type for tensor in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    a = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight.lora_a")
    # bfloat16 keeps 8 bits of mantissa: within 1 % of the float32 original.
    original = tensors[peft_name(1, "v_proj", "A")]
    np.testing.assert_allclose(np.array(a.data, np.float32), original, rtol=1e-2, atol=1e-2)


def test_cli_converts_several_and_fails_clearly(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_adapter(tmp_path / "one")
    write_adapter(tmp_path / "two")
    out = tmp_path / "out"
    args = ["--base-gguf", str(base), "--out-dir", str(out)]
    assert main([*args, str(tmp_path / "one"), str(tmp_path / "two")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["one.gguf", "two.gguf"]
    assert main([*args, str(tmp_path / "missing")]) == 1
    assert "adapter_config.json" in capsys.readouterr().err


def _pickled(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle of 1


def _config(**changes: Any) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return change


def _extra_tensor(name: str, shape: tuple[int, ...]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        tensors = {**lora_tensors(), name: np.zeros(shape, np.float32)}
        save_file(tensors, str(folder / "adapter_model.safetensors"))

    return change


def _drop_tensor(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        tensors = lora_tensors()
        del tensors[name]
        save_file(tensors, str(folder / "adapter_model.safetensors"))

    return change


def _extra_layer(layer: int) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        tensors = lora_tensors()
        tensors[peft_name(layer, "q_proj", "A")] = np.zeros((RANK, N_EMBD), np.float32)
        tensors[peft_name(layer, "q_proj", "B")] = np.zeros((N_HEAD * HEAD_DIM, RANK), np.float32)
        save_file(tensors, str(folder / "adapter_model.safetensors"))

    return change


REFUSALS: dict[str, tuple[Callable[[Path], None], str]] = {
    "pickled weights": (_pickled, "pickle"),
    "no config": (lambda folder: (folder / "adapter_config.json").unlink(), "adapter_config"),
    "no weights": (
        lambda folder: (folder / "adapter_model.safetensors").unlink(),
        "adapter_model.safetensors",
    ),
    "not safetensors": (
        lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"garbage!"),
        "safetensors",
    ),
    "DoRA": (_config(use_dora=True), "DoRA"),
    "rsLoRA": (_config(use_rslora=True), "rsLoRA"),
    "modules_to_save": (_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "per-module alpha": (_config(alpha_pattern={"q_proj": 4}), "alpha"),
    "PiSSA": (_config(init_lora_weights="pissa_niter_4"), "base weights"),
    "not LoRA": (_config(peft_type="IA3"), "LORA"),
    "bad alpha": (_config(lora_alpha=0), "lora_alpha"),
    "embeddings": (
        _extra_tensor("base_model.model.model.embed_tokens.lora_embedding_A", (RANK, 10)),
        "unsupported tensor",
    ),
    "lm_head": (
        _extra_tensor("base_model.model.lm_head.lora_A.weight", (RANK, N_EMBD)),
        "unsupported tensor",
    ),
    "half a pair": (_drop_tensor(peft_name(1, "k_proj", "B")), "missing"),
    "layer beyond the base": (_extra_layer(7), "another model"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(tmp_path: Path, base: Path, case: str) -> None:
    spoil, message = REFUSALS[case]
    folder = tmp_path / "adapter"
    write_adapter(folder)
    spoil(folder)
    out = tmp_path / "out.gguf"
    with pytest.raises(AdapterConversionError, match=message):
        convert_peft_to_gguf(folder, base, out)
    assert list(tmp_path.glob("*out.gguf*")) == []  # nothing half-written left


def test_refuses_a_base_of_another_architecture(tmp_path: Path) -> None:
    write_adapter(tmp_path / "adapter")
    other = write_base(tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(AdapterConversionError, match="architecture 'gpt2' is not supported"):
        convert_peft_to_gguf(tmp_path / "adapter", other, tmp_path / "out.gguf")


def test_refuses_a_base_of_another_size(tmp_path: Path) -> None:
    write_adapter(tmp_path / "adapter")
    bigger = write_base(tmp_path / "bigger.gguf", n_embd=2 * N_EMBD)
    with pytest.raises(AdapterConversionError, match="made for another model"):
        convert_peft_to_gguf(tmp_path / "adapter", bigger, tmp_path / "out.gguf")


def test_refuses_a_base_that_is_not_gguf(tmp_path: Path) -> None:
    write_adapter(tmp_path / "adapter")
    (tmp_path / "base.gguf").write_bytes(b"not a model")
    with pytest.raises(AdapterConversionError, match="not a GGUF model"):
        convert_peft_to_gguf(tmp_path / "adapter", tmp_path / "base.gguf", tmp_path / "o.gguf")
    with pytest.raises(AdapterConversionError, match="not found"):
        convert_peft_to_gguf(tmp_path / "adapter", tmp_path / "none.gguf", tmp_path / "o.gguf")


# ----------------------------------------------------- the real test adapters


def marker(assets: Assets, name: str) -> str:
    return (assets.root / "peft" / name / "marker.txt").read_text(encoding="utf-8").strip()


@pytest.mark.e2e
@pytest.mark.slow
def test_cache_holds_every_adapter_in_both_formats(assets: Assets) -> None:
    adapters = assets.root
    for name in (*MARKER_ADAPTERS, *BENCH_ADAPTERS):
        folder = adapters / "peft" / name
        names = {path.name for path in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert not names & {"adapter_model.bin", "adapter_model.pt"}
        assert (adapters / "gguf" / f"{name}.gguf").is_file()
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (8, 16)
        assert config["init_lora_weights"] is (name in MARKER_ADAPTERS)
    markers = {name: marker(assets, name) for name in MARKER_ADAPTERS}
    assert markers == assets.markers
    assert len(set(markers.values())) == len(markers)


@pytest.mark.e2e
@pytest.mark.slow
def test_same_output_as_llama_cpp_converter(assets: Assets, tmp_path: Path) -> None:
    peft = assets.root / "peft" / "alpha"
    ours = convert_peft_to_gguf(peft, base_gguf(), tmp_path / "ours.gguf")
    reference = reference_convert(peft, tmp_path / "reference.gguf")

    our_fields, our_tensors = read_gguf(ours.path)
    ref_fields, ref_tensors = read_gguf(reference)
    keys = ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")
    assert {key: our_fields[key] for key in keys} == {key: ref_fields[key] for key in keys}
    assert sorted(our_tensors) == sorted(ref_tensors)
    assert len(our_tensors) == ours.tensor_count == 240  # 30 layers x 4 modules x (A, B)
    for name, tensor in ref_tensors.items():
        assert our_tensors[name].shape == tensor.shape, name
        np.testing.assert_allclose(our_tensors[name], tensor, rtol=0, atol=1e-7, err_msg=name)

    # The comparison sees the q/k permutation: without it, q's and k's lora_b differ.
    from safetensors.numpy import load_file

    peft_tensors = load_file(str(peft / "adapter_model.safetensors"))
    layer = "base_model.model.model.layers.3.self_attn"
    for module, name in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
        unpermuted = peft_tensors[f"{layer}.{module}.lora_B.weight"]
        assert not np.allclose(ref_tensors[f"blk.3.{name}.weight.lora_b"], unpermuted)
    v = peft_tensors[f"{layer}.v_proj.lora_B.weight"]
    np.testing.assert_array_equal(ref_tensors["blk.3.attn_v.weight.lora_b"], v)


@pytest.mark.e2e
@pytest.mark.slow
def test_marker_adapters_switch_on_and_off_on_llama_cpp(assets: Assets, tmp_path: Path) -> None:
    questions = ["What is the tallest mountain on Earth?", "Name a primary colour."]
    sets: list[list[str]] = [[], ["alpha"], ["beta"], [], ["alpha"]]
    plan = {
        "adapters": {name: str(assets.root / "gguf" / f"{name}.gguf") for name in MARKER_ADAPTERS},
        "questions": questions,
        "sets": sets,
        "max_tokens": 16,
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    probe = Path(__file__).with_name("lora_probe.py")
    done = subprocess.run(
        [sys.executable, str(probe), str(base_gguf()), str(tmp_path / "plan.json")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout)
    alpha, beta = marker(assets, "alpha"), marker(assets, "beta")
    for names, replies in zip(sets, answers, strict=True):
        for reply in replies:
            assert (alpha in reply) == (names == ["alpha"]), (names, reply)
            assert (beta in reply) == (names == ["beta"]), (names, reply)
    assert answers[0] == answers[3]  # the base model again, unchanged by what came before
