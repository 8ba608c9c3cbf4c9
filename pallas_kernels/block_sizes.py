"""Block sizes for every Pallas quantized-matmul kernel, chosen in this one place.

The kernels never pick tile sizes themselves: `tpu_blocks` and `gpu_blocks`
return a frozen record with the tiles, the padded extents the wrapper pads to
(and slices back from), and the compiler limits. The rule is a function of the
problem shape, the dtypes and the target chip, bucketed by shape range, not a
table of exact shapes (an exact-shape table only helps the shapes it lists).
docs/pallas_kernels.md derives the numbers below from the roofline.

All K extents here are *logical* input features; a packed int4 weight stores
K/2 bytes along that axis ("stored" extents carry the factor 2 explicitly).

TPU constraints the rule satisfies (Mosaic):

* the last two dims of every block are divisible by (8, 128) or equal the full
  array dims; the kernels' layouts put M and N/K in those positions, so
  ``tn`` and ``tk/p`` are multiples of 128 or full, and ``tm`` is a multiple
  of the sublane packing of the activation operand (8 rows for 32-bit, 16 for
  16-bit, 32 for int8 activations) -- M is always padded to ``tm``;
* MXU-sized tiles: multiples of 128 before v6, 256 from v6 where the shape
  allows it (two 256x256 MXUs per core on v6e);
* VMEM: double-buffered input and output tiles, the accumulator and the
  in-kernel temporaries (unpacked weight chunks) must fit in a quarter of the
  core's VMEM, leaving headroom for Mosaic's internal scratch and spills;
* decode (memory-bound): weight tiles big enough that the ~0.35 us per-grid-step
  overhead is small against the tile's HBM time, but at least `_MIN_STEPS`
  weight tiles so the un-overlapped first DMA stays a small fraction;
* prefill (MXU-bound): ``tm`` and ``tn`` large enough that each step's
  arithmetic intensity exceeds the chip's ridge point.

GPU (Triton) constraints: every array a kernel loads has a power-of-2 size,
``tl.dot`` operands are at least 16 along every dim, so ``bm >= 16``.

Neither rule copies the weight where it can be helped: padding N or K of the
weight means a copy inside every call (84 MB per decode call for Falcon-7B's
MLP). Both try tiles that divide N and K first; the TPU rule then takes a
full-extent tile (always legal for Mosaic) when it fits VMEM, the GPU rule
masks the last, partial K step. The real-model table of `pallas_kernels.shapes`
is tiled without padding by both (tests/test_pallas_block_sizes.py).

The TPU generation is matched exactly: `pltpu.get_tpu_info()` where the JAX
version has it, else the device kind (`DEVICE_KINDS`); a kind neither knows
gets `CONSERVATIVE` tiles and a warning, never another chip's.

For tuning on hardware, `override_tiles` sets tiles per call and
`register_measured_tiles` / `load_measured_tiles` install a measured table
keyed by target, bucketed row count and layer shape (`TileKey`); lookups fall
back to the analytic rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import re
import warnings
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from pallas_kernels import jax_compat

KiB, MiB = 1024, 1024 * 1024

# Fewest weight tiles streamed per output row-block in decode: the first DMA of
# a pipelined grid is not overlapped with compute, so it costs ~1/_MIN_STEPS.
_MIN_STEPS = 8
# Logical K per in-kernel chunk of a per-channel weight tile: the unpacked
# chunk (int32 + operand dtype) is a temporary, this bounds its size.
_K_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Chip:
    """What the TPU block rule needs to know about a TPU generation.

    `vmem_bytes` per TensorCore; `mxu` the systolic array width; `weight_tile`
    the decode weight-tile target in bytes; `tm_max`/`tn_max` the prefill
    tile caps.
    """

    name: str
    generation: int
    vmem_bytes: int
    mxu: int
    weight_tile: int
    tm_max: int
    tn_max: int
    # The MXU multiplies e4m3fn natively (bf16 x e4m3fn, e4m3fn x e4m3fn):
    # JAX's tpu_info.is_matmul_supported says so from v7 on, which has no int8
    # MXU path at all. Before v7, e4m3fn is widened to bf16 in VMEM.
    fp8_mxu: bool = False


# VMEM per TensorCore: v4 16 MiB, v5e/v6e 128 MiB, v5p/v7 64 MiB (the figures
# of JAX's own table, jax._src.tpu_info); MXU 128 wide before v6, 256 from v6.
# weight_tile: ~15-20x the per-step overhead (~0.35 us) in HBM time, so steps
# cost <= ~7% of a decode call (v4: what its 16 MiB leaves room for).
# tm_max/tn_max: a step's arithmetic intensity 2 / (x_bytes/tn + w_bytes/tm)
# is ~2x the chip's ridge point (v5e ~240, v6e ~560 flop/byte for bf16) when M
# allows tm_max rows.
CHIPS = {
    "v4": Chip("v4", 4, 16 * MiB, 128, 1 * MiB, 256, 512),
    "v5e": Chip("v5e", 5, 128 * MiB, 128, 4 * MiB, 512, 1024),
    "v5p": Chip("v5p", 5, 64 * MiB, 128, 4 * MiB, 512, 1024),
    "v6e": Chip("v6e", 6, 128 * MiB, 256, 8 * MiB, 1024, 2048),
    "v7": Chip("v7", 7, 64 * MiB, 256, 8 * MiB, 1024, 2048, fp8_mxu=True),
}
# Used when lowering for TPU from a machine without one (jax.export) and no
# target chip is given (jax_compat.lowering_target, $XLA_QOPS_TPU_CHIP).
DEFAULT_CHIP = "v6e"
# jax.Device.device_kind of each chip, matched exactly (JAX's own spellings).
DEVICE_KINDS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e", "TPU v5e": "v5e",
    "TPU v5": "v5p", "TPU v5p": "v5p",
    "TPU v6 lite": "v6e", "TPU v6e": "v6e",
    "TPU7": "v7", "TPU7x": "v7",
}
# pltpu.get_tpu_info().chip_version values of the same chips.
CHIP_VERSIONS = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e", "7": "v7", "7x": "v7"}
# A TPU this table does not know: the smallest VMEM of any generation (unless
# JAX reports the chip's own) and small tiles, which fit every chip.
CONSERVATIVE = Chip("unknown", 0, 16 * MiB, 128, 1 * MiB, 256, 512)


def tpu_chip(name: str | None = None) -> Chip:
    """The target TPU.

    `name` if given, else $XLA_QOPS_TPU_CHIP, else the TPU being lowered for
    (an abstract TPU set by `jax_compat.lowering_target`, or the attached
    one), else `DEFAULT_CHIP` (lowering for TPU on a machine without one).
    """
    name = name or os.environ.get("XLA_QOPS_TPU_CHIP")
    if name is not None:
        if name not in CHIPS:
            raise ValueError(f"chip: expected one of {', '.join(CHIPS)}, got {name!r}")
        return CHIPS[name]
    kind = jax_compat.tpu_target_kind()
    if kind is None:
        return CHIPS[DEFAULT_CHIP]
    return chip_for_device_kind(kind, jax_compat.tpu_info())


def chip_for_device_kind(kind: str, info=None) -> Chip:
    """The `Chip` of a TPU device kind, matched exactly.

    `info` is `pltpu.get_tpu_info()` for that device where the JAX version
    has it: its chip version decides, and its VMEM size is used. A kind
    neither knows gets `CONSERVATIVE` tiles (with the VMEM and MXU width
    `info` reports, if any) and a warning.
    """
    if info is not None:
        name = CHIP_VERSIONS.get(str(info.chip_version))
        if name is not None:
            return dataclasses.replace(CHIPS[name], vmem_bytes=int(info.vmem_capacity_bytes))
    elif kind in DEVICE_KINDS:
        return CHIPS[DEVICE_KINDS[kind]]
    chip = dataclasses.replace(
        CONSERVATIVE, name=f"unknown ({kind})",
        generation=int(getattr(info, "generation", 0) or 0),
        vmem_bytes=int(getattr(info, "vmem_capacity_bytes", 0) or CONSERVATIVE.vmem_bytes),
        mxu=int(getattr(info, "mxu_column_size", 0) or CONSERVATIVE.mxu),
        fp8_mxu=_info_has_fp8_mxu(info))
    warnings.warn(
        f"TPU device kind {kind!r} is not one of {', '.join(sorted(DEVICE_KINDS))}: "
        f"using conservative Pallas tiles ({chip.vmem_bytes // MiB} MiB VMEM, "
        f"{chip.weight_tile // MiB} MiB weight tiles, prefill tiles up to "
        f"{chip.tm_max}x{chip.tn_max}); set XLA_QOPS_TPU_CHIP to one of "
        f"{', '.join(CHIPS)} to choose a chip's tiles", RuntimeWarning, stacklevel=2)
    return chip


def _info_has_fp8_mxu(info) -> bool:
    """Whether `pltpu.get_tpu_info()` of an unknown chip says bf16 x e4m3fn and
    e4m3fn x e4m3fn are native MXU products (False without that method)."""
    supported = getattr(info, "is_matmul_supported", None)
    if supported is None:
        return False
    fp8 = jnp.float8_e4m3fn
    return bool(supported(jnp.bfloat16, fp8) and supported(fp8, fp8))


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _sublanes(dtype) -> int:
    """Rows per (sublane-packed) vreg tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def _divisor_tiles(extent: int, unit: int) -> list[int]:
    """Multiples of `unit` dividing `extent`, largest first."""
    return [t for t in range(extent - extent % unit, 0, -unit) if extent % t == 0]


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
    """Tiles of one TPU kernel call.

    tm, tn: output tile (M rows, N columns). tk: logical K per grid step
    (blockwise: a multiple of the quantization block B). k_chunk: logical K per
    in-kernel step (per-channel; B for blockwise). m_pad/n_pad/k_pad: extents
    the wrapper pads M, N, K to (multiples of tm, tn, tk).
    """

    tm: int
    tn: int
    tk: int
    k_chunk: int
    m_pad: int
    n_pad: int
    k_pad: int
    vmem_limit_bytes: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.m_pad // self.tm, self.n_pad // self.tn, self.k_pad // self.tk)


