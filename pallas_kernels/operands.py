"""The prologue shared by the TPU and GPU kernels: API layouts -> kernel operands.

Everything here is plain XLA work on the activations and on the small scale /
zero-point vectors; the weight is passed through untouched. Where a tile does
not divide N or K, the activations and scales are padded (cheap) and the
weight is not: its last block along that axis is partial, which Pallas reads
with unspecified values past the end (finite integers: a weight is int8 or
uint8) that meet zero activations along K, or land in output columns that are
sliced off along N. Padding the weight would copy it inside every call. The
GPU kernel pads the weight only where Triton's power-of-2 rule leaves no
other choice (N not a multiple of 16, explicit tiles), via ``pad_weight``.

Kernel operand layouts (``p`` = 2 for packed int4, else 1; ``Bs = B/p``;
``Ks = K/p``; M, N, K padded to the block sizes' ``m_pad``, ``n_pad``,
``k_pad``):

per-channel (block_size == -1)
    xs       [p, M, Ks]     activation parts (x dtype, or int8 with A8)
    w        [N, Ks]        int8, or uint8 with two int4 per byte
    scale    [1, N]         float32
    zero     [1, N]         float32 (only with a zero point)
    x_scale  [M, 1]         float32 (only with A8)

blockwise (block_size == B)
    xs       [p, K/B, M, Bs]
    w        [K/B, Bs, N]
    scale    [K/B, 1, N]
    zero     [K/B, 1, N]
    x_scale  [K/B, M, 1]

"Parts" is the packed-int4 trick of `xla_qops.packing`: byte ``j`` of a packed
weight holds input features ``2j`` (low nibble) and ``2j+1`` (high nibble), so
the kernels contract the low nibbles with ``xs[0] = x[..., 0::2]`` and the
high nibbles with ``xs[1] = x[..., 1::2]`` and never interleave the nibbles.
Blockwise, the activation is moved block-major (``[K/B, M, B]``) so a kernel
indexes a block with a leading-dim index and the (M, B) tile keeps the full
block on the lane axis. Scales get a unit axis so their blocks ``(1, tn)`` and
x_scale's ``(tm, 1)`` satisfy Mosaic's last-two-dims rule.

With A8 the activation is quantized here with `pallas_kernels.activation`
(which `xla_qops` uses too), so the kernels see exactly the integers every
other backend sees.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.activation import quantize_activation as _quantize_activation
from pallas_kernels.formats import float_weight_part, quantize_activation_fp8


def _pad(a, axis: int, size: int):
    extra = size - a.shape[axis]
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def _parts(x, packed: bool):
    """[..., L] -> [p, ..., L/p]: (even, odd) features for packed int4."""
    if not packed:
        return x[None]
    return jnp.stack([x[..., 0::2], x[..., 1::2]])


def kernel_operands(x, w, scale, zero_point, *, block_size: int, quantize_activation: bool,
                    op_dtype, m_pad: int, n_pad: int, k_pad: int, pad_weight: bool = False,
                    activation_format: str = "int8"):
    """Builds ``(xs, w, scale, zero, x_scale)`` in the layouts above.

    `x` is ``[M, K]``; `w`, `scale`, `zero_point` are in API.md's layouts and
    already validated (`xla_qops.spec`). `zero` / `x_scale` are None when
    there is no zero point / no activation quantization (int8, or e4m3fn with
    ``activation_format="fp8"``, `pallas_kernels.formats`). Activations are
    padded to ``m_pad`` rows and ``k_pad`` features, scales to ``n_pad``
    outputs; the weight only with ``pad_weight`` (else its edge blocks are
    partial, see the module docstring).
    """
    packed = w.dtype == jnp.uint8
    p = 2 if packed else 1
    m, k = x.shape
    x_scale = None
    if quantize_activation:
        quantize = quantize_activation_fp8 if activation_format == "fp8" else _quantize_activation
        x, x_scale = quantize(x, block_size)  # int8 / e4m3fn [M, K], f32 [M, G]
    else:
        x = x.astype(op_dtype)
    scale = scale.astype(jnp.float32)
    zero = None if zero_point is None else zero_point.astype(jnp.float32)

    if block_size == -1:
        n = w.shape[0]
        x = _pad(x, 1, k_pad)
        xs = _pad(_parts(x, packed), 1, m_pad)
        if pad_weight:
            w = _pad(_pad(w, 1, k_pad // p), 0, n_pad)
        scale = _pad(scale.reshape(1, n), 1, n_pad)
        zero = None if zero is None else _pad(zero.reshape(1, n), 1, n_pad)
        if x_scale is not None:
            x_scale = _pad(x_scale, 0, m_pad)  # [M, 1]
        return xs, w, scale, zero, x_scale

    if k_pad != k:
        raise ValueError(f"k_pad: blockwise kernels tile whole blocks, so K={k} is "
                         f"never padded; got k_pad={k_pad}")
    nb, n = k // block_size, w.shape[-1]
    xb = x.reshape(m, nb, block_size)
    xs = _pad(_parts(xb, packed).transpose(0, 2, 1, 3), 2, m_pad)  # [p, nb, M, Bs]
    if pad_weight:
        w = _pad(w, 2, n_pad)
    scale = _pad(scale.reshape(nb, 1, n), 2, n_pad)
    zero = None if zero is None else _pad(zero.reshape(nb, 1, n), 2, n_pad)
    if x_scale is not None:
        x_scale = _pad(x_scale.T[:, :, None], 1, m_pad)  # [nb, M, 1]
    return xs, w, scale, zero, x_scale


def weight_part(w, part: int, packed: bool, dtype, weight_format: str = "int"):
    """One MXU operand from a stored weight tile, inside a kernel.

    fp8 / fp4 weights (`weight_format`, API.md section 7) are decoded by
    `pallas_kernels.formats.float_weight_part`; the integer forms below.

    Unpacked int8 is converted as is. Packed bytes are widened to int32 and
    the nibble of `part` (0 = low = even feature, 1 = high = odd feature) is
    sign-extended with ``((v & 15) ^ 8) - 8``: plain 32-bit VPU ops, no 8-bit
    shifts (which not every TPU generation has). Integer operands (A8) are
    narrowed to int8 for the int8 MXU path; float operands go through float32,
    which holds every int4/int8 value exactly.
    """
    if weight_format in ("fp8", "fp4"):
        return float_weight_part(w, part, weight_format, dtype)
    if not packed:
        if jnp.dtype(dtype) == jnp.int8:
            return w
        return w.astype(jnp.float32).astype(dtype)
    v = w.astype(jnp.int32)
    if part == 1:
        v = v >> 4  # uint8 widened: logical and arithmetic shifts agree
    v = ((v & 15) ^ 8) - 8
    if jnp.dtype(dtype) == jnp.int8:
        return v.astype(jnp.int8)
    return v.astype(jnp.float32).astype(dtype)
