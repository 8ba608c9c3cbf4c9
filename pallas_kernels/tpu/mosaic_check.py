"""Runs Mosaic's own layout passes on a TPU kernel, on a machine without a TPU.

`jax.export(..., platforms=["tpu"])` only serializes the Mosaic module; the
passes that decide whether Mosaic can actually lay the kernel out in vector
registers (memref layout inference, canonicalization, vector layout inference,
relayout insertion, vector layout application) run later, inside libtpu. jaxlib
ships the same passes, so this module captures the Mosaic module that export
produces and runs them here for a given TPU generation. That catches the
common Mosaic rejections: unaligned or unprovable slice offsets, unsupported
shape casts, dtype conversions or reductions without a layout, bad block
shapes. What it cannot check is what comes after (LLO lowering, instruction
selection per generation, register allocation, the VMEM limit): that needs
hardware.

This reaches into private JAX APIs (`jax._src.tpu_custom_call`); the project
pins jax==0.7.1, and the tests fail loudly if the hook stops matching.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
from jax import export
from jax._src import tpu_custom_call
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import tpu as tpu_dialect
from jaxlib.mlir import ir
from jaxlib.mlir.passmanager import PassManager


@dataclasses.dataclass(frozen=True)
class PassResult:
    generation: int
    ok: bool
    failed_pass: str | None = None
    error: str | None = None


@contextlib.contextmanager
def _capture_mosaic_modules(sink: list):
    original = tpu_custom_call._lower_mosaic_module_to_asm

    def spy(module, **kwargs):
        sink.append(module.operation.get_asm(binary=True))
        return original(module, **kwargs)

    tpu_custom_call._lower_mosaic_module_to_asm = spy
    try:
        yield
    finally:
        tpu_custom_call._lower_mosaic_module_to_asm = original


def mosaic_modules(fn, *args) -> list[bytes]:
    """Exports `fn(*args)` for TPU and returns every Mosaic kernel module in it."""
    modules: list[bytes] = []
    with _capture_mosaic_modules(modules):
        export.export(jax.jit(fn), platforms=["tpu"])(*args)
    return modules


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
    """Runs the layout pipeline for one TPU generation on a captured module."""
    ctx = jax_mlir.make_ir_context()
    tpu_dialect.register_dialect(ctx)
    with ctx:
        mod = ir.Module.parse(module)
        for step in _pipeline(generation):
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
