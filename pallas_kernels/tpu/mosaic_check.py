"""Runs Mosaic's own layout passes on a TPU kernel, on a machine without a TPU.

`jax.export(..., platforms=["tpu"])` only serializes the Mosaic module into the
``tpu_custom_call``'s backend config; the passes that decide whether Mosaic can
lay the kernel out in vector registers (memref layout inference,
canonicalization, vector layout inference, relayout insertion, vector layout
application) run later, inside libtpu. jaxlib ships the same passes, so this
module takes the serialized kernel bodies out of an exported module -- exactly
what would be shipped to a TPU -- and runs them here for a given TPU
generation. That catches the common Mosaic rejections: unaligned or
unprovable slice offsets, unsupported shape casts, dtype conversions or
reductions without a layout, bad block shapes. What it cannot check is what
comes after (LLO lowering, instruction selection per generation, register
allocation, the VMEM limit): that needs hardware.

Uses jaxlib's MLIR bindings and the private `jax._src.lib.tpu` dialect
registration; the project pins jax==0.7.1 and the tests include a negative
control, so a silent change would show.
"""

from __future__ import annotations

import base64
import dataclasses
import re

import jax
from jax import export
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import tpu as tpu_dialect
from jaxlib.mlir import ir
from jaxlib.mlir.passmanager import PassManager

# The base64 kernel body inside a tpu_custom_call backend config (the module
# text escapes its quotes).
_Q = r'(?:\\22|\\"|")'  # a quote as printed: \22, \" or "
_BODY = re.compile(rf"custom_call_config{_Q}\s*:\s*\{{{_Q}body{_Q}\s*:\s*{_Q}([A-Za-z0-9+/=]+)")


@dataclasses.dataclass(frozen=True)
class PassResult:
    generation: int
    ok: bool
    failed_pass: str | None = None
    error: str | None = None


def mosaic_modules(fn, *args) -> list[bytes]:
    """Exports `fn(*args)` for TPU and returns every serialized Mosaic kernel in it."""
    text = export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    return [base64.b64decode(body) for body in _BODY.findall(text)]


def _pipeline(generation: int) -> list[str]:
    mxu = 128 if generation < 6 else 256
    vreg = "sublane-count=8 lane-count=128"
    gen = f"hardware-generation={generation}"
    return [
        f"func.func(tpu-infer-memref-layout{{{gen}}})",
        "canonicalize",
        f"func.func(tpu-canonicalize-mosaic{{{gen}}})",
        f"func.func(tpu-infer-vector-layout{{{gen} {vreg}}})",
        f"func.func(tpu-relayout-insertion{{{gen} {vreg}}})",
        f"func.func(tpu-apply-vector-layout{{{gen} {vreg} mxu-contracting-size={mxu}}})",
    ]


def run_layout_passes(module: bytes, generation: int) -> PassResult:
    """Runs the layout pipeline for one TPU generation on a serialized kernel."""
    ctx = jax_mlir.make_ir_context()
    tpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    with ctx:
        mod = ir.Module.parse(module)
        for step in ["mosaic-serde{serialize=false}"] + _pipeline(generation):
            try:
                PassManager.parse(f"builtin.module({step})").run(mod.operation)
            except Exception as e:  # MLIRError carries the diagnostics
                return PassResult(generation, False, step.split("{")[0], str(e))
    return PassResult(generation, True)


def check(fn, *args, generations=(5, 6)) -> list[PassResult]:
    """Exports `fn` for TPU and runs the layout passes on each of its kernels."""
    modules = mosaic_modules(fn, *args)
    if not modules:
        raise ValueError("fn: exporting it for TPU produced no Mosaic kernel")
    return [run_layout_passes(m, g) for m in modules for g in generations]
