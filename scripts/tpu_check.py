"""The quantized matmul on a real TPU (v5e, v6e, v7): correct, and how fast.

Run through scripts/tpu_check.sh on a TPU VM with a TPU-enabled JAX already
installed (jax[tpu]); it installs nothing and needs no network: the
repository is used from its source tree (PYTHONPATH), and only jax, jaxlib
and numpy are imported.

What differs between the generations (JAX's jax/_src/tpu_info.py): v5e and
v6e have an int8 MXU path and no native fp8 operand (e4m3fn is converted to
bf16 in VMEM there), v7 (Ironwood) has no int8 MXU path and runs e4m3fn at
twice bf16 (bf16 x e4m3fn and e4m3fn x e4m3fn operand pairs). So for every
Llama-3-8B layer shape (`pallas_kernels.shapes.LLAMA3_8B`) and M = 1, 16,
256, 4096 (bf16 activations, symmetric weights) it times, through the public
surface (``xla_qops.quantized_matmul(x, qw, impl=...)`` jitted) with
``impl="pallas"`` (the Mosaic kernel) and ``impl="xla"`` (the fused XLA
path):

* bf16 x int8 (W8A16) and int8 x int8 (W8A8), the int8 forms;
* bf16 x fp8 (W8A16-fp8), fp8 x fp8 (W8A8-fp8), bf16 x fp4 (W4A16-mxfp4 g32
  and -nvfp4 g16), API.md section 7's float formats;

each against ``jnp.dot`` on the bf16 weight and checked against the float64
reference (tests/numpy_reference.py) with its derived tolerance. An impl
that declines a format says so in its row. The header gives the chip's
peak bf16 / int8 / fp8 rates as JAX records them, and whether
``impl="pallas"`` lowers to the Mosaic kernel (``tpu_custom_call``) for each
format on this chip.

The case runner and the table are scripts/gpu_check.py's (`run_formats`,
`formats_markdown`). It writes a markdown table (default tpu_check.md) and
prints it, and stops starting new cases after a time budget (default 240 s)
so that the whole run stays under 5 minutes; a cut-short table says so.

``--dry-run`` runs the same code on the CPU (Pallas in interpret mode, small
shapes; the times mean nothing) and lowers ``impl="pallas"`` for each TPU
generation of `TARGET_KINDS` without a TPU (tests/test_gpu_check.py does, in
CI).
"""

from __future__ import annotations

import datetime
import os
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import export  # noqa: E402

import gpu_check  # noqa: E402  (scripts/gpu_check.py: the shared case runner)
import xla_qops  # noqa: E402
from gpu_check import FLOAT_SCHEMES, FormatScheme  # noqa: E402
from pallas_kernels import jax_compat, shapes  # noqa: E402

MOSAIC = "tpu_custom_call"
# The generations a dry run lowers for, by the device kind each reports (the
# names jax/_src/tpu_info.py matches).
TARGET_KINDS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v7": "TPU7x"}
INT8_SCHEMES = (
    FormatScheme("bf16 x int8 (W8A16 pc)", "int8", -1, False),
    FormatScheme("int8 x int8 (W8A8 pc)", "int8", -1, True),
)
SCHEMES = INT8_SCHEMES + FLOAT_SCHEMES
IMPLS = ("pallas", "xla")
MS = (1, 16, 256, 4096)
DRY_RUN_SHAPES = gpu_check.DRY_RUN_SHAPES
DRY_RUN_MS = gpu_check.DRY_RUN_MS


def chip_rates(device_kind: str) -> str:
    """The chip's peak bf16 / int8 / fp8 rates as JAX records them, or why not."""
    try:
        from jax._src import tpu_info
        version = tpu_info.chip_version_from_device_kind(device_kind)
        if version is None:
            return f"JAX does not know the device kind {device_kind!r}"
        info = tpu_info.get_tpu_info_for_chip(version, 1)
    except (ImportError, AttributeError, ValueError) as e:  # older JAX: no tpu_info
        return f"unknown ({type(e).__name__}: {e})"

    def rate(v):
        return f"{v / 1e12:.0f} TOP/s" if v else "none"
    return (f"per TensorCore: bf16 {rate(info.bf16_ops_per_second)}, int8 "
            f"{rate(info.int8_ops_per_second)}, fp8 {rate(info.fp8_ops_per_second)}")


