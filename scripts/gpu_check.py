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

Then the float element formats (API.md section 7, issue F), through the
public surface (``xla_qops.quantized_matmul(x, qw, impl=...)`` jitted) for
``impl="pallas"`` (the Triton kernel; fp8 dot operands on Hopper) and
``impl="xla"`` (the fused XLA path: the fp8 weight enters ``dot_general`` as
e4m3fn): bf16 x fp8 (W8A16-fp8), fp8 x fp8 (W8A8-fp8, activations quantized
per token), bf16 x fp4 (W4A16-mxfp4 g32 and -nvfp4 g16), each against the
bf16 ``jnp.dot`` at M = 1, 16, 256, 4096, checked against the float64
reference like the integer rows (all rows up to M = 256, a sample of rows
beyond). An impl that declines a format says so in its row (DECLINED, with
the reason) rather than failing the run; `run_formats` is shared with
scripts/tpu_check.py.

It writes a markdown table (default gpu_check.md) and prints it, and stops
starting new cases after a time budget (default 240 s, the integer section
at most half of it) so the whole run stays under 5 minutes; a cut-short
table says so.

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


@dataclasses.dataclass(frozen=True)
class FormatScheme:
    """A weight element format of API.md section 7, as quantize_weight makes
    it (symmetric), timed through the public surface."""
    name: str
    format: str  # "int8", or quantize_weight's float format: "fp8", "mxfp4", "nvfp4"
    block_size: int
    # Activations quantized: fp8 for the float formats, int8 for "int8".
    quantize_activation: bool

    def quantize(self, w_float):
        if self.format == "int8":
            return xla_qops.quantize_weight(w_float, bits=8, block_size=self.block_size)
        return xla_qops.quantize_weight(w_float, format=self.format, block_size=self.block_size)


FLOAT_SCHEMES = (
    FormatScheme("bf16 x fp8 (W8A16-fp8 pc)", "fp8", -1, False),
    FormatScheme("fp8 x fp8 (W8A8-fp8 pc)", "fp8", -1, True),
    FormatScheme("bf16 x fp4 (W4A16-mxfp4 g32)", "mxfp4", 32, False),
    FormatScheme("bf16 x fp4 (W4A16-nvfp4 g16)", "nvfp4", 16, False),
)
FLOAT_IMPLS = ("pallas", "xla")
FLOAT_MS = (1, 16, 256, 4096)
# Beyond this M the float64 check takes a sample of rows (the first, the last
# and others) so that the reference stays cheap at M = 4096.
CHECK_ALL_ROWS_UP_TO = 256


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


def check_rows(m: int, rng) -> np.ndarray:
    """Rows of x to check: all up to CHECK_ALL_ROWS_UP_TO, else the first and
    last 16 and 224 others."""
    if m <= CHECK_ALL_ROWS_UP_TO:
        return np.arange(m)
    middle = 16 + rng.choice(m - 32, size=CHECK_ALL_ROWS_UP_TO - 32, replace=False)
    return np.array(sorted([*range(16), *middle.tolist(), *range(m - 16, m)]))


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


def float_error_ratio(y, x, qw, quantize_activation, rows, cols) -> float:
    """max |y - reference| / tolerance over the given rows and columns, for a
    symmetric weight of any format (API.md section 7; fp8 activations with
    quantize_activation for the float formats, int8 for int8)."""
    w, scale = np.asarray(qw.w), np.asarray(qw.scale)
    if qw.block_size == -1:
        w, scale = w[cols], scale[cols]
    else:
        w, scale = w[..., cols], scale[..., cols]
    x = np.asarray(x.astype(jnp.float32))[rows]
    is_int = qw.format == "int"
    formats = dict(weight_format=None if is_int else qw.format,
                   activation_format="fp8" if quantize_activation and not is_int else None)
    expected = ref.quantized_matmul(x, w, scale, None, qw.block_size, False,
                                    quantize_activation, **formats)
    tol = ref.tolerance(x, w, scale, None, qw.block_size, np.dtype(jnp.bfloat16),
                        quantize_activation, **formats)
    err = np.abs(np.asarray(y, np.float64)[np.ix_(rows, cols)] - expected)
    return float((err / tol).max())


@dataclasses.dataclass
class FloatRow:
    shape: str
    m: int
    scheme: str
    impl: str
    declined: str | None  # why the impl did not take the format, else None
    err_ratio: float = float("nan")
    t_impl: float = float("nan")
    t_bf16: float = float("nan")
    weight_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.declined is not None or self.err_ratio <= 1.0


