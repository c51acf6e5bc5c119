"""PEFT LoRA adapter -> GGUF LoRA adapter, for llama.cpp, without torch.

llama.cpp's own converter (``convert_lora_to_gguf.py``) ships only inside the
llama-cpp-python sdist, needs torch and transformers, and reads the base model's
Hugging Face folder. This one needs only numpy, ``safetensors`` and ``gguf`` (the
writer llama.cpp's script uses too) and reads what it needs about the base model
from the base model's GGUF file, which is what a llama.cpp engine has anyway.

Its output matches ``convert_lora_to_gguf.py --outtype f32`` (the script's default):
the same tensor names, shapes, values and adapter metadata (tests/test_lora_convert.py
compares them; only ``general.name`` differs, the folder's name here, title-cased
there). What it must get right:

- names: ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` becomes
  ``blk.N.attn_q.weight.lora_a`` (and ``lora_B`` -> ``.lora_b``);
- llama.cpp stores the q and k projections of llama-family models with the rows of
  each head permuted (its RoPE works on interleaved pairs, Hugging Face's on halves),
  so ``W = B @ A`` must be permuted the same way: the rows of ``B``. ``A`` is untouched;
- metadata llama.cpp checks when loading: ``general.type = adapter``,
  ``adapter.type = lora``, ``general.architecture`` equal to the base model's, and
  ``adapter.lora.alpha`` (llama.cpp scales by ``alpha / rank`` like PEFT does).

Anything it cannot convert faithfully is refused with :class:`AdapterConversionError`
(a ``ValueError``): missing files, pickled weights, unsupported PEFT options or
target modules, an unsupported base architecture, shapes that do not fit the base.

    python -m gateway.lora.convert --base-gguf BASE.gguf --out-dir DIR PEFT_DIR...
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar, cast

import gguf
import numpy as np
import numpy.typing as npt
import safetensors

Array = npt.NDArray[np.float32]
OutType = Literal["f32", "f16"]
_T = TypeVar("_T")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Weights that torch would unpickle: loading a pickle runs code, so these are never read.
PICKLED_WEIGHTS = (
    "adapter_model.bin",
    "adapter_model.pt",
    "adapter_model.pth",
    "adapter_model.ckpt",
)


class AdapterConversionError(ValueError):
    """The adapter cannot be converted; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class ConvertedAdapter:
    path: Path
    architecture: str
    rank: int  # the largest rank of any module (PEFT's rank_pattern may vary it)
    alpha: float
    tensor_count: int  # GGUF tensors written: a lora_a and a lora_b per module
    target_modules: tuple[str, ...]  # PEFT module names, e.g. ("k_proj", "q_proj")


@dataclass(frozen=True, slots=True)
class _Module:
    gguf_name: str  # the base model's GGUF tensor, without ".weight"
    heads: Literal["q", "k", ""]  # which head count permutes B's rows; "" for none


# PEFT module path (inside a decoder layer) -> llama.cpp tensor. Only these are
# supported: embeddings and lm_head need llama.cpp-specific handling and are rare.
_LLAMA_MODULES = {
    "self_attn.q_proj": _Module("attn_q", "q"),
    "self_attn.k_proj": _Module("attn_k", "k"),
    "self_attn.v_proj": _Module("attn_v", ""),
    "self_attn.o_proj": _Module("attn_output", ""),
    "mlp.gate_proj": _Module("ffn_gate", ""),
    "mlp.up_proj": _Module("ffn_up", ""),
    "mlp.down_proj": _Module("ffn_down", ""),
}
# GGUF architectures whose tensor names and q/k permutation are the ones above
# (mistral-style models are written as "llama" by llama.cpp's converter too).
SUPPORTED_ARCHITECTURES = frozenset({"llama"})

