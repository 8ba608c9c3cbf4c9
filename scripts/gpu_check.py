"""The Pallas GPU (Triton) kernels on a real NVIDIA GPU: correct, and how fast.

Run through scripts/gpu_check.sh on a machine with an NVIDIA GPU and a
CUDA-enabled JAX already installed (e.g. JAX 0.11-0.12 with CUDA 13); it
installs nothing and needs no network: the repository is used from its
source tree (PYTHONPATH), and only jax, jaxlib and numpy are imported.

For every scheme the GPU kernel supports (API.md's eight rows: W8A16, W4A16,
W8A8, W4A8, per-channel and blockwise g128, with zero points, int4 packed),
every Llama-3-8B layer shape (`pallas_kernels.shapes.LLAMA3_8B`) and M = 1,
16, 256 (bf16 activations):

* correctness: the kernel's result against the float64 reference
  (tests/numpy_reference.py) with its derived tolerance, on every row and on
  a sample of output columns that includes the first and the last tile;
* dispatch: ``impl="pallas"`` lowers to the Triton kernel on this GPU;
* speed: the median time of the kernel, of ``jnp.dot`` on the bf16 weight
  (what an unquantized layer costs), and of the float path that dequantizes
  the weight in every call (``x @ dequantize(w).T`` in bf16, jitted).

It writes a markdown table (default gpu_check.md) and prints it, and stops
starting new cases after a time budget (default 240 s) so the whole run stays
under 5 minutes; a cut-short table says so.

``--dry-run`` runs the same code on the CPU with the kernel in Pallas
interpret mode and small shapes (tests/test_gpu_check.py does, in CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import numpy_reference as ref  # noqa: E402  (tests/numpy_reference.py)
import xla_qops  # noqa: E402
from pallas_kernels import jax_compat, shapes  # noqa: E402
from pallas_kernels.gpu import quantized_matmul as gpu_kernel  # noqa: E402

TRITON = "__gpu$xla.gpu.triton"
DRY_RUN_SHAPES = (shapes.Linear(256, 384, "dry run"),)
DRY_RUN_MS = (1, 16)


@dataclasses.dataclass(frozen=True)
class Scheme:
    bits: int
    block_size: int
    quantize_activation: bool

    @property
    def name(self) -> str:
        layout = "pc" if self.block_size == -1 else f"g{self.block_size}"
        return f"W{self.bits}A{8 if self.quantize_activation else 16} {layout}"


# API.md's eight rows, asymmetric (zero points), int4 packed.
SCHEMES = tuple(Scheme(bits, block, qa) for bits in (8, 4) for block in (-1, 128)
                for qa in (False, True))


@dataclasses.dataclass
class Row:
    shape: str
    m: int
    scheme: str
    err_ratio: float  # max |error| / tolerance over the checked entries (<= 1 passes)
    t_kernel: float
    t_bf16: float
    t_dequant: float
    weight_bytes: int

    @property
    def ok(self) -> bool:
        return self.err_ratio <= 1.0


def median_seconds(fn, *args, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_columns(n: int, tile: int, rng) -> np.ndarray:
    """Output columns to check: the first and last tile, and 256 others."""
    cols = set(range(min(tile, n))) | set(range(max(0, n - tile), n))
    cols |= set(rng.choice(n, size=min(256, n), replace=False).tolist())
    return np.array(sorted(cols))


def error_ratio(y, x, qw, qa, cols) -> float:
    """max |y - reference| / tolerance over all rows and the given columns."""
    w = np.asarray(qw.w)
    scale = np.asarray(qw.scale)
    zero = np.asarray(qw.zero_point)
    if qw.block_size == -1:
        w, scale, zero = w[cols], scale[cols], zero[cols]
    else:
        w, scale, zero = w[..., cols], scale[..., cols], zero[..., cols]
    x = np.asarray(x.astype(jnp.float32))
    expected = ref.quantized_matmul(x, w, scale, zero, qw.block_size, False, qa)
    tol = ref.tolerance(x, w, scale, zero, qw.block_size, np.dtype(jnp.bfloat16), qa)
    err = np.abs(np.asarray(y, np.float64)[:, cols] - expected)
    return float((err / tol).max())


def run(shape_list, ms, *, interpret: bool, reps: int, budget_s: float, seed: int = 0):
    """Returns (rows, skipped case count)."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    rows, skipped = [], 0
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32
                                         ).astype(x.dtype))
    for k, n in shape_list:
        w_float = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        w_float += rng.uniform(-0.01, 0.01, (n, 1)).astype(np.float32)  # offsets: zero points
        w_bf16 = jnp.asarray(w_float.T, jnp.bfloat16)  # [K, N] for jnp.dot
        for scheme in SCHEMES:
            qw = xla_qops.quantize_weight(w_float, bits=scheme.bits,
                                          block_size=scheme.block_size, symmetric=False)
            qa = scheme.quantize_activation

            def kernel(x, qw=qw, qa=qa):
                return gpu_kernel.quantized_matmul(
                    x, qw.w, qw.scale, qw.zero_point, block_size=qw.block_size,
                    quantize_activation=qa, interpret=interpret)

            kernel = jax.jit(kernel)
            dequant = jax.jit(lambda x, qw=qw: x @ qw.dequantize(x.dtype).T)
            for m in ms:
                if time.perf_counter() - start > budget_s:
                    skipped += 1
                    continue
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                y = kernel(x)
                cols = check_columns(n, 128, rng)
                rows.append(Row(
                    shape=f"{k}x{n}", m=m, scheme=scheme.name,
                    err_ratio=error_ratio(y, x, qw, qa, cols),
                    t_kernel=median_seconds(kernel, x, reps=reps),
                    t_bf16=median_seconds(dense, x, w_bf16, reps=reps),
                    t_dequant=median_seconds(dequant, x, reps=reps),
                    weight_bytes=qw.nbytes))
    return rows, skipped