def pallas_lowering(scheme: FormatScheme, device_kind: str | None, k=256, n=256) -> str:
    """How impl="pallas" lowers `scheme` for a TPU of `device_kind`: "Mosaic"
    (a tpu_custom_call), "no Mosaic kernel" or "declined: <why>". On a TPU
    (device_kind None) for the attached chip; else exported for that kind."""
    rng = np.random.default_rng(1)
    qw = scheme.quantize(rng.standard_normal((n, k)).astype(np.float32))
    x = jnp.zeros((16, k), jnp.bfloat16)
    fn = jax.jit(lambda x, qw: xla_qops.quantized_matmul(
        x, qw, quantize_activation=scheme.quantize_activation, impl="pallas"))
    try:
        if device_kind is None:
            text = fn.lower(x, qw).as_text()
        else:
            with jax_compat.lowering_target("tpu", device_kind):
                text = export.export(fn, platforms=["tpu"])(x, qw).mlir_module()
    except (ValueError, NotImplementedError) as e:
        return "declined: " + str(e).splitlines()[0][:120]
    return "Mosaic" if MOSAIC in text else "no Mosaic kernel"


def dispatch_table(kinds: dict[str, str | None]) -> list[str]:
    """impl="pallas"'s lowering of every scheme for each named TPU."""
    lines = ["| operands | " + " | ".join(kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for scheme in SCHEMES:
        cells = [pallas_lowering(scheme, kind).replace("|", "/") for kind in kinds.values()]
        lines.append(f"| {scheme.name} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows, skipped, *, device: str, dry_run: bool, dispatch: list[str],
             rates: str, elapsed: float) -> str:
    lines = [
        "# Quantized matmul on " + device,
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"jax {jax.__version__}, {len(rows)} cases in {elapsed:.0f} s"
        + (" (DRY RUN on the CPU: interpret mode, small shapes; the times mean "
           "nothing)" if dry_run else ""),
        "",
        f"Chip peak rates (jax/_src/tpu_info.py): {rates}",
        "",
        'impl="pallas" lowering (Mosaic = a tpu_custom_call):',
        "",
        *dispatch,
    ]
    lines += gpu_check.formats_markdown(rows, skipped, title="int8 and float element "
                                        "formats through the public surface")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = gpu_check.argument_parser(
        __doc__.split("\n\n")[0], "tpu_check.md",
        "seconds after which no new case is started",
        "on the CPU: interpret mode, small shapes, lowering for each TPU generation "
        "(tests the script)").parse_args(argv)

    on_tpu = jax.default_backend() == "tpu"
    if not args.dry_run and not on_tpu:
        print(f"tpu_check: error: no TPU: JAX's default backend is {jax.default_backend()!r} "
              f"(devices {jax.devices()}); install jax[tpu] on a TPU VM, or pass --dry-run "
              f"to exercise the script on the CPU", file=sys.stderr)
        return 2
    device = jax.devices()[0].device_kind
    t0 = time.perf_counter()
    if on_tpu:
        dispatch = dispatch_table({device: None})
        rates = chip_rates(device)
    else:
        dispatch = dispatch_table(TARGET_KINDS)
        rates = "; ".join(f"{name}: {chip_rates(kind)}" for name, kind in TARGET_KINDS.items())
    rows, skipped = gpu_check.run_formats(
        DRY_RUN_SHAPES if args.dry_run else shapes.LLAMA3_8B,
        DRY_RUN_MS if args.dry_run else MS, schemes=SCHEMES, impls=IMPLS, reps=args.reps,
        deadline=t0 + args.budget)
    text = markdown(rows, skipped, device=device, dry_run=args.dry_run, dispatch=dispatch,
                    rates=rates, elapsed=time.perf_counter() - t0)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    failed = [r for r in rows if not r.ok]
    gpu_check.print_declined("tpu_check", rows)
    if failed or skipped:
        print(f"tpu_check: {len(failed)} cases outside tolerance, {skipped} not run",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
