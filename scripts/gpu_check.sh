#!/usr/bin/env bash
# The Pallas GPU kernels on this machine's NVIDIA GPU: correctness against the
# float64 reference and timings against bf16 and dequantize-per-call float
# paths, for every GPU scheme at Llama-3-8B shapes (scripts/gpu_check.py).
#
# Needs a CUDA-enabled JAX already installed (e.g. jax[cuda13] 0.11-0.12) and
# numpy; installs nothing, needs no network, uses this checkout from its
# source tree. Finishes in under 5 minutes (a time budget, then a hard stop).
#
#   scripts/gpu_check.sh [--out FILE] [--reps N] [--budget SECONDS] [--dry-run]
#
# PYTHON picks the interpreter (default python3). --dry-run runs the same code
# on the CPU with the kernels interpreted and small shapes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 295 "${PYTHON:-python3}" "$root/scripts/gpu_check.py" "$@"
