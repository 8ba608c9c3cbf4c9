#!/usr/bin/env bash
# Builds llama.cpp (llama-cpp-python from PyPI, for this CPU) as a peer of the
# decoder benchmark, if it is not there yet. Benchmark-only: it goes to
# build/llama_cpp (or $XLA_QOPS_LLAMA_CPP), never into a project environment,
# so no pinned version changes:
#   site/  the llama_cpp package and diskcache (pip --target, no dependencies
#          resolved: numpy, jinja2 and typing-extensions come from the env
#          that runs the benchmark)
#   src/   the llama.cpp sources it ships: convert_hf_to_gguf.py, gguf-py
#
#   scripts/ensure_llama_cpp.sh [PYTHON]     (default .venv/bin/python)
#
# About 4 minutes on 2 cores of an idle machine (-DGGML_NATIVE=ON: ggml's
# kernels for this CPU's ISA, AVX-512 VNNI/BF16 on Zen 4), less its AMX
# backend: on an Intel Xeon with AMX (2026-12-07) ggml_backend_amx_mul_mat
# segfaulted in the first decode of the benchmark's model, a known llama.cpp
# bug (ggml-org/llama.cpp#20824, closed unfixed; dspy's CI drops the AMX
# variant for it). -U__AMX_INT8__ etc. undefine the macros that compile the
# AMX code in (the compiler defines them for -march=native before it reads
# -U), so ggml keeps its AVX-512 kernels and the CPU_REPACK weight layouts.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
home=${XLA_QOPS_LLAMA_CPP:-build/llama_cpp}
stamp="$home/.installed-$version-noamx"
if [ -f "$stamp" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "ensure_llama_cpp.sh: building llama-cpp-python $version into $home (about 4 minutes)"
"$python" -m pip download --quiet --no-deps --no-binary :all: \
  "llama-cpp-python==$version" -d "$work/sdist"
no_amx="-U__AMX_TILE__ -U__AMX_INT8__ -U__AMX_BF16__"
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'" \
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$python" -m pip wheel --quiet --no-deps "$work"/sdist/*.tar.gz -w "$work/wheel"
rm -rf "$home/site" "$home/src"
mkdir -p "$home"
# diskcache: llama_cpp/__init__ imports it (numpy, jinja2, typing-extensions
# come from the environment that runs the benchmark).
"$python" -m pip install --quiet --no-deps --target "$home/site" "$work"/wheel/*.whl diskcache
tar xzf "$work"/sdist/*.tar.gz -C "$work"
mv "$work"/llama_cpp_python-*/vendor/llama.cpp "$home/src"
touch "$stamp"
echo "ensure_llama_cpp.sh: done ($home)"
