#!/usr/bin/env sh
# The CMake flags llama-cpp-python is built with, for a CPU family:
#   scripts/llama-cmake-args.sh [auto|avx2|avx512]
# auto (the default) reads /proc/cpuinfo; the Dockerfile names the family of the
# machines the image will run on (its CPU_FAMILY build argument). AMX stays off
# whatever the CPU offers: ggml's AMX path is what crashes (SIGSEGV in llama_decode).
set -eu
family=${1:-auto}
common="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ "$family" = auto ]; then
  if grep -qw avx512f /proc/cpuinfo; then family=avx512; else family=avx2; fi
fi
case "$family" in
  avx512) echo "$common -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" ;;
  avx2) echo "$common -DGGML_AVX512=OFF" ;;
  *) echo "llama-cmake-args.sh: unknown CPU family \"$family\" (auto, avx2 or avx512)" >&2; exit 2 ;;
esac
