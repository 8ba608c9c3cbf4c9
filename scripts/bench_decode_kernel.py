"""Decode-kernel speed of two builds of the C++ kernels, interleaved (docs/cpu_kernels.md).

Compares the host-CPU decode kernels of two build directories (each made with
`cmake -S <sources> -B <dir>`, holding `_cpu_kernels.*.so` and
`_torch_ops.*.so`) on the decoder bench's shapes (TinyLlama dims: fused qkv
2048x2560, gate_up 2048x11264, down 5632x2048, lm_head 2048x32000) at M = 1
and 4. One worker process per build loads that build's modules (a
`sitecustomize.py` finder ahead of the editable install's, written by
scripts/module_shim.py, as for scripts/sanitize.sh); the parent asks the
workers in turns, alternating which goes first, so that both see the same
moments of a shared machine's load. A turn times one pass over enough weight copies to read more than
three times the last-level cache (the weights come from DRAM, as in a
decode step; --llc-multiple 0: one copy, from cache where it fits, which
shows the kernels' compute rate), after an untimed warm pass.

Paths: ``jax`` (default) is the XLA custom call on the library's own thread
pool, as the NNX decoder runs it (one jitted function over the copies, its
time divided by their number); ``torch`` is `kernel_seconds`, the same
kernels on torch's intra-op pool (2 threads), timed in C++ per call;
``cpu`` is `kernel_seconds` on one thread timed by that thread's CPU time
(`time.thread_time`), which other processes' load does not inflate the way
it does wall time (use it on a shared machine; the bandwidth it reports is
one core's).

Reported per case: the median per-call time of each build and its fastest
turn, the bytes read per second (packed weights + scales + zero points) and
the median (min-max) of the per-turn ratios base / new.

    .venv/bin/python scripts/bench_decode_kernel.py --new build/jkernel \\
        --base build/jkernel-base --turns 15
    # on a shared machine: one core's CPU time, from DRAM and from cache
    .venv/bin/python scripts/bench_decode_kernel.py --path cpu --turns 7
    .venv/bin/python scripts/bench_decode_kernel.py --path cpu --turns 7 --llc-multiple 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import module_shim  # scripts/: the sitecustomize.py writer sanitize.sh uses too

SHAPES = {"qkv": (2048, 2560), "gate_up": (2048, 11264), "down": (5632, 2048),
          "lm_head": (2048, 32000)}
# name: (bits, block_size, symmetric, quantize_activation, weight_format)
SCHEMES = {"w4a16-g128-sym": (4, 128, True, False, "int"),
           "w4a16-g128-asym": (4, 128, False, False, "int"),
           "w4a16-g32-sym": (4, 32, True, False, "int"), "w4a16-pc": (4, -1, True, False, "int"),
           "w8a16-g128": (8, 128, True, False, "int"), "w8a16-pc": (8, -1, True, False, "int"),
           "w4a8-g128-sym": (4, 128, True, True, "int"), "w4a8-pc": (4, -1, True, True, "int"),
           "w8a8-g128": (8, 128, True, True, "int"), "w8a8-pc": (8, -1, True, True, "int"),
           "fp8-g128": (8, 128, True, False, "fp8"), "fp8-pc": (8, -1, True, False, "fp8"),
           "fp4-g32": (4, 32, True, False, "fp4"), "fp4-pc": (4, -1, True, False, "fp4")}
LLC_BYTES = 32 << 20


def _shim(build: str) -> str:
    """A directory holding a sitecustomize.py that loads `build`'s modules."""
    shim = tempfile.mkdtemp(prefix="bench_decode_kernel_")
    module_shim.write_shim(shim, build)
    return shim