# Operand dtypes of the kernels (`OperandForm`).
FP8 = np.dtype(jnp.float8_e4m3fn)
_INT8, _BF16 = np.dtype(np.int8), np.dtype(jnp.bfloat16)
_FLOAT_FORMATS = ("fp8", "fp4")


def tpu_operand_dtype(x_dtype, quantize_activation: bool,
                      activation_format: str | None = None):
    """dtype of the activation operand inside the TPU kernel.

    int8 for A8 (e4m3fn with ``activation_format="fp8"``: same byte size, so
    the same tiles); float16 is widened to float32 (exactly) because Mosaic
    has no float16 matmul; bfloat16 and float32 stay.
    """
    if quantize_activation:
        return FP8 if activation_format == "fp8" else np.dtype(np.int8)
    d = jnp.dtype(x_dtype)  # also accepts names such as "bfloat16"
    return np.dtype(np.float32) if d == np.float16 else d


# ---------------------------------------------------------------- operand forms
#
# What each kernel's dot multiplies, for every weight format (API.md section 7)
# and activation form, is decided here and nowhere else.

# jax.Device.device_kind words of the NVIDIA GPUs whose tensor cores multiply
# e4m3fn x e4m3fn (sm_89 Ada, sm_90 Hopper, sm_100+ Blackwell) -- the
# targets for which Triton converts e4m3fn at all.
_FP8_GPUS = re.compile(r"\b(H100|H200|H800|H20|GH200|B100|B200|GB200|B300|GB300|L4|L40S?"
                       r"|RTX 40[5-9]0|RTX PRO \d{4})\b")


