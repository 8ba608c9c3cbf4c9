#!/usr/bin/env bash
# The quantized matmul on this machine's TPU (v5e, v6e, v7): the Pallas
# (Mosaic) kernels and the fused XLA path, through the public surface, for
# int8 and the float element formats (fp8 x fp8, bf16 x fp8, bf16 x fp4)
# against bf16 at M = 1, 16, 256, 4096 and Llama-3-8B shapes, each checked
# against the float64 reference (scripts/tpu_check.py).
#
# Needs a TPU-enabled JAX already installed (jax[tpu]) and numpy; installs
# nothing, needs no network, uses this checkout from its source tree.
# Finishes in under 5 minutes (a time budget, then a hard stop).
#
#   scripts/tpu_check.sh [--out FILE] [--reps N] [--budget SECONDS] [--dry-run]
#
# PYTHON picks the interpreter (default python3). --dry-run runs the same code
# on the CPU (Pallas in interpret mode, small shapes) and lowers the kernels
# for each TPU generation without one.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 295 "${PYTHON:-python3}" "$root/scripts/tpu_check.py" "$@"
