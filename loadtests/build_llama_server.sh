#!/usr/bin/env bash
# Build llama.cpp's own llama-server and llama-bench, for measuring only.
#
# The source is the vendor/llama.cpp folder of the llama-cpp-python sdist that
# the gateway runs (same llama.cpp revision, same ggml), built with the same
# AMX-off CPU flags as scripts/bootstrap.sh: a default build crashes on CPUs
# with AMX. The result goes to a cache folder keyed by version and flags; a
# second run with the binaries present does nothing. Build logs go to stderr;
# the last stdout line is the path of llama-server (llama-bench is beside it).
#
# Usage: loadtests/build_llama_server.sh
# Env:   NOMOAT_CACHE (default ~/.cache/nomoat), PYTHON (for pip download),
#        JOBS (default nproc)
set -euo pipefail

cache=${NOMOAT_CACHE:-$HOME/.cache/nomoat}
llama_version=0.3.36
sdist_dir="$cache/sdist"
src="$sdist_dir/llama_cpp_python-$llama_version/vendor/llama.cpp"
jobs=${JOBS:-$(nproc)}

cpu_flags() {
  # Kept identical to scripts/bootstrap.sh: AMX stays off whatever the CPU offers.
  local common="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  if grep -qw avx512f /proc/cpuinfo; then
    echo "$common -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
  else
    echo "$common -DGGML_AVX512=OFF"
  fi
}

cmake_args="$(cpu_flags) -DLLAMA_CURL=OFF"
# Nothing may be fetched at build time: no prebuilt web UI, no npm, no HTTPS.
# Static binaries, so they do not pick up the wheel's shared libllama.
build_args="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"
key=$(printf '%s %s %s' "$llama_version" "$cmake_args" "$build_args" | sha256sum | cut -c1-12)
out="$cache/llama-server-$key"
server="$out/bin/llama-server"
bench="$out/bin/llama-bench"

if [ -x "$server" ] && [ -x "$bench" ]; then
  echo "build_llama_server: already built ($out)" >&2
  echo "$server"
  exit 0
fi

if [ ! -f "$src/CMakeLists.txt" ]; then
  echo "build_llama_server: fetching the llama-cpp-python $llama_version sdist" >&2
  mkdir -p "$sdist_dir"
  tarball="$sdist_dir/llama_cpp_python-$llama_version.tar.gz"
  if [ ! -f "$tarball" ]; then
    "${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: \
      -d "$sdist_dir" "llama-cpp-python==$llama_version" >&2
  fi
  tar -xzf "$tarball" -C "$sdist_dir"
fi

echo "build_llama_server: building llama-server and llama-bench ($jobs jobs, a few minutes)" >&2
echo "build_llama_server: flags: $cmake_args" >&2
build="$out/build"
mkdir -p "$build"
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
# shellcheck disable=SC2086  # the flag strings are word lists on purpose
cmake -S "$src" -B "$build" "${generator[@]}" $cmake_args $build_args >&2
cmake --build "$build" --parallel "$jobs" --target llama-server llama-bench >&2

# Smoke test: the binaries start and say which backend and CPU features they use.
"$build/bin/llama-server" --version >&2
"$build/bin/llama-bench" --help >/dev/null

mkdir -p "$out/bin"
cp "$build/bin/llama-server" "$build/bin/llama-bench" "$out/bin/"
printf '%s\n%s\n%s\n' "llama-cpp-python $llama_version" "$cmake_args" "$build_args" >"$out/FLAGS"
rm -rf "$build"
echo "$server"