@dataclasses.dataclass(frozen=True)
class OperandForm:
    """What one kernel call computes in.

    x: the activation operand the prologue hands the kernel (bf16 / f16 / f32,
      int8 for A8-int8, e4m3fn for A8-fp8). lhs, rhs: the dot's operand dtypes
      after in-kernel conversion of the activation and weight tiles. The
      accumulator is int32 for int8 x int8, else float32 (every product of
      two quantized operands is exact in float32: at most 8 x 4 significand
      bits).
    """

    x: np.dtype
    lhs: np.dtype
    rhs: np.dtype

    @property
    def acc(self) -> np.dtype:
        return np.dtype(np.int32) if self.lhs == _INT8 else np.dtype(np.float32)

    @property
    def label(self) -> str:
        """``"bfloat16 x float8_e4m3fn"`` and the like (tests, logs)."""
        return f"{self.lhs.name} x {self.rhs.name}"


def _operand_form(x_op, weight_format: str, fp8_pairs) -> OperandForm:
    """The widest native product for an activation operand and a weight format.

    int8 x int weights: the int8 dot. A float weight (e4m3fn exactly, fp4
    included) meets the activation as e4m3fn where ``(lhs, e4m3fn)`` is in
    `fp8_pairs` (the target's native fp8 products). Otherwise both become the
    activation's float dtype, with int8 and e4m3fn activations widened to
    bf16 (exact).
    """
    x_op = np.dtype(x_op)
    if x_op == _INT8 and weight_format not in _FLOAT_FORMATS:
        return OperandForm(x_op, _INT8, _INT8)
    if weight_format in _FLOAT_FORMATS and (x_op, FP8) in fp8_pairs:
        return OperandForm(x_op, x_op, FP8)
    common = _BF16 if x_op in (_INT8, FP8) else x_op
    return OperandForm(x_op, common, common)


