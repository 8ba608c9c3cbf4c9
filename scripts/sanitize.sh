#!/usr/bin/env bash
# The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer
# (issue 27, docs/reliability.md):
#
#   1. builds csrc/ (both modules: the XLA FFI target xla_qops/_cpu_kernels
#      and the torch operator torch_bridge/_torch_ops) with
#      -fsanitize=address,undefined into its own build directory, build/sanitize
#      (the install's build under build/cp3xx-* and the .venv stay untouched);
#   2. runs the C++-facing tests and the seeded fuzzers with those modules
#      shadowing the installed ones: a sitecustomize.py (written by
#      scripts/module_shim.py) in a temporary directory on PYTHONPATH puts a
#      finder for the two module names ahead of scikit-build-core's editable
#      redirect (which would otherwise find the normal build); a check before the tests fails the run unless the
#      sanitized files are the ones loaded;
#   3. the ASan runtime is LD_PRELOADed into Python (it must come first in
#      the process; Python itself is not instrumented), leak checking is off
#      (the interpreter, torch and XLA keep allocations alive at exit by
#      design), and any ASan or UBSan report aborts the process, so a finding
#      fails the run.
#
# Usage: scripts/sanitize.sh [extra pytest args]   (make sanitize)
#   SANITIZE_BUILD=0  reuse build/sanitize's modules; SANITIZE_TESTS="files"  run
#   those test files; FUZZ_CASES=n  add a long fuzz run
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$PWD/$VENV/bin/python"
BUILD=build/sanitize
CXX=$(command -v "${CXX:-g++}")

SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
if [ "${SANITIZE_BUILD:-1}" = 1 ]; then
  echo "== configuring $BUILD ($CXX, $SAN_FLAGS)"
  cmake -S . -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER="$CXX" \
    -DCMAKE_CXX_FLAGS="$SAN_FLAGS" \
    -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DPython_EXECUTABLE="$PY" \
    -DXLA_QOPS_TORCH_OPS=ON >"$BUILD.configure.log" 2>&1 \
    || { cat "$BUILD.configure.log"; exit 1; }
  echo "== building (kernels_avx512.cc takes minutes under ASan)"
  cmake --build "$BUILD" -j "$(nproc)"
else  # SANITIZE_BUILD=0: rerun the tests against the modules already built
  echo "== reusing the modules in $BUILD"
fi

libasan=$("$CXX" -print-file-name=libasan.so)
libubsan=$("$CXX" -print-file-name=libubsan.so)

shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
"$PY" scripts/module_shim.py "$shim" "$BUILD"  # loads the sanitized modules instead

export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$libasan $libubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PJRT_DEVICE=CPU HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE

echo "== checking that the sanitized modules are the ones loaded"
"$PY" - <<PYEOF
from xla_qops import _cpu_kernels
from torch_bridge import _torch_ops
for module in (_cpu_kernels, _torch_ops):
    assert module.__file__.startswith("$PWD/$BUILD/"), module.__file__
    print("  ", module.__name__, "->", module.__file__)
PYEOF

# The fuzzers first: they reach the most code per second (the whole list
# takes about an hour on 2 busy cores; SANITIZE_TESTS picks files).
TESTS=${SANITIZE_TESTS:-"tests/test_fuzz_native.py tests/test_concurrency.py
  tests/test_custom_call_formats.py tests/test_torch_cpu_direct.py
  tests/test_custom_call.py tests/test_torch_formats.py"}
echo "== C++-facing tests and seeded fuzzers under ASan+UBSan: $(echo $TESTS)"
# shellcheck disable=SC2086  # the list is split into file names on purpose
"$PY" -m pytest -q -p no:cacheprovider -m "not slow" $TESTS "$@"
if [ -n "${FUZZ_CASES:-}" ]; then
  echo "== long fuzz run under ASan+UBSan ($FUZZ_CASES cases per target)"
  "$PY" scripts/fuzz.py --cases "$FUZZ_CASES"
fi
echo "== sanitize: no ASan/UBSan report"
