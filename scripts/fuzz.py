"""The long fuzz run of the native entry points (`make fuzz`, issue 27).

Runs tests/test_fuzz_native.py's properties with --cases random (not
derandomized) cases each instead of the default suite's fixed short
sequence, and prints how many calls were compared with the float64
reference and how many invalid calls raised, per entry point. Exit status:
pytest's (a failing case is printed with hypothesis' reproduction blob).

    python scripts/fuzz.py --cases 2000
    FUZZ_CASES=300 scripts/sanitize.sh      # the same under ASan/UBSan
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000,
                        help="random cases per property (default 2000)")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (e.g. -k ffi)")
    args = parser.parse_args()
    if args.cases < 1:
        parser.error(f"--cases: expected an int >= 1, got {args.cases}")
    env = dict(os.environ, XLA_QOPS_FUZZ_CASES=str(args.cases))
    for name, value in (("PJRT_DEVICE", "CPU"), ("HF_HUB_OFFLINE", "1"),
                        ("OMP_WAIT_POLICY", "PASSIVE")):
        env.setdefault(name, value)
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "tests/test_fuzz_native.py", *args.pytest_args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(run.stdout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("fuzz ")]
    total = sum(int(word) for line in lines for word in line.split()
                if word.isdigit())
    print(f"== fuzz: {total} native calls in {time.monotonic() - start:.0f} s "
          f"({args.cases} cases per property); exit status {run.returncode}")
    for line in lines:
        print("  ", line)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