def run_formats(shape_list, ms, *, schemes=FLOAT_SCHEMES, impls=FLOAT_IMPLS, reps: int,
                deadline: float, seed: int = 0):
    """Each scheme (FormatScheme) through `xla_qops.quantized_matmul(impl=...)`,
    against bf16 jnp.dot, until `deadline` (time.perf_counter()). Returns
    (rows, skipped case count)."""
    rng = np.random.default_rng(seed)
    rows, skipped = [], 0
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32
                                         ).astype(x.dtype))
    for k, n in shape_list:
        w_float = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        w_bf16 = jnp.asarray(w_float.T, jnp.bfloat16)  # [K, N] for jnp.dot
        for scheme in schemes:
            qw = scheme.quantize(w_float)
            for impl in impls:
                # The weight is an argument, not a constant XLA could fold.
                fn = jax.jit(lambda x, qw, qa=scheme.quantize_activation, impl=impl:
                             xla_qops.quantized_matmul(x, qw, quantize_activation=qa,
                                                       impl=impl))
                declined = None
                for m in ms:
                    if time.perf_counter() > deadline:
                        skipped += 1
                        continue
                    row = FloatRow(f"{k}x{n}", m, scheme.name, impl, declined,
                                   weight_bytes=qw.nbytes)
                    rows.append(row)
                    if declined:
                        continue
                    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                    try:
                        y = fn(x, qw)
                    except (ValueError, NotImplementedError) as e:  # the impl declines
                        declined = row.declined = str(e).splitlines()[0][:160]
                        continue
                    row.err_ratio = float_error_ratio(y, x, qw, scheme.quantize_activation,
                                                      check_rows(m, rng),
                                                      check_columns(n, 128, rng))
                    row.t_impl = median_seconds(fn, x, qw, reps=reps)
                    row.t_bf16 = median_seconds(dense, x, w_bf16, reps=reps)
    return rows, skipped


def formats_markdown(rows, skipped, title="Float element formats (API.md section 7) "
                     "through the public surface") -> list[str]:
    """A `run_formats` section of a check's markdown (gpu_check, tpu_check)."""
    lines = [
        "",
        f"## {title}",
        "",
        "xla_qops.quantized_matmul(x, qw, impl=...) jitted, symmetric weights; err/tol: "
        "largest |error| over the float64 reference's tolerance (<= 1 passes), all rows up "
        f"to M = {CHECK_ALL_ROWS_UP_TO} (a sample beyond), sampled columns; times: medians "
        "in us; bf16 dot: jnp.dot on the bf16 weight; vs bf16 > 1 means faster than bf16.",
        "",
        "| shape (in x out) | M | operands | impl | err/tol | us | bf16 dot us | vs bf16 "
        "| weight GB/s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.declined:
            lines.append(f"| {r.shape} | {r.m} | {r.scheme} | {r.impl} | DECLINED: "
                         f"{r.declined.replace('|', '/')} | – | – | – | – |")
            continue
        lines.append(
            f"| {r.shape} | {r.m} | {r.scheme} | {r.impl} | "
            f"{r.err_ratio:.2f}{'' if r.ok else ' FAIL'} | {r.t_impl * 1e6:.1f} | "
            f"{r.t_bf16 * 1e6:.1f} | {r.t_bf16 / r.t_impl:.2f}x | "
            f"{r.weight_bytes / r.t_impl / 1e9:.0f} |")
    if skipped:
        lines += ["", f"CUT SHORT: {skipped} float-format cases not run within the time "
                      "budget."]
    return lines


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
             elapsed: float, float_rows=(), float_skipped: int = 0) -> str:
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
    if float_rows or float_skipped:
        lines += formats_markdown(float_rows, float_skipped)
    return "\n".join(lines) + "\n"


def argument_parser(description: str, out: str, budget_help: str,
                    dry_run_help: str) -> argparse.ArgumentParser:
    """The options a device check takes (gpu_check, tpu_check)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=out, help="markdown file to write")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--budget", type=float, default=240.0, help=budget_help)
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    return parser


def print_declined(tool: str, rows) -> None:
    """Names on stderr each (scheme, impl) that declined a format: reported,
    not a failure."""
    declined = sorted({(r.scheme, r.impl) for r in rows if r.declined})
    if declined:
        print(f"{tool}: declined (not failures): "
              + "; ".join(f"{s} impl={i}" for s, i in declined), file=sys.stderr)


def main(argv=None) -> int:
    args = argument_parser(
        __doc__.split("\n\n")[0], "gpu_check.md",
        "seconds after which no new case is started (the integer schemes stop at half "
        "of it, the float formats take the rest)",
        "on the CPU: interpret mode, small shapes (tests the script)").parse_args(argv)

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
                        budget_s=args.budget / 2)
    float_rows, float_skipped = run_formats(
        shape_list, DRY_RUN_MS if args.dry_run else FLOAT_MS, reps=args.reps,
        deadline=t0 + args.budget)
    text = markdown(rows, skipped, device=device, dry_run=args.dry_run,
                    triton_dispatch=triton_dispatch, elapsed=time.perf_counter() - t0,
                    float_rows=float_rows, float_skipped=float_skipped)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    failed = [r for r in rows + float_rows if not r.ok]
    print_declined("gpu_check", float_rows)
    if failed or not triton_dispatch or skipped or float_skipped:
        print(f"gpu_check: {len(failed)} cases outside tolerance, "
              f"{skipped + float_skipped} not run, "
              f"Triton dispatch {'ok' if triton_dispatch else 'MISSING'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