def impl_pallas_lowers_to_triton(k=256, n=256) -> bool:
    """Whether quantized_matmul(..., impl="pallas") lowers to the Triton kernel
    here (on a GPU) or for an abstract H100 (dry run on a CPU)."""
    rng = np.random.default_rng(1)
    qw = xla_qops.quantize_weight(rng.standard_normal((n, k)).astype(np.float32), bits=4,
                                  block_size=128, symmetric=False)
    x = jnp.zeros((16, k), jnp.bfloat16)
    fn = jax.jit(lambda x: xla_qops.quantized_matmul(x, qw, impl="pallas"))
    if jax.default_backend() == "gpu":
        return TRITON in fn.lower(x).as_text()
    from jax import export
    with jax_compat.lowering_target("cuda"):
        text = export.export(fn, platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)]
                             )(x).mlir_module()
    return TRITON in text


def markdown(rows, skipped, *, device: str, dry_run: bool, triton_dispatch: bool,
             elapsed: float) -> str:
    lines = [
        "# Pallas GPU kernels on " + device,
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"jax {jax.__version__}, {len(rows)} cases in {elapsed:.0f} s"
        + (" (DRY RUN on the CPU: interpret mode, small shapes; the times mean "
           "nothing)" if dry_run else ""),
        "",
        f"impl=\"pallas\" lowers to the Triton kernel: {'yes' if triton_dispatch else 'NO'}",
        "",
        "err/tol: largest |error| over the float64 reference's tolerance "
        "(<= 1 passes), all rows, sampled columns. Times: medians in us; bf16 "
        "dot: jnp.dot on the bf16 weight; dequant: x @ dequantize(w).T per call.",
        "",
        "| shape (in x out) | M | scheme | err/tol | kernel us | bf16 dot us | dequant us "
        "| vs bf16 | vs dequant | weight GB/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.m} | {r.scheme} | {r.err_ratio:.2f}{'' if r.ok else ' FAIL'} | "
            f"{r.t_kernel * 1e6:.1f} | {r.t_bf16 * 1e6:.1f} | {r.t_dequant * 1e6:.1f} | "
            f"{r.t_bf16 / r.t_kernel:.2f}x | {r.t_dequant / r.t_kernel:.2f}x | "
            f"{r.weight_bytes / r.t_kernel / 1e9:.0f} |")
    if skipped:
        lines += ["", f"CUT SHORT: {skipped} cases not run within the time budget."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.md", help="markdown file to write")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds after which no new case is started")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: interpret mode, small shapes (tests the script)")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    if not args.dry_run and not on_gpu:
        print(f"gpu_check: error: no GPU: JAX's default backend is {jax.default_backend()!r} "
              f"(devices {jax.devices()}); install a CUDA-enabled jax, or pass --dry-run "
              f"to exercise the script on the CPU", file=sys.stderr)
        return 2
    device = jax.devices()[0].device_kind
    t0 = time.perf_counter()
    triton_dispatch = impl_pallas_lowers_to_triton()
    shape_list = DRY_RUN_SHAPES if args.dry_run else shapes.LLAMA3_8B
    ms = DRY_RUN_MS if args.dry_run else (1, 16, 256)
    rows, skipped = run(shape_list, ms, interpret=args.dry_run, reps=args.reps,
                        budget_s=args.budget)
    text = markdown(rows, skipped, device=device, dry_run=args.dry_run,
                    triton_dispatch=triton_dispatch, elapsed=time.perf_counter() - t0)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    failed = [r for r in rows if not r.ok]
    if failed or not triton_dispatch or skipped:
        print(f"gpu_check: {len(failed)} cases outside tolerance, {skipped} not run, "
              f"Triton dispatch {'ok' if triton_dispatch else 'MISSING'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
