"""Checks a TPU kernel as Mosaic would see it, on a machine without a TPU.

`jax.export(..., platforms=["tpu"])` only serializes the Mosaic module into the
``tpu_custom_call``'s backend config; whether Mosaic can lay the kernel out in
vector registers is decided later, inside libtpu. This module takes the
serialized kernel bodies out of an exported module -- exactly what would be
shipped to a TPU -- and checks them here, in two ways:

* **Mosaic's own layout passes** (`run_layout_passes`): memref layout
  inference, canonicalization, vector layout inference, relayout insertion and
  vector layout application, for a given TPU generation -- the passes libtpu
  runs first. jaxlib registered them up to 0.8.1 (so with the pinned JAX
  0.7.1); from jaxlib 0.8.2 on they are gone from jaxlib
  (`jax_compat.mosaic_layout_passes_available`). They catch unaligned or
  unprovable slice offsets, unsupported shape casts, dtype conversions or
  reductions without a layout, and bad block shapes.
* **A structural check that needs no passes** (`structural_check`), which
  runs with every JAX version. It deserializes the module with jaxlib's own
  Mosaic dialect (so every op and type must be one this jaxlib's Mosaic
  knows, and the op verifiers run) and then checks two rules behind common
  Mosaic rejections: every dynamic offset of a vector load or store into the
  lane (last) dim of a buffer is provably a multiple of 128, and into the
  sublane (second-to-last) dim a multiple of 8 -- by constants,
  `pl.multiple_of` hints (``tpu.assume_multiple``), and sums and products of
  those (static offsets of any alignment are fine: Mosaic shifts and masks);
  and every MXU product (``tpu.matmul``) multiplies bf16 by bf16, f32 by f32
  or int8 by int8 into an f32 or int32 accumulator (Mosaic has no f16
  matmul), and from TPU v7 on also bf16 by e4m3fn or e4m3fn by e4m3fn into
  f32 (the fp8 MXU of JAX's ``tpu_info.is_matmul_supported``; before v7 an
  e4m3fn operand is widened in VMEM, and Mosaic's layout passes, which do not
  check operand types, accept it either way). Each rule has a negative control in tests/test_pallas_lowering.py
  that Mosaic's passes reject too.

  What it does not check, and the passes did: the layouts themselves
  (whether each shape cast, reduction, broadcast and dtype conversion has a
  vector layout on a given generation, and the relayouts between them). So
  with jaxlib >= 0.8.2 a kernel that passes here can still be rejected by
  libtpu for a layout reason; the pinned stack (.venv, JAX 0.7.1) runs both
  checks in CI.

Neither can see what comes after the layout passes (LLO lowering, instruction
selection per generation, register allocation, the real VMEM footprint):
that needs hardware.

Uses jaxlib's MLIR bindings and the private `jax._src.lib.tpu` dialect
registration; the tests include a negative control for both checks, so a
silent change would show.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re

import jax
from jax import export
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import tpu as tpu_dialect
from jaxlib.mlir import ir
from jaxlib.mlir.passmanager import PassManager

from pallas_kernels import jax_compat

# The base64 kernel body inside a tpu_custom_call backend config (the module
# text escapes its quotes).
_Q = r'(?:\\22|\\"|")'  # a quote as printed: \22, \" or "
_BODY = re.compile(rf"custom_call_config{_Q}\s*:\s*\{{{_Q}body{_Q}\s*:\s*{_Q}([A-Za-z0-9+/=]+)")

LANES, SUBLANES = 128, 8
STRUCTURAL = "structural"  # PassResult.failed_pass of a structural finding


@dataclasses.dataclass(frozen=True)
class PassResult:
    """One check of one kernel: Mosaic's passes for `generation`, or the
    structural check (``generation=None``)."""

    generation: int | None
    ok: bool
    failed_pass: str | None = None
    error: str | None = None


def mosaic_modules(fn, *args) -> list[bytes]:
    """Exports `fn(*args)` for TPU and returns every serialized Mosaic kernel in it."""
    text = export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    return [base64.b64decode(body) for body in _BODY.findall(text)]


def _context():
    ctx = jax_mlir.make_ir_context()
    tpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    return ctx


def _deserialize(module: bytes):
    mod = ir.Module.parse(module)
    PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(mod.operation)
    return mod


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
    """Runs Mosaic's layout pipeline for one TPU generation on a serialized kernel.

    Raises:
      RuntimeError: this jaxlib has no Mosaic layout passes (>= 0.8.2).
    """
    if not jax_compat.mosaic_layout_passes_available():
        raise RuntimeError("run_layout_passes: this jaxlib does not register Mosaic's "
                           "layout passes (removed in jaxlib 0.8.2); use structural_check")
    with _context():
        mod = ir.Module.parse(module)
        for step in ["mosaic-serde{serialize=false}"] + _pipeline(generation):
            try:
                PassManager.parse(f"builtin.module({step})").run(mod.operation)
            except Exception as e:  # MLIRError carries the diagnostics
                return PassResult(generation, False, step.split("{")[0], str(e))
    return PassResult(generation, True)


# ------------------------------------------------------------ structural check

_ALIGNED = math.inf  # the known multiple of the constant 0: any alignment holds


def _integer(attr) -> int | None:
    try:  # a cast that fails for a non-integer attribute (float constants)
        return ir.IntegerAttr(attr).value
    except (ValueError, TypeError):
        return None


def _known_multiple(value) -> float:
    """The largest number `value` is provably a multiple of (1 if nothing is known)."""
    op = value.owner
    if isinstance(op, ir.Block):  # a block argument: a loop index, a grid index
        return 1
    name = op.name
    if name == "arith.constant":
        v = _integer(op.attributes["value"])
        if v is None:
            return 1
        return _ALIGNED if v == 0 else abs(v)
    if name == "tpu.assume_multiple":
        return _integer(op.attributes["multiple"]) or 1
    if name in ("arith.index_cast", "arith.index_castui", "arith.extsi", "arith.extui"):
        return _known_multiple(op.operands[0])
    if name == "arith.muli":
        a, b = (_known_multiple(v) for v in op.operands)
        return _ALIGNED if _ALIGNED in (a, b) else a * b
    if name in ("arith.addi", "arith.subi"):
        a, b = (_known_multiple(v) for v in op.operands)
        if a == _ALIGNED or b == _ALIGNED:
            return min(a, b)
        return math.gcd(int(a), int(b))
    return 1


def _access(op):
    """(memref value, index values, vector type) of a vector load or store, or None."""
    name = op.name
    if name == "vector.load":
        return op.operands[0], list(op.operands[1:]), op.results[0].type
    if name in ("vector.store", "tpu.vector_store"):
        base = op.operands[1]
        rank = len(ir.MemRefType(base.type).shape)
        return base, list(op.operands[2:2 + rank]), op.operands[0].type
    return None


def _is_static(value) -> bool:
    """Whether `value` is a compile-time constant (through index casts)."""
    op = value.owner
    if isinstance(op, ir.Block):
        return False
    if op.name == "arith.constant":
        return True
    if op.name in ("arith.index_cast", "arith.index_castui"):
        return _is_static(op.operands[0])
    return False


def _check_access(op, problems):
    base, indices, vtype = _access(op)
    mshape = list(ir.MemRefType(base.type).shape)
    vshape = list(ir.VectorType(vtype).shape)
    where = (f"{op.name} of vector<{'x'.join(map(str, vshape))}> from "
             f"memref<{'x'.join(map(str, mshape))}>")
    # Mosaic accepts static offsets and extents of any alignment (it masks and
    # shifts); a dynamic offset into one of the two minor dims must be provably
    # tile-aligned, or it cannot pick a layout.
    for axis, tile, what in ((len(mshape) - 1, LANES, "lane"),
                             (len(mshape) - 2, SUBLANES, "sublane")):
        if axis < 0 or _is_static(indices[axis]):
            continue
        multiple = _known_multiple(indices[axis])
        if multiple != _ALIGNED and multiple % tile:
            problems.append(f"{where}: the dynamic {what} offset is not provably a multiple "
                            f"of {tile} (known multiple: {multiple})")


# (lhs, rhs, accumulator) element types of native MXU products.
_MXU_OPERANDS = {("bf16", "bf16", "f32"), ("f32", "f32", "f32"), ("i8", "i8", "i32")}
FP8_MXU_GENERATION = 7
_FP8_MXU_OPERANDS = {("bf16", "f8E4M3FN", "f32"), ("f8E4M3FN", "f8E4M3FN", "f32")}


def mxu_operands(generation: int | None) -> set[tuple[str, str, str]]:
    """The (lhs, rhs, accumulator) element types the MXU of `generation`
    multiplies (None: any generation before v7)."""
    if generation is not None and generation >= FP8_MXU_GENERATION:
        return _MXU_OPERANDS | _FP8_MXU_OPERANDS
    return _MXU_OPERANDS


def matmul_operand_types(module: bytes) -> list[tuple[str, str, str]]:
    """(lhs, rhs, accumulator) element types of every ``tpu.matmul`` in a
    serialized kernel, in program order (what the MXU is asked to multiply)."""
    with _context():
        return [_matmul_types(op) for op in _operations(_deserialize(module).operation)
                if op.name == "tpu.matmul"]


def _operations(op):
    """`op` and every operation nested in it, in program order."""
    yield op
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield from _operations(child.operation)


def _matmul_types(op) -> tuple[str, str, str]:
    return tuple(str(ir.ShapedType(v.type).element_type) for v in op.operands[:3])


def _check_matmul(op, problems, generation):
    types = _matmul_types(op)
    if types not in mxu_operands(generation):
        lhs, rhs, acc = types
        fp8 = (" (and from v7 bf16 or e4m3fn by e4m3fn into f32)"
               if generation is None or generation < FP8_MXU_GENERATION else
               ", bf16 or e4m3fn by e4m3fn into f32")
        problems.append(f"tpu.matmul of {lhs} x {rhs} into {acc}: the MXU multiplies bf16, "
                        f"f32 or int8 operands of one type into f32 (int32 for int8){fp8}")


def structural_check(module: bytes, generation: int | None = None) -> PassResult:
    """The version-independent check of one serialized kernel (module docstring);
    `generation` decides the MXU operand types allowed (None: before v7)."""
    problems: list[str] = []
    with _context():
        try:
            mod = _deserialize(module)
        except Exception as e:
            return PassResult(None, False, "mosaic-serde", str(e))

        for op in _operations(mod.operation):
            if _access(op) is not None:
                _check_access(op, problems)
            elif op.name == "tpu.matmul":
                _check_matmul(op, problems, generation)
    if problems:
        return PassResult(None, False, STRUCTURAL, "\n".join(problems))
    return PassResult(None, True)


def check(fn, *args, generations=(5, 6)) -> list[PassResult]:
    """Exports `fn` for TPU and checks each of its kernels: the structural check
    always (with the MXU operand rule of the oldest of `generations`), Mosaic's
    layout passes for each of `generations` where jaxlib has them."""
    modules = mosaic_modules(fn, *args)
    if not modules:
        raise ValueError("fn: exporting it for TPU produced no Mosaic kernel")
    passes = jax_compat.mosaic_layout_passes_available()
    results = []
    for m in modules:
        results.append(structural_check(m, min(generations)))
        if passes:
            results.extend(run_layout_passes(m, g) for g in generations)
    return results


__all__ = ["PassResult", "mosaic_modules", "run_layout_passes", "structural_check", "check",
           "mxu_operands", "matmul_operand_types", "FP8_MXU_GENERATION"]
