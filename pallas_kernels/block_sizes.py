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
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

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


# v5e/v6e: 128 MiB VMEM per core, v5p/v7: 64 MiB (per the project brief);
# MXU 128 wide before v6, 256 from v6.
# weight_tile: ~15-20x the per-step overhead (~0.35 us) in HBM time, so steps
# cost <= ~7% of a decode call. tm_max/tn_max: a step's arithmetic intensity
# 2 / (x_bytes/tn + w_bytes/tm) is ~2x the chip's ridge point (v5e ~240,
# v6e ~560 flop/byte for bf16) when M allows tm_max rows.
CHIPS = {
    "v5e": Chip("v5e", 5, 128 * MiB, 128, 4 * MiB, 512, 1024),
    "v5p": Chip("v5p", 5, 64 * MiB, 128, 4 * MiB, 512, 1024),
    "v6e": Chip("v6e", 6, 128 * MiB, 256, 8 * MiB, 1024, 2048),
    "v7": Chip("v7", 7, 64 * MiB, 256, 8 * MiB, 1024, 2048),
}
# Used when lowering for TPU from a machine without one (jax.export).
DEFAULT_CHIP = "v6e"


def tpu_chip(name: str | None = None) -> Chip:
    """The target TPU: `name`, else $XLA_QOPS_TPU_CHIP, else the attached TPU,
    else `DEFAULT_CHIP`."""
    name = name or os.environ.get("XLA_QOPS_TPU_CHIP")
    if name is None:
        name = _attached_tpu() or DEFAULT_CHIP
    if name not in CHIPS:
        raise ValueError(f"chip: expected one of {', '.join(CHIPS)}, got {name!r}")
    return CHIPS[name]


def _attached_tpu() -> str | None:
    import jax  # deferred: only to look for an attached TPU

    if jax.default_backend() != "tpu":
        return None
    kind = jax.devices()[0].device_kind.lower()  # e.g. "tpu v5 lite", "tpu v6e"
    if "v5" in kind:
        return "v5e" if ("lite" in kind or "v5e" in kind) else "v5p"
    if "v6" in kind:
        return "v6e"
    if "7" in kind:
        return "v7"
    return DEFAULT_CHIP


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


def tpu_operand_dtype(x_dtype, quantize_activation: bool):
    """dtype of the activation operand inside the TPU kernel.

    int8 for A8; float16 is widened to float32 (exactly) because Mosaic has no
    float16 matmul; bfloat16 and float32 stay.
    """
    if quantize_activation:
        return np.dtype(np.int8)
    d = jnp.dtype(x_dtype)  # also accepts names such as "bfloat16"
    return np.dtype(np.float32) if d == np.float16 else d


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
    """Block sizes for the TPU kernel (see the module docstring for the rule)."""
    c = tpu_chip(chip)
    p = 2 if packed else 1
    blockwise = block_size != -1
    op_dtype = tpu_operand_dtype(x_dtype, quantize_activation)
    x_itemsize = op_dtype.itemsize
    out_itemsize = 4 if jnp.dtype(x_dtype) == np.float16 else jnp.dtype(x_dtype).itemsize
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
    m_pad = round_up(m, tm)

    # N: multiples of 128 dividing N (256 preferred from v6); a full-extent
    # tile when N is not a multiple of 128 (legal, avoids copying the weight).
    if n % 128 == 0:
        n_pad = n
        tn_options = _divisor_tiles(n, 128)
        if c.mxu == 256 and any(t % 256 == 0 for t in tn_options):
            tn_options = [t for t in tn_options if t % 256 == 0]
    elif n * 128 * w_bytes_per_k <= c.weight_tile or n < 128:
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
        elif k * 128 * w_bytes_per_k <= c.weight_tile:
            k_pad, tk_options = k, [k]
        else:
            k_pad = round_up(k, unit)
            tk_options = _divisor_tiles(k_pad, unit)

    def chunk_of(tk):
        if blockwise:
            return block_size
        ok = [d for d in _divisor_tiles(tk, 128 * p) if d <= _K_CHUNK * p]
        return ok[0] if ok else tk

    def fits(tn, tk):
        return tpu_vmem_bytes(tm, tn, tk, chunk_of(tk), packed=packed, w_itemsize=1,
                              x_itemsize=x_itemsize, out_itemsize=out_itemsize,
                              blockwise=blockwise) <= budget

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

    est = tpu_vmem_bytes(tm, tn, tk, chunk_of(tk), packed=packed, w_itemsize=1,
                         x_itemsize=x_itemsize, out_itemsize=out_itemsize,
                         blockwise=blockwise)
    # Ask the compiler for 2x the estimate (Mosaic's own scratch and spills),
    # at least the 32 MiB default, never more than 3/4 of the core's VMEM.
    vmem_limit = int(min(max(2 * est, 32 * MiB), c.vmem_bytes * 3 // 4))
    return TpuBlocks(tm=tm, tn=tn, tk=tk, k_chunk=chunk_of(tk), m_pad=m_pad,
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


def gpu_blocks(m: int, k: int, n: int, *, block_size: int, packed: bool) -> GpuBlocks:
    """Block sizes for the Triton kernel.

    Decode (M <= 16) uses narrow N tiles (64) so a 4096-wide layer still
    launches 64+ programs to spread the weight stream over the SMs; prefill
    uses 64x128 tiles (or 128x128 from M > 64) with a 3-stage software
    pipeline. K is walked in steps of 128 stored elements per-channel, one
    quantization block at a time blockwise.
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
    n_pad = round_up(n, bn)
    if block_size != -1:
        bk, k_pad = block_size, k
    else:
        stored = k // p
        bk_stored = min(128, _pow2_at_most(stored)) if stored >= 16 else 16
        bk_stored = max(bk_stored, 16)
        bk = bk_stored * p
        k_pad = round_up(k, bk)
    return GpuBlocks(bm=bm, bn=bn, bk=bk, m_pad=round_up(m, bm), n_pad=n_pad,
                     k_pad=k_pad, num_warps=4, num_stages=3 if m > 16 else 2)


def describe(blocks) -> str:
    """One-line summary for logs and docs."""
    fields = dataclasses.asdict(blocks)
    return ", ".join(f"{k}={v}" for k, v in fields.items())


__all__ = ["Chip", "CHIPS", "DEFAULT_CHIP", "TpuBlocks", "GpuBlocks", "tpu_chip",
           "tpu_blocks", "gpu_blocks", "tpu_vmem_bytes", "tpu_operand_dtype",
           "round_up", "describe"]