def _weights(k, n, scheme, copies, seed=0):
    """`copies` random quantized weights in the API layouts (numpy)."""
    import numpy as np
    bits, block, symmetric, _, fmt = SCHEMES[scheme]
    rng = np.random.default_rng(seed)
    groups = 1 if block == -1 else k // block
    out = []
    for _ in range(copies):
        if block == -1 and bits == 4:
            w = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
            scale = rng.uniform(1e-2, 2e-2, size=(n,)).astype(np.float32)
        elif block == -1:
            w = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
            scale = rng.uniform(1e-3, 2e-3, size=(n,)).astype(np.float32)
        elif bits == 8:
            w = rng.integers(-128, 128, size=(groups, block, n), dtype=np.int8)
            scale = rng.uniform(1e-3, 2e-3, size=(groups, n)).astype(np.float32)
        else:
            w = rng.integers(0, 256, size=(groups, block // 2, n), dtype=np.uint8)
            scale = rng.uniform(1e-2, 2e-2, size=(groups, n)).astype(np.float32)
        zp = None if symmetric else rng.uniform(-0.1, 0.1, size=scale.shape).astype(np.float32)
        if fmt == "fp8":  # e4m3fn bits, the NaN codes (0x7f, 0xff) made finite
            w = w.view(np.uint8) & np.uint8(0xfe)
        out.append((w, scale, zp))
    return out


class _Case:
    """One shape, scheme, row count and path, prepared in a worker."""

    def __init__(self, path, k, n, m, scheme, copies):
        import numpy as np
        bits, block, _, qa, fmt = SCHEMES[scheme]
        weights = _weights(k, n, scheme, copies)
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        self.args = (block, bits, qa, fmt)
        if path in ("torch", "cpu"):
            import torch
            from torch_bridge import _torch_ops  # noqa: F401  (registers the operator)
            torch.set_num_threads(2 if path == "torch" else 1)
            self.x = torch.from_numpy(x).to(torch.bfloat16)
            self.w = [torch.from_numpy(w) for w, _, _ in weights]
            self.s = [torch.from_numpy(s) for _, s, _ in weights]
            self.z = [None if z is None else torch.from_numpy(z) for _, _, z in weights]
            self.run = self._torch if path == "torch" else self._cpu
        else:
            import jax
            import jax.numpy as jnp
            import xla_qops
            xj = jnp.asarray(x, jnp.bfloat16)
            ws = [tuple(None if a is None else jnp.asarray(a) for a in t) for t in weights]
            if fmt == "fp8":  # the op takes e4m3fn storage; the torch path's bytes are uint8
                ws = [(jax.lax.bitcast_convert_type(w, jnp.float8_e4m3fn), s, z) for w, s, z in ws]

            # The op's names for the formats: None for the integer ones (int4_weight
            # says which), the float ones by name.
            op_format = None if fmt == "int" else fmt

            def all_copies(x, ws):
                return [xla_qops.quantized_matmul(
                    x, w, s, z, block_size=block, int4_weight=bits == 4, quantize_activation=qa,
                    weight_format=op_format, impl="custom_call") for w, s, z in ws]
            fn = jax.jit(all_copies)
            self.run = lambda: self._jax(fn, xj, ws)
        self.copies = copies

    def _torch(self):
        import torch
        block, bits, qa, fmt = self.args
        times = torch.ops.xla_qops_cpu.kernel_seconds(self.x, self.w, self.s, self.z, block,
                                                      bits, qa, 1, fmt)
        return float(times.sum()) / self.copies

    def _cpu(self):
        import time
        start = time.thread_time()
        self._torch()
        return (time.thread_time() - start) / self.copies

    def _jax(self, fn, x, ws):
        import time

        import jax
        start = time.perf_counter()
        jax.block_until_ready(fn(x, ws))
        return (time.perf_counter() - start) / self.copies


def worker(path: str) -> None:
    """Answers one JSON request a line: {"case": [...]} prepares, {"time": n} times n passes."""
    from xla_qops import _cpu_kernels
    from torch_bridge import _torch_ops
    print(json.dumps({"modules": [_cpu_kernels.__file__, _torch_ops.__file__]}), flush=True)
    case = None
    for line in sys.stdin:
        req = json.loads(line)
        if "case" in req:
            case = None
            case = _Case(path, *req["case"])
            case.run()  # compile, first touch of the pages
            print(json.dumps({"ready": True}), flush=True)
        else:
            case.run()  # warm: this build's threads awake, as a model's previous layer leaves them
            print(json.dumps({"seconds": [case.run() for _ in range(req["time"])]}), flush=True)


def _ask(proc, req):
    proc.stdin.write(json.dumps(req) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker died (exit {proc.wait()}); see its stderr above")
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", default="build/jkernel")
    ap.add_argument("--base", default="build/jkernel-base")
    ap.add_argument("--path", choices=("jax", "torch", "cpu"), default="jax")
    ap.add_argument("--turns", type=int, default=15)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--llc-multiple", type=float, default=3.0,
                    help="weight copies to read per pass, in multiples of the last-level cache "
                         "(default 3: from DRAM, as in a decode step; 0: one copy, from cache "
                         "where it fits: the kernels' compute rate)")
    ap.add_argument("--json", help="write every turn's times here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    for name, given, known in (("--schemes", args.schemes, SCHEMES), ("--shapes", args.shapes, SHAPES)):
        unknown = [v for v in given.split(",") if v not in known]
        if unknown:
            ap.error(f"{name}: expected names from {', '.join(known)}, got {', '.join(unknown)}")
    if not all(r.isdigit() and 1 <= int(r) <= 16 for r in args.rows.split(",")):
        ap.error(f"--rows: expected comma-separated row counts 1..16 (the decode forms), got {args.rows}")
    if args.turns < 1 or args.llc_multiple < 0:
        ap.error(f"--turns: expected >= 1 (got {args.turns}); --llc-multiple: expected >= 0 "
                 f"(got {args.llc_multiple})")

    procs = {}
    for label, build in (("base", args.base), ("new", args.new)):
        env = dict(os.environ, PYTHONPATH=_shim(build) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PJRT_DEVICE="CPU", JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE",
                   GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
        procs[label] = subprocess.Popen([sys.executable, __file__, "--worker", args.path],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=env)
        modules = json.loads(procs[label].stdout.readline())["modules"]
        if not all(os.path.abspath(mod).startswith(os.path.abspath(build)) for mod in modules):
            raise SystemExit(f"{label}: loaded {modules}, not {build}'s modules")
        print(f"{label}: {modules[0]}", flush=True)

    results = []
    print(f"{'case':38} {'base us':>9} {'new us':>9} {'base GB/s':>10} {'new GB/s':>9} "
          f"{'fastest b/n us':>15} {'base/new per turn':>22}")
    for scheme in args.schemes.split(","):
        bits, block, symmetric, _, _ = SCHEMES[scheme]
        for shape in args.shapes.split(","):
            k, n = SHAPES[shape]
            groups = 1 if block == -1 else k // block
            nbytes = k * n * bits // 8 + groups * n * 4 * (1 if symmetric else 2)
            copies = max(2, -(-int(args.llc_multiple * LLC_BYTES) // nbytes)) if args.llc_multiple else 1
            for m in (int(r) for r in args.rows.split(",")):
                for p in procs.values():
                    _ask(p, {"case": [k, n, m, scheme, copies]})
                times = {label: [] for label in procs}
                order = list(procs)
                for turn in range(args.turns):
                    for label in (order if turn % 2 == 0 else order[::-1]):
                        times[label].append(statistics.median(_ask(procs[label], {"time": 3})["seconds"]))
                med = {lb: statistics.median(v) for lb, v in times.items()}
                ratios = [b / nw for b, nw in zip(times["base"], times["new"])]
                row = dict(scheme=scheme, shape=shape, k=k, n=n, m=m, bytes=nbytes, copies=copies,
                           times=times)
                results.append(row)
                name = f"{scheme} {shape} {k}x{n} M={m}"
                print(f"{name:38} {med['base'] * 1e6:9.1f} {med['new'] * 1e6:9.1f} "
                      f"{nbytes / med['base'] / 1e9:10.1f} {nbytes / med['new'] / 1e9:9.1f} "
                      f"{min(times['base']) * 1e6:7.1f}/{min(times['new']) * 1e6:<7.1f} "
                      f"{statistics.median(ratios):6.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
                      flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