# "base_model.model." is PEFT's wrapper; the inner "model." is LlamaForCausalLM's
# (absent when the adapter was made on a bare LlamaModel).
_TENSOR_NAME = re.compile(
    r"base_model\.model\.(?:model\.)?layers\.(\d+)\.([a-z_]+\.[a-z_]+)\.lora_([AB])\.weight"
)

# PEFT options that change what the weights mean; converting them as plain LoRA
# would silently produce a different model, so they are refused.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported by llama.cpp",
    "use_rslora": "rsLoRA scales by alpha/sqrt(r), llama.cpp by alpha/r",
    "use_qalora": "QA-LoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "lora_bias": "LoRA bias terms are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights) is not used by llama-family models",
    "modules_to_save": "modules_to_save replaces whole weights, which a LoRA GGUF cannot hold",
    "trainable_token_indices": "trained token embeddings are not supported",
    "layer_replication": "layer replication is not supported",
    "alpha_pattern": "per-module alpha is not supported: llama.cpp has one alpha per adapter",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "target_parameters": "LoRA on raw parameters (not modules) is not supported",
}
# Initialisations that also change the base weights (PiSSA, OLoRA, CorDA, LoftQ):
# the adapter only works on that changed base, which the engine does not have.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True, slots=True)
class BaseModelFacts:
    """What the converter needs to know about the base model, from its GGUF."""

    architecture: str
    n_layers: int
    n_head: int
    n_head_kv: int
    # (columns, rows) of each weight matrix by GGUF name: ne0 = inputs, ne1 = outputs.
    shapes: Mapping[str, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class _PeftConfig:
    rank: int
    alpha: float


# --------------------------------------------------------------------- base model


def read_base_facts(base_gguf: Path) -> BaseModelFacts:
    """Architecture, layer and head counts and weight shapes of a base GGUF model."""
    if not base_gguf.is_file():
        raise AdapterConversionError(f"base model not found: {base_gguf}")
    stat = base_gguf.stat()
    return _read_base_facts(base_gguf.resolve(), stat.st_mtime_ns, stat.st_size)


# Parsing a GGUF's metadata takes seconds (GGUFReader walks the whole vocabulary),
# and every adapter of a base model needs the same facts: keep them, keyed by the
# file's identity so a replaced file is read again.
@functools.lru_cache(maxsize=8)
def _read_base_facts(path: Path, _mtime_ns: int, _size: int) -> BaseModelFacts:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise AdapterConversionError(f"{path} is not a GGUF model: {error}") from error
    architecture = _field(reader, "general.architecture", str, path)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise AdapterConversionError(
            f"base model architecture {architecture!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    shapes = {
        tensor.name: (int(tensor.shape[0]), int(tensor.shape[1]))
        for tensor in reader.tensors
        if len(tensor.shape) == 2
    }
    return BaseModelFacts(
        architecture=architecture,
        n_layers=_field(reader, f"{architecture}.block_count", int, path),
        n_head=_field(reader, f"{architecture}.attention.head_count", int, path),
        n_head_kv=_field(reader, f"{architecture}.attention.head_count_kv", int, path),
        shapes=MappingProxyType(shapes),
    )


def _field(reader: gguf.GGUFReader, key: str, kind: type[_T], path: Path) -> _T:
    field = reader.get_field(key)
    value = None if field is None else field.contents()
    if not isinstance(value, kind):
        raise AdapterConversionError(f"{path} lacks metadata {key}: not a complete GGUF model")
    return value


# --------------------------------------------------------------------- PEFT input


def read_peft_config(peft_dir: Path) -> _PeftConfig:
    """Rank and alpha from adapter_config.json, after refusing what is not plain LoRA."""
    path = peft_dir / CONFIG_FILE
    if not path.is_file():
        raise AdapterConversionError(f"{peft_dir} has no {CONFIG_FILE}: not a PEFT adapter")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise AdapterConversionError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterConversionError(f"{path} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterConversionError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for option, why in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterConversionError(f"{path}: {option} is set; {why}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterConversionError(
            f"{path}: init_lora_weights={init!r} also changes the base weights; convert it "
            "to a plain LoRA first (PEFT: path_initial_model_for_weight_conversion)"
        )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterConversionError(f"{path}: r must be a positive integer, not {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise AdapterConversionError(f"{path}: lora_alpha must be positive, not {alpha!r}")
    return _PeftConfig(rank, float(alpha))


def load_peft_weights(peft_dir: Path) -> dict[str, Array]:
    """The adapter's tensors as float32, from safetensors only."""
    path = peft_dir / WEIGHTS_FILE
    if not path.is_file():
        pickled = [name for name in PICKLED_WEIGHTS if (peft_dir / name).exists()]
        if pickled:
            raise AdapterConversionError(
                f"{peft_dir / pickled[0]} is a pickle (loading one can run code) and is "
                f"refused; save the adapter with safe_serialization=True ({WEIGHTS_FILE})"
            )
        raise AdapterConversionError(f"{peft_dir} has no {WEIGHTS_FILE}")
    try:
        entries = _deserialize(path.read_bytes())
    except Exception as error:  # safetensors raises its own SafetensorError
        raise AdapterConversionError(f"{path} is not a valid safetensors file: {error}") from error
    return {name: _as_float32(name, info) for name, info in entries}


# safetensors' stub leaves deserialize untyped: (name, {"dtype", "shape", "data"}) pairs.
# It is used rather than safetensors.numpy.load_file because numpy has no bfloat16,
# the dtype many adapters are trained in.
_deserialize = cast(
    Callable[[bytes], list[tuple[str, dict[str, Any]]]],
    safetensors.deserialize,
)


def _as_float32(name: str, info: Mapping[str, Any]) -> Array:
    dtype, shape, data = info["dtype"], tuple(info["shape"]), info["data"]
    if dtype == "F32":
        array = np.frombuffer(data, dtype="<f4")
    elif dtype == "F16":
        array = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits, no rounding involved.
        array = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise AdapterConversionError(f"tensor {name}: dtype {dtype} is not supported")
    return array.astype(np.float32).reshape(shape)


# ------------------------------------------------------------------ conversion


@dataclass(frozen=True, slots=True)
class _Pair:
    layer: int
    module: str  # PEFT module path, e.g. "self_attn.q_proj"
    a: Array  # (rank, inputs)
    b: Array  # (outputs, rank)


def pair_tensors(weights: Mapping[str, Array]) -> list[_Pair]:
    """Group lora_A and lora_B by module; refuse any other tensor."""
    halves: dict[tuple[int, str], dict[str, Array]] = {}
    for name, tensor in weights.items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None or match[2] not in _LLAMA_MODULES:
            raise AdapterConversionError(
                f"unsupported tensor {name}: only LoRA on the attention and MLP projections "
                f"({', '.join(m.split('.')[1] for m in _LLAMA_MODULES)}) can be converted"
            )
        halves.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    pairs = []
    for (layer, module), half in sorted(halves.items()):
        if "A" not in half or "B" not in half:
            raise AdapterConversionError(f"layer {layer} {module}: lora_A or lora_B is missing")
        pairs.append(_Pair(layer, module, half["A"], half["B"]))
    if not pairs:
        raise AdapterConversionError("the adapter holds no LoRA tensors")
    return pairs


def permute_rows(b: Array, n_head: int) -> Array:
    """llama.cpp's q/k permutation (LlamaModel.permute in convert_hf_to_gguf.py),
    applied to the rows of B: within each head, rows [x0..x(d/2-1), y0..] become
    [x0, y0, x1, y1, ...], because llama.cpp's RoPE rotates adjacent pairs."""
    rows = b.shape[0]
    if rows % (2 * n_head):
        raise AdapterConversionError(f"{rows} rows do not split into {n_head} heads")
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def to_gguf_tensors(pair: _Pair, base: BaseModelFacts) -> tuple[str, Array, Array]:
    """The GGUF base name of the pair's weight and its lora_a, lora_b, checked
    against that weight's shape."""
    module = _LLAMA_MODULES[pair.module]
    name = f"blk.{pair.layer}.{module.gguf_name}.weight"
    shape = base.shapes.get(name)
    if pair.layer >= base.n_layers or shape is None:
        raise AdapterConversionError(f"the base model has no {name}: made for another model?")
    a, b = pair.a, pair.b
    inputs, outputs = shape
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise AdapterConversionError(f"{name}: lora_A {a.shape} and lora_B {b.shape} do not pair")
    if a.shape[1] != inputs or b.shape[0] != outputs:
        raise AdapterConversionError(
            f"{name}: the adapter is for a {a.shape[1]}->{b.shape[0]} projection, the base "
            f"model's is {inputs}->{outputs}: made for another model?"
        )
    if module.heads:
        b = permute_rows(b, base.n_head if module.heads == "q" else base.n_head_kv)
    return name, a, b


def write_adapter(
    out_path: Path,
    base: BaseModelFacts,
    alpha: float,
    name: str,
    tensors: Iterable[tuple[str, Array]],
) -> None:
    """Write the GGUF next to ``out_path`` and rename it into place, so a reader
    (or a cache check) never sees a half-written adapter."""
    scratch = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(scratch, base.architecture)
    try:
        # The keys and values llama.cpp's converter writes for an adapter.
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_name(name)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, tensor in tensors:
            writer.add_tensor(tensor_name, np.ascontiguousarray(tensor))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        scratch.unlink(missing_ok=True)
        raise
    writer.close()
    scratch.replace(out_path)


def convert_peft_to_gguf(
    peft_dir: Path, base_gguf: Path, out_path: Path, *, outtype: OutType = "f32"
) -> ConvertedAdapter:
    """Convert the PEFT LoRA adapter in ``peft_dir`` (adapter_config.json and
    adapter_model.safetensors) for the model in ``base_gguf``; write ``out_path``.

    ``outtype="f32"`` is llama.cpp's converter's default and loses nothing;
    ``"f16"`` halves the file.
    """
    base = read_base_facts(base_gguf)
    config = read_peft_config(peft_dir)
    pairs = pair_tensors(load_peft_weights(peft_dir))
    dtype = np.float16 if outtype == "f16" else np.float32
    tensors: list[tuple[str, Array]] = []
    for pair in pairs:
        name, a, b = to_gguf_tensors(pair, base)
        tensors.append((f"{name}.lora_a", a.astype(dtype)))
        tensors.append((f"{name}.lora_b", b.astype(dtype)))
    write_adapter(out_path, base, config.alpha, peft_dir.name, tensors)
    return ConvertedAdapter(
        path=out_path,
        architecture=base.architecture,
        rank=max(pair.a.shape[0] for pair in pairs),
        alpha=config.alpha,
        tensor_count=len(tensors),
        target_modules=tuple(sorted({pair.module.split(".")[1] for pair in pairs})),
    )


# -------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert PEFT LoRA adapters to GGUF.")
    parser.add_argument("--base-gguf", type=Path, required=True, help="the base model (GGUF)")
    parser.add_argument("--out-dir", type=Path, required=True, help="writes OUT_DIR/NAME.gguf")
    parser.add_argument("--outtype", choices=["f32", "f16"], default="f32")
    parser.add_argument("peft_dirs", type=Path, nargs="+", help="PEFT adapter folders")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for peft_dir in args.peft_dirs:
        out = args.out_dir / f"{peft_dir.name}.gguf"
        try:
            done = convert_peft_to_gguf(peft_dir, args.base_gguf, out, outtype=args.outtype)
        except AdapterConversionError as error:
            print(f"convert: {peft_dir}: {error}", file=sys.stderr)
            return 1
        print(f"{done.path}\trank {done.rank}\talpha {done.alpha:g}\t{done.tensor_count} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
