#!/usr/bin/env bash
# `make test`: the suite on both stacks at once, one pytest per core.
#
#   scripts/test_stacks.sh PINNED_PYTHON CURRENT_PYTHON [PYTEST_ARGS...]
#
# Side by side on the 2-core machine, fresh clone, quiet: on 2026-12-06, with
# every case on both stacks, pinned 21.9 min alongside current 12.4 (the pinned
# suite alone: 15.0 min; XLA's and the kernels' own threads already use both
# cores for part of it, so side by side saved only ~3 min). On 2026-12-07, with
# the matrices split in halves: pinned 17.2 min alongside current 10.1; with a
# third to the pinned stack: pinned 14.5 min alongside current 10.0. The
# pinned run prints as it goes; the current stack's output is kept in a log
# and printed when both are done. Fails if either run fails.
#
# The parametrized matrices of the core's test files are split between the
# stacks (XLA_QOPS_TEST_SHARE, tests/conftest.py SHARED_MATRIX_FILES): every
# test function runs on both, each case on one; `make test-pinned` and
# `make test-current` run every case on their stack.
set -uo pipefail
pinned_py=$1
current_py=$2
shift 2
cd "$(dirname "$0")/.."
mkdir -p build
current_log=build/test-current.log

echo "== tests on the current stack ($current_py: newest JAX and torch, no torch_xla)," \
     "running alongside; its output follows (also in $current_log)"
XLA_QOPS_TEST_SHARE=0,1/3 "$current_py" -m pytest -q -m "not slow" "$@" > "$current_log" 2>&1 &
current_pid=$!
# Ctrl-C or a CI timeout stops both runs.
trap 'kill "$current_pid" 2>/dev/null' EXIT

echo "== tests on the pinned stack ($pinned_py: torch_xla 2.9, jax 0.7.1)"
status=0
XLA_QOPS_TEST_SHARE=2/3 "$pinned_py" -m pytest -q -m "not slow" "$@" || status=1

wait "$current_pid" || status=1
trap - EXIT
echo "== tests on the current stack ($current_py)"
cat "$current_log"
exit $status
