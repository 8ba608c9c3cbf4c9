"""Pure-JAX statement of what the TPU and GPU kernels compute, on their operands.

Both kernels evaluate the same decomposition of API.md's
``y = x_hat @ (scale * q - zero_point).T`` without ever forming a float
weight:

per-channel
    y[m, n] = s_x[m] * scale[n] * sum_k x[m, k] q[n, k]
              - s_x[m] * (sum_k x[m, k]) * zero[n]

blockwise (block b = input features [bB, (b+1)B))
    y[m, n] = sum_b ( s_x[m, b] * scale[b, n] * sum_{k in b} x[m, k] q[k, n]
                      - s_x[m, b] * (sum_{k in b} x[m, k]) * zero[b, n] )

with ``s_x = 1`` and float x for A16, ``x = x_q`` (int8) and ``s_x`` its
per-token (per-block) scale for A8, the integer sums then being exact int32.
The float formats of API.md section 7 follow the same algebra: ``q`` is the
e4m3fn / e2m1 value of the stored code (`formats.float_weight_part`), ``x_q``
e4m3fn with fp8 activations, the sums float32 (every product exact).
The zero point costs one running activation sum per row (and block), never a
per-element subtraction on the weight. Packed int4 contracts even features
with low nibbles and odd features with high nibbles (`operands`).

This module spells that out with `jnp.einsum` on the kernel operands of
`pallas_kernels.operands`, so it checks the prologue layouts too; the tests
hold it, and the kernels, to the float64 numpy reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import formats, operands

_HIGHEST = lax.Precision.HIGHEST


def _unpacked_parts(w, packed: bool, dtype, weight_format):
    return [operands.weight_part(w, part, packed, dtype, weight_format)
            for part in range(2 if packed else 1)]


def quantized_matmul_reference(x, w, scale, zero_point=None, *, block_size: int = -1,
                               quantize_activation: bool = False, weight_format=None,
                               activation_format=None):
    """``[M, K] x quantized weight -> [M, N]`` in x's dtype, by the kernels' algebra
    (`weight_format` / `activation_format` as `formats.kernel_formats` infers them)."""
    m, k = x.shape
    packed = w.dtype == jnp.uint8
    n = w.shape[-1] if block_size != -1 else w.shape[0]
    weight_format, activation_format = formats.kernel_formats(
        w.dtype, weight_format, activation_format, quantize_activation)
    int_sums = activation_format == "int8" and weight_format not in ("fp8", "fp4")
    op_dtype = jnp.int8 if int_sums else jnp.float32
    acc_dtype = jnp.int32 if int_sums else jnp.float32
    xs, w, scale, zero, x_scale = operands.kernel_operands(
        x, w, scale, zero_point, block_size=block_size,
        quantize_activation=quantize_activation, op_dtype=op_dtype,
        m_pad=m, n_pad=n, k_pad=k, activation_format=activation_format or "int8")
    xs = xs if int_sums else formats.to_float32(xs)
    qs = _unpacked_parts(w, packed, op_dtype, weight_format)

    def dot(spec, a, b):
        return jnp.einsum(spec, a, b, precision=_HIGHEST, preferred_element_type=acc_dtype)

    if block_size == -1:
        acc = sum(dot("mk,nk->mn", xs[i], q) for i, q in enumerate(qs)).astype(jnp.float32)
        x_sum = xs.astype(jnp.float32).sum(axis=(0, 2))[:, None]  # [M, 1]
        if x_scale is not None:
            acc, x_sum = acc * x_scale, x_sum * x_scale
        y = acc * scale
        if zero is not None:
            y = y - x_sum * zero
    else:
        acc = sum(dot("bmk,bkn->bmn", xs[i], q) for i, q in enumerate(qs)).astype(jnp.float32)
        x_sum = xs.astype(jnp.float32).sum(axis=(0, 3))[..., None]  # [nb, M, 1]
        if x_scale is not None:
            acc, x_sum = acc * x_scale, x_sum * x_scale
        y = (acc * scale).sum(0)
        if zero is not None:
            y = y - (x_sum * zero).sum(0)
    return y.astype(x.dtype)


quantized_matmul_reference_jit = jax.jit(
    quantized_matmul_reference, static_argnames=("block_size", "quantize_activation",
                                                 "weight_format", "activation_format"))
