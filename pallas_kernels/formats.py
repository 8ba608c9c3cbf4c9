"""Floating-point element formats of weights and activations (API.md section 7).

* ``fp8``: OCP e4m3fn (``jnp.float8_e4m3fn``): 1 sign, 4 exponent (bias 7),
  3 mantissa bits, no infinities, largest finite 448. Stored as is.
* ``fp4``: OCP e2m1 codes, two per byte packed exactly as int4 (the even
  input index in the low nibble). Code bits ``s e e m``: the magnitude of
  the low three bits is {0, 0.5, 1, 1.5, 2, 3, 4, 6}.

Every e2m1 value is exact in e4m3fn, and every e4m3fn value is exact in
bfloat16, so a kernel can widen fp4 -> fp8 -> bf16 without rounding and feed
the widest dot the hardware has. `fp4_to_fp8` does the first step with bit
arithmetic (no table, no gather), which lowers on every platform.

The fp8 activation rule (`quantize_activation_fp8`) mirrors the int8 one of
`pallas_kernels.activation`: one scale per token, or per token and input
block, ``scale = amax / 448``; ``x_q = e4m3(x * (448 / amax))`` rounded to
nearest even and saturated at +-448; an all-zero group gets scale 1.
Lives here, below `xla_qops`, because the kernels' prologue needs it too.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.activation import divide_exactly, quantize_groups

FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 magnitudes by the low three code bits; bit 3 is the sign.
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_DTYPE = jnp.float8_e4m3fn


def fp4_to_fp8(codes):
    """e2m1 codes (uint8, one per element in the low nibble) -> float8_e4m3fn, exact.

    e2m1 has exponent bias 1, e4m3 bias 7: a normal code ``e m`` (e > 0) is
    e4m3 exponent ``e + 6`` with mantissa ``m`` at the top mantissa bit; the
    one subnormal, 0.5, is e4m3 exponent 6 with mantissa 0; the sign moves
    from bit 3 to bit 7.
    """
    codes = jnp.asarray(codes).astype(jnp.uint8)
    magnitude = codes & 7
    exponent, mantissa = magnitude >> 1, magnitude & 1
    normal = ((exponent + 6) << 3) | (mantissa << 2)
    bits = jnp.where(magnitude == 0, jnp.uint8(0),
                     jnp.where(exponent == 0, jnp.uint8(6 << 3), normal.astype(jnp.uint8)))
    bits = bits | ((codes & 8) << 4)
    return lax.bitcast_convert_type(bits.astype(jnp.uint8), FP8_DTYPE)


def unpack_fp4(packed, axis: int):
    """uint8 pairs of e2m1 codes along `axis` -> float8_e4m3fn values (axis doubled)."""
    packed = jnp.asarray(packed)
    axis = axis % packed.ndim
    low, high = fp4_to_fp8(packed & 0xF), fp4_to_fp8(packed >> 4)
    both = jnp.stack([low, high], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def round_to_e4m3(v):
    """float32 -> the nearest e4m3fn value as float32, ties to even, saturating at 448.

    Rounded with integer arithmetic on the float32 bits rather than by XLA's
    f32 -> f8e4m3fn convert, which some XLA:CPU versions (jaxlib 0.7.1) do
    through float16, rounding twice: one code off at about 0.2% of values.
    Normal range (|v| >= 2**-6): keep 3 of the 23 mantissa bits, round half
    to even on the dropped 20 (a carry moves into the exponent, as it
    should). Subnormal range: multiples of 2**-9, rounded half to even.
    """
    v = jnp.asarray(v, jnp.float32)
    bits = lax.bitcast_convert_type(v, jnp.uint32)
    keep_odd = (bits >> 20) & 1
    normal = lax.bitcast_convert_type((bits + jnp.uint32(0x7FFFF) + keep_odd)
                                      & jnp.uint32(0xFFF00000), jnp.float32)
    subnormal = jnp.round(v * 2.0 ** 9) * 2.0 ** -9  # both scalings exact
    rounded = jnp.where(jnp.abs(v) < 2.0 ** -6, subnormal, normal)
    return jnp.clip(rounded, -FP8_MAX, FP8_MAX)


def quantize_activation_fp8(x, block_size: int, absmax=None):
    """Quantizes `x` [M, K] to e4m3fn per token (and input block).

    `absmax` [M, n_groups], if given, replaces the group maxima of |x| (a
    row-parallel layer passes the maximum over its shards).

    Returns:
      (x_q float8_e4m3fn [M, K], x_scale float32 [M, n_groups]), with
      ``x ~= x_scale * x_q``.
    """
    absmax, scaled = quantize_groups(x, block_size, absmax, FP8_MAX)
    x_q = round_to_e4m3(scaled).astype(FP8_DTYPE)  # exact: already an e4m3 value
    x_scale = jnp.where(absmax == 0, 1.0, divide_exactly(absmax, FP8_MAX))
    return x_q.reshape(x.shape), x_scale


def fp4_codes(values: np.ndarray) -> np.ndarray:
    """Host: float values -> e2m1 codes (uint8), round to nearest even, saturating at 6."""
    import ml_dtypes  # ships with jax
    return np.asarray(values, np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