def tpu_operands(x_dtype, *, quantize_activation: bool, weight_format: str = "int8",
                 activation_format: str | None = None, chip: Chip) -> OperandForm:
    """The TPU kernel's operand form: on a chip with an fp8 MXU (v7) an fp8 /
    fp4 weight tile reaches the dot as e4m3fn (bf16 x e4m3fn for bf16
    activations, e4m3fn x e4m3fn for A8-fp8; float32 activations multiply
    float32); before v7 it is widened to bf16 (or float32) in VMEM."""
    x_op = tpu_operand_dtype(x_dtype, quantize_activation, activation_format)
    pairs = {(_BF16, FP8), (FP8, FP8)} if chip.fp8_mxu else set()
    return _operand_form(x_op, weight_format, pairs)


def gpu_fp8_dot(device_kind: str | None) -> bool:
    """Whether the target GPU's tensor cores multiply e4m3fn x e4m3fn.

    `device_kind` as `jax.Device.device_kind` reports it; None (exporting for
    cuda with no GPU attached or named) means `jax_compat`'s default target,
    an H100.
    """
    kind = device_kind or jax_compat.DEFAULT_TARGET_KIND["cuda"]
    return bool(_FP8_GPUS.search(kind))


def gpu_operands(x_dtype, *, quantize_activation: bool, weight_format: str = "int8",
                 activation_format: str | None = None,
                 device_kind: str | None = None) -> OperandForm:
    """The Triton kernel's operand form: e4m3fn x e4m3fn for A8-fp8 with a
    float weight where the target has fp8 tensor cores (`gpu_fp8_dot`);
    otherwise the tiles are converted in registers to the activation's float
    dtype (bf16 for quantized activations). Triton's dot takes one operand
    type, so A16 converts the weight to x's dtype on every target."""
    if quantize_activation:
        x_op = FP8 if activation_format == "fp8" else _INT8
    else:
        x_op = np.dtype(jnp.dtype(x_dtype))
    pairs = {(FP8, FP8)} if gpu_fp8_dot(device_kind) else set()
    return _operand_form(x_op, weight_format, pairs)


