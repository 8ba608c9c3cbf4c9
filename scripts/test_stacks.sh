#!/usr/bin/env bash
# `make test`: the suite on both stacks at once, one pytest per core.
#
#   scripts/test_stacks.sh PINNED_PYTHON CURRENT_PYTHON [PYTEST_ARGS...]
#
# Most of the suite's time is single-threaded (XLA compilations, Python), so
# the two stacks' runs side by side on two cores take about as long as the
# longer one alone, where one after the other took their sum. The pinned run
# prints as it goes; the current stack's output is kept in a log and printed
# when both are done. Fails if either run fails.
set -uo pipefail
pinned_py=$1
current_py=$2
shift 2
cd "$(dirname "$0")/.."
mkdir -p build
current_log=build/test-current.log

echo "== tests on the current stack ($current_py: newest JAX and torch, no torch_xla)," \
     "running alongside; its output follows (also in $current_log)"
"$current_py" -m pytest -q -m "not slow" "$@" > "$current_log" 2>&1 &
current_pid=$!
# Ctrl-C or a CI timeout stops both runs.
trap 'kill "$current_pid" 2>/dev/null' EXIT

echo "== tests on the pinned stack ($pinned_py: torch_xla 2.9, jax 0.7.1)"
status=0
"$pinned_py" -m pytest -q -m "not slow" "$@" || status=1

wait "$current_pid" || status=1
trap - EXIT
echo "== tests on the current stack ($current_py)"
cat "$current_log"
exit $status