def tpu_vmem_bytes(tm, tn, tk, k_chunk, *, packed, w_itemsize, x_itemsize,
                   out_itemsize, blockwise) -> int:
    """VMEM estimate of one kernel instance (bytes).

    Double-buffered x, w, scale/zero-point and output tiles, the f32/int32
    accumulator, and the unpacked weight chunk (int32 intermediate plus the
    MXU operand) alive at one time.
    """
    p = 2 if packed else 1
    if blockwise:  # (p, tk/B, tm, B/p): a block narrower than 128 still fills 128 lanes
        x_tile = p * (tk // k_chunk) * tm * max(k_chunk // p, 128) * x_itemsize
    else:
        x_tile = tm * tk * x_itemsize
    w_tile = tn * tk // p * w_itemsize
    rows = tk // k_chunk if blockwise else 1
    scales = 2 * max(rows, 8) * tn * 4
    out = tm * tn * out_itemsize
    acc = tm * tn * 4 + tm * 128 * 4  # accumulator + running activation sum
    temp = tn * k_chunk * (4 + max(x_itemsize, 1))
    return 2 * (x_tile + w_tile + scales + out) + acc + temp


def tpu_blocks(m: int, k: int, n: int, *, block_size: int, packed: bool, x_dtype,
               quantize_activation: bool, chip: str | None = None) -> TpuBlocks:
    """Block sizes for the TPU kernel: `override_tiles` over a measured table
    entry (`register_measured_tiles`) over the analytic rule (module docstring)."""
    c = tpu_chip(chip)
    key = TileKey.of("tpu:" + c.name, m, k, n, block_size=block_size, packed=packed,
                     x_dtype=x_dtype, quantize_activation=quantize_activation)
    chosen = dict(_MEASURED.get(key, {}))
    chosen.update(_OVERRIDE.get().get("tpu", {}))
    rule = _tpu_rule(m, k, n, c, block_size=block_size, packed=packed, x_dtype=x_dtype,
                     quantize_activation=quantize_activation)
    if not chosen:
        return rule
    tiles = {f: chosen.get(f, getattr(rule, f)) for f in ("tm", "tn", "tk", "k_chunk")}
    if "tk" in chosen and "k_chunk" not in chosen:
        tiles["k_chunk"] = block_size if block_size != -1 else _k_chunk(tiles["tk"], packed)
    return _tpu_finish(m, k, n, c, block_size=block_size, packed=packed, x_dtype=x_dtype,
                       quantize_activation=quantize_activation, **tiles)


def _k_chunk(tk: int, packed: bool) -> int:
    """Logical K per in-kernel step of a per-channel tile: the largest 128*p
    multiple dividing tk up to _K_CHUNK*p, else the whole (full-extent) tile."""
    p = 2 if packed else 1
    ok = [d for d in _divisor_tiles(tk, 128 * p) if d <= _K_CHUNK * p]
    return ok[0] if ok else tk


def _tpu_rule(m, k, n, c: Chip, *, block_size, packed, x_dtype, quantize_activation):
    p = 2 if packed else 1
    blockwise = block_size != -1
    op_dtype = tpu_operand_dtype(x_dtype, quantize_activation)
    x_itemsize = op_dtype.itemsize
    out_itemsize = _tpu_out_itemsize(x_dtype)
    w_bytes_per_k = 1.0 / p  # bytes of weight per (output, logical K) element
    budget = c.vmem_bytes // 4

    # M: one tile for decode (the weight is streamed exactly once); prefill
    # tiles of up to tm_max rows, MXU-aligned, split evenly to limit padding.
    sub = _sublanes(op_dtype)
    decode = m <= 64
    if m <= c.tm_max:
        tm = round_up(m, sub if m <= 128 else 128)
    else:
        n_m = -(-m // c.tm_max)
        tm = round_up(-(-m // n_m), c.mxu)

    def chunk_of(tk):
        return block_size if blockwise else _k_chunk(tk, packed)

    def fits(tn, tk):
        return tpu_vmem_bytes(tm, tn, tk, chunk_of(tk), packed=packed, w_itemsize=1,
                              x_itemsize=x_itemsize, out_itemsize=out_itemsize,
                              blockwise=blockwise) <= budget

    # Padding N or K copies the weight inside every call, so it is the last
    # resort: divisor tiles first, then a full-extent tile (always legal) when
    # it fits VMEM, and only then padding.
    # N: multiples of 128 dividing N (256 preferred from v6).
    tk_min = block_size if blockwise else min(k, 128 * p)
    if n % 128 == 0:
        n_pad = n
        tn_options = _divisor_tiles(n, 128)
        if c.mxu == 256 and any(t % 256 == 0 for t in tn_options):
            tn_options = [t for t in tn_options if t % 256 == 0]
    elif n < 128 or fits(n, tk_min):
        n_pad, tn_options = n, [n]
    else:
        n_pad = round_up(n, 128)
        tn_options = _divisor_tiles(n_pad, 128)

    # K: per-channel tiles are multiples of 128 stored elements (128*p logical)
    # dividing K, or all of K; blockwise tiles are whole quantization blocks.
    if blockwise:
        nb = k // block_size
        k_pad = k
        tk_options = [d * block_size for d in range(nb, 0, -1) if nb % d == 0]
    else:
        unit = 128 * p
        if k % unit == 0:
            k_pad, tk_options = k, [k] + [t for t in _divisor_tiles(k, unit) if t != k]
        elif fits(tn_options[-1], k):
            k_pad, tk_options = k, [k]
        else:
            k_pad = round_up(k, unit)
            tk_options = _divisor_tiles(k_pad, unit)

    if decode:
        # Memory-bound: weight tiles of ~weight_tile bytes, at least
        # _MIN_STEPS of them, with all of K in one tile when it fits (the
        # accumulator is then never revisited).
        w_total = n_pad * k_pad * w_bytes_per_k
        target = max(min(c.weight_tile, w_total / _MIN_STEPS), 128 * KiB)
        tn_min = tn_options[-1]
        tk = next((t for t in tk_options if tn_min * t * w_bytes_per_k <= target
                   and fits(tn_min, t)), tk_options[-1])
        tn = next((t for t in tn_options if t * tk * w_bytes_per_k <= target
                   and fits(t, tk)), tn_min)
    else:
        # MXU-bound: the largest output tile up to tn_max, then the largest K
        # tile (at most 4 in-kernel chunks) that fits VMEM, shrinking tn if
        # even the smallest K tile does not fit.
        tn = next((t for t in tn_options if t <= c.tn_max), tn_options[-1])
        tk_cap = max(4 * _K_CHUNK * p, block_size if blockwise else 0)
        tk = next((t for t in tk_options if t <= tk_cap and fits(tn, t)), tk_options[-1])
        while not fits(tn, tk) and tn != tn_options[-1]:
            tn = next(t for t in tn_options if t < tn)
    return _tpu_finish(m, k, n, c, block_size=block_size, packed=packed, x_dtype=x_dtype,
                       quantize_activation=quantize_activation, tm=tm, tn=tn, tk=tk,
                       k_chunk=chunk_of(tk), n_pad=n_pad, k_pad=k_pad)


def _tpu_out_itemsize(x_dtype) -> int:
    # float16 results leave the kernel as float32 (cast after it).
    return 4 if jnp.dtype(x_dtype) == np.float16 else jnp.dtype(x_dtype).itemsize


def _tpu_finish(m, k, n, c: Chip, *, block_size, packed, x_dtype, quantize_activation,
                tm, tn, tk, k_chunk, n_pad=None, k_pad=None) -> TpuBlocks:
    """Padded extents and the VMEM limit for chosen tiles, checked against
    Mosaic's rules (tiles from an override or a measured table may be anything)."""
    p = 2 if packed else 1
    blockwise = block_size != -1
    op_dtype = tpu_operand_dtype(x_dtype, quantize_activation)
    n_pad = n_pad if n_pad is not None else (n if tn == n else round_up(n, tn))
    k_pad = k_pad if k_pad is not None else (k if tk == k else round_up(k, tk))
    sub = _sublanes(op_dtype)
    problems = []
    if tm <= 0 or tm % sub:
        problems.append(f"tm={tm} must be a positive multiple of {sub} (sublane packing "
                        f"of {op_dtype.name} activations)")
    if tn <= 0 or (tn % 128 and tn != n_pad):
        problems.append(f"tn={tn} must be a multiple of 128 or all of N={n}")
    if blockwise:
        if tk <= 0 or tk % block_size or k % tk:
            problems.append(f"tk={tk} must be a multiple of block_size={block_size} "
                            f"dividing K={k}")
        if k_chunk != block_size:
            problems.append(f"k_chunk={k_chunk} must equal block_size={block_size}")
    else:
        if tk <= 0 or (tk % (128 * p) and tk != k_pad):
            problems.append(f"tk={tk} must be a multiple of {128 * p} or all of K={k}")
        if k_chunk <= 0 or tk % k_chunk or (k_chunk % (128 * p) and k_chunk != tk):
            problems.append(f"k_chunk={k_chunk} must divide tk={tk} and be a multiple of "
                            f"{128 * p} (or all of tk)")
    if problems:
        raise ValueError("tiles: " + "; ".join(problems))
    est = tpu_vmem_bytes(tm, tn, tk, k_chunk, packed=packed, w_itemsize=1,
                         x_itemsize=op_dtype.itemsize, out_itemsize=_tpu_out_itemsize(x_dtype),
                         blockwise=blockwise)
    # Ask the compiler for 2x the estimate (Mosaic's own scratch and spills),
    # at least the 32 MiB default, never more than 3/4 of the core's VMEM.
    vmem_limit = int(min(max(2 * est, 32 * MiB), c.vmem_bytes * 3 // 4))
    return TpuBlocks(tm=tm, tn=tn, tk=tk, k_chunk=k_chunk, m_pad=round_up(m, tm),
                     n_pad=n_pad, k_pad=k_pad, vmem_limit_bytes=vmem_limit)


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    """Tiles of one Triton kernel call.

    bm, bn: output tile; bk: logical K per loop iteration (blockwise: B).
    m_pad/n_pad/k_pad: padded extents. num_warps/num_stages: Triton knobs.
    """

    bm: int
    bn: int
    bk: int
    m_pad: int
    n_pad: int
    k_pad: int
    num_warps: int
    num_stages: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.m_pad // self.bm, self.n_pad // self.bn)


def _pow2_at_most(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def gpu_dot_k_min(fp8_dot: bool) -> int:
    """The smallest K step (stored elements) of a Triton dot: 16, and 32 for
    e4m3fn x e4m3fn (Hopper's fp8 wgmma multiplies 32 along K)."""
    return 32 if fp8_dot else 16


def gpu_blocks(m: int, k: int, n: int, *, block_size: int, packed: bool,
               x_dtype="bfloat16", quantize_activation: bool = False,
               dot_k_min: int = 16) -> GpuBlocks:
    """Block sizes for the Triton kernel: `override_tiles` over a measured table
    entry over the analytic rule (`_gpu_rule`); `dot_k_min` from `gpu_dot_k_min`."""
    key = TileKey.of("cuda", m, k, n, block_size=block_size, packed=packed, x_dtype=x_dtype,
                     quantize_activation=quantize_activation)
    chosen = dict(_MEASURED.get(key, {}))
    chosen.update(_OVERRIDE.get().get("gpu", {}))
    rule = _gpu_rule(m, k, n, block_size=block_size, packed=packed, dot_k_min=dot_k_min)
    if not chosen:
        return rule
    tiles = {f: chosen.get(f, getattr(rule, f))
             for f in ("bm", "bn", "bk", "num_warps", "num_stages")}
    return _gpu_finish(m, k, n, block_size=block_size, packed=packed, dot_k_min=dot_k_min,
                       **tiles)


def _gpu_rule(m, k, n, *, block_size, packed, dot_k_min=16) -> GpuBlocks:
    """Decode (M <= 16) uses narrow N tiles (64) so a 4096-wide layer still
    launches 64+ programs to spread the weight stream over the SMs; prefill
    uses 64x128 tiles (or 128x128 from M > 64) with a 3-stage software
    pipeline. K is walked one quantization block at a time blockwise, and
    per-channel in power-of-2 steps of at most 128 stored elements: the
    largest such step that divides K, else 128 with the last, partial step
    masked -- the weight is never padded along K (which would copy it).
    """
    p = 2 if packed else 1
    bm = min(max(16, 1 << max(m - 1, 0).bit_length()), 128)
    bn = 64 if m <= 16 else 128
    if n < bn:
        bn = max(16, 1 << max(n - 1, 0).bit_length())
    if n % bn:
        # Prefer a power-of-2 tile dividing N over padding the weight.
        divisor = next((t for t in (bn, bn // 2, 32, 16) if t >= 16 and n % t == 0), None)
        bn = divisor or bn
    if block_size != -1:
        bk = block_size
    else:
        stored = k // p
        dividing = [t for t in (128, 64, 32, 16) if stored % t == 0 and t >= dot_k_min]
        bk = p * (dividing[0] if dividing
                  else min(128, max(dot_k_min, _pow2_at_most(stored))))
    return _gpu_finish(m, k, n, block_size=block_size, packed=packed, bm=bm, bn=bn, bk=bk,
                       num_warps=4, num_stages=3 if m > 16 else 2, dot_k_min=dot_k_min)


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _gpu_finish(m, k, n, *, block_size, packed, bm, bn, bk, num_warps,
                num_stages, dot_k_min=16) -> GpuBlocks:
    """Padded extents for chosen tiles, checked against Triton's shape rules."""
    p = 2 if packed else 1
    problems = [f"{name}={v} must be a power of 2 >= 16"
                for name, v in (("bm", bm), ("bn", bn)) if not (_is_pow2(v) and v >= 16)]
    if block_size != -1 and bk != block_size:
        problems.append(f"bk={bk} must equal block_size={block_size} (one block per step)")
    if block_size == -1 and not (bk % p == 0 and _is_pow2(bk // p) and bk // p >= dot_k_min):
        problems.append(f"bk={bk} must be {p} x a power of 2 >= {dot_k_min} "
                        f"(stored elements per step)")
    if not _is_pow2(num_warps) or num_stages < 1:
        problems.append(f"num_warps={num_warps} must be a power of 2 and "
                        f"num_stages={num_stages} >= 1")
    if problems:
        raise ValueError("tiles: " + "; ".join(problems))
    return GpuBlocks(bm=bm, bn=bn, bk=bk, m_pad=round_up(m, bm), n_pad=round_up(n, bn),
                     k_pad=k, num_warps=num_warps, num_stages=num_stages)


# ---------------------------------------------------------------- tuning hooks
#
# Tiles are chosen, in this order of precedence, by
#   1. `override_tiles(...)` around the call (tuning on hardware; per call);
#   2. a measured table entry for the call's bucketed shape
#      (`register_measured_tiles` / `load_measured_tiles`), when one exists;
#   3. the analytic rule above.
# An override or table entry may give only some fields; the rule's choice
# fills in the rest, and the result is checked against the same hardware
# rules (ValueError naming the field otherwise).

TPU_TILE_FIELDS = ("tm", "tn", "tk", "k_chunk")
GPU_TILE_FIELDS = ("bm", "bn", "bk", "num_warps", "num_stages")
_OVERRIDE: contextvars.ContextVar[dict] = contextvars.ContextVar("xla_qops_tiles", default={})


def m_bucket(m: int) -> int:
    """Rows bucketed to the next power of 2 (1, 2, 4, ..., 1024, then 2048+)."""
    return min(1 << max(m - 1, 0).bit_length(), 2048)


@dataclasses.dataclass(frozen=True)
class TileKey:
    """A measured table's key: the target, the bucketed row count and the exact
    layer shape and scheme (layer shapes are few per model, rows vary per call)."""

    target: str  # "tpu:v6e", "tpu:v5e", ..., or "cuda"
    m_bucket: int
    k: int
    n: int
    block_size: int
    packed: bool
    x_dtype: str
    quantize_activation: bool

    @classmethod
    def of(cls, target, m, k, n, *, block_size, packed, x_dtype, quantize_activation):
        return cls(target, m_bucket(m), int(k), int(n), int(block_size), bool(packed),
                   jnp.dtype(x_dtype).name, bool(quantize_activation))


_MEASURED: dict[TileKey, dict] = {}


def _check_fields(tiles: Mapping, allowed, what: str) -> dict:
    unknown = sorted(set(tiles) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: expected fields among {', '.join(allowed)}, "
                         f"got {', '.join(unknown)}")
    bad = [f"{f}={v!r}" for f, v in tiles.items()
           if not isinstance(v, (int, np.integer)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{what}: expected int values, got {', '.join(bad)}")
    return {f: int(v) for f, v in tiles.items()}


@contextlib.contextmanager
def override_tiles(*, tpu: Mapping | None = None, gpu: Mapping | None = None):
    """Within the block, kernels use these tiles (fields not given: the rule's).

        with block_sizes.override_tiles(tpu=dict(tn=512, tk=2048)):
            y = xla_qops.quantized_matmul(x, qw, impl="pallas")

    Tiles are chosen when a function is traced, so a function jitted before
    the block keeps its tiles; trace (call, or ``jax.jit(f).lower``) inside it.
    Nested blocks replace the platform they name. Fields: `TPU_TILE_FIELDS`
    (``tm, tn, tk, k_chunk``) and `GPU_TILE_FIELDS` (``bm, bn, bk, num_warps,
    num_stages``); a tile that breaks a hardware rule raises ValueError when
    the kernel is traced.
    """
    current = dict(_OVERRIDE.get())
    if tpu is not None:
        current["tpu"] = _check_fields(tpu, TPU_TILE_FIELDS, "tpu")
    if gpu is not None:
        current["gpu"] = _check_fields(gpu, GPU_TILE_FIELDS, "gpu")
    token = _OVERRIDE.set(current)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def trace_state() -> tuple:
    """Everything the tile rules read when a kernel is traced, as a hashable token.

    The chip override, the TPU and abstract device being lowered for, the
    `override_tiles` block in force and the measured table: a caller that
    caches a traced kernel (`xla_qops.partitioning.partitioned`) keys on it,
    so a changed setting gets a fresh trace.
    """
    return (os.environ.get("XLA_QOPS_TPU_CHIP"), jax_compat.tpu_target_kind(),
            jax_compat.abstract_target(), json.dumps(_OVERRIDE.get(), sort_keys=True),
            tuple(sorted((repr(k), json.dumps(v, sort_keys=True)) for k, v in _MEASURED.items())))


def register_measured_tiles(entries: Mapping[TileKey, Mapping]) -> None:
    """Adds measured tiles: ``{TileKey: {"tn": 512, ...}}`` (replacing equal keys)."""
    for key, tiles in entries.items():
        if not isinstance(key, TileKey):
            raise TypeError(f"entries: expected TileKey keys, got {type(key).__name__}")
        allowed = TPU_TILE_FIELDS if key.target.startswith("tpu") else GPU_TILE_FIELDS
        _MEASURED[key] = _check_fields(tiles, allowed, f"entries[{key}]")


def clear_measured_tiles() -> None:
    _MEASURED.clear()


def load_measured_tiles(path: str) -> int:
    """Registers the entries of a JSON file written by a tuning run; returns their count.

    Format: a list of ``{"target": "tpu:v6e", "m": 16, "k": 4096, "n": 14336,
    "block_size": -1, "packed": false, "x_dtype": "bfloat16",
    "quantize_activation": false, "tiles": {"tn": 1792, "tk": 4096}}``
    (``m`` is bucketed like `m_bucket`).
    """
    with open(path) as f:
        rows = json.load(f)
    entries = {}
    for row in rows:
        key = TileKey.of(row["target"], row["m"], row["k"], row["n"],
                         block_size=row["block_size"], packed=row["packed"],
                         x_dtype=row["x_dtype"], quantize_activation=row["quantize_activation"])
        entries[key] = row["tiles"]
    register_measured_tiles(entries)
    return len(entries)


def describe(blocks) -> str:
    """One-line summary for logs and docs."""
    fields = dataclasses.asdict(blocks)
    return ", ".join(f"{k}={v}" for k, v in fields.items())


__all__ = ["Chip", "CHIPS", "DEFAULT_CHIP", "DEVICE_KINDS", "CONSERVATIVE", "TpuBlocks",
           "GpuBlocks", "TileKey", "tpu_chip", "chip_for_device_kind", "tpu_blocks",
           "gpu_blocks", "tpu_vmem_bytes", "tpu_operand_dtype", "OperandForm", "tpu_operands",
           "gpu_operands", "gpu_fp8_dot", "gpu_dot_k_min", "round_up", "m_bucket",
           "override_tiles", "register_measured_tiles", "clear_measured_tiles",
           "load_measured_tiles", "describe"]
