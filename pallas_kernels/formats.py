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


# ------------------------------------------------------- decoding inside kernels
#
# A kernel that cannot feed e4m3fn to its dot (TPU before v7, GPUs before
# Hopper / Ada) widens the bytes itself. Neither Mosaic (jaxlib 0.7.1: no
# f8 -> bf16 cast) nor Triton before sm_89 converts float8 values, and not
# every TPU generation has 8-bit shifts, so the decoders below take the bytes
# widened to int32 and use 32-bit integer ops, one bitcast and a select. Every
# value they produce is exact in float32 (and in bfloat16 and float16).


def e4m3_bits_to_float32(bits):
    """e4m3fn bit patterns (an integer array, the byte in the low 8 bits) -> float32, exact.

    Normal (exponent field e > 0): float32 exponent ``e - 7 + 127``, the three
    mantissa bits at the top of float32's; subnormal (e = 0): ``m * 2**-9``.
    The NaN pattern (0x7F / 0xFF) decodes as 480: quantized weights and
    activations are finite.
    """
    bits = bits.astype(jnp.int32)
    exponent, mantissa = (bits >> 3) & 15, bits & 7
    normal = lax.bitcast_convert_type(((exponent + 120) << 23) | (mantissa << 20), jnp.float32)
    magnitude = jnp.where(exponent == 0, mantissa.astype(jnp.float32) * 2.0 ** -9, normal)
    return jnp.where((bits & 0x80) != 0, -magnitude, magnitude)


def e2m1_codes_to_float32(codes):
    """e2m1 codes (an integer array, the code in the low 4 bits) -> float32, exact.

    Normal (exponent field e > 0): float32 exponent ``e - 1 + 127``, the
    mantissa bit at the top of float32's; e = 0: 0 or the subnormal 0.5.
    """
    codes = codes.astype(jnp.int32)
    exponent, mantissa = (codes >> 1) & 3, codes & 1
    normal = lax.bitcast_convert_type(((exponent + 126) << 23) | (mantissa << 22), jnp.float32)
    magnitude = jnp.where(exponent == 0, mantissa.astype(jnp.float32) * 0.5, normal)
    return jnp.where((codes & 8) != 0, -magnitude, magnitude)


def e2m1_codes_to_e4m3(codes):
    """e2m1 codes (an integer array, the code in the low 4 bits) -> float8_e4m3fn, exact.

    `fp4_to_fp8`'s bit mapping in 32-bit integer ops (no 8-bit shifts), then
    narrowed to a byte and reinterpreted: no float conversion, which Mosaic
    (jaxlib 0.7.1) does not lower for e4m3fn.
    """
    codes = codes.astype(jnp.int32)
    magnitude = codes & 7
    exponent, mantissa = magnitude >> 1, magnitude & 1
    normal = ((exponent + 6) << 3) | (mantissa << 2)
    bits = jnp.where(magnitude == 0, 0, jnp.where(exponent == 0, 6 << 3, normal))
    bits = bits | ((codes & 8) << 4)
    return lax.bitcast_convert_type(bits.astype(jnp.uint8), FP8_DTYPE)


def _nibble(w, part: int):
    """Code `part` (0 = low nibble = even feature, 1 = high) of packed bytes, as int32."""
    v = w.astype(jnp.int32)
    if part == 1:
        v = v >> 4  # uint8 widened: logical and arithmetic shifts agree
    return v & 15


def _bytes_as_int32(a):
    """An e4m3fn array's bytes, widened to int32 (0..255)."""
    return lax.bitcast_convert_type(a, jnp.uint8).astype(jnp.int32)


def to_float32(a):
    """An operand tile as float32, exactly: e4m3fn by its bits (`e4m3_bits_to_float32`),
    any other dtype by conversion."""
    if jnp.dtype(a.dtype) == jnp.dtype(FP8_DTYPE):
        return e4m3_bits_to_float32(_bytes_as_int32(a))
    return a.astype(jnp.float32)


def activation_operand(x, dtype):
    """An activation tile (bf16 / f16 / f32, int8 or e4m3fn) as the dot operand `dtype`.

    e4m3fn and int8 values are exact in bfloat16, float16 and float32, so a
    widening never rounds.
    """
    if jnp.dtype(x.dtype) == jnp.dtype(dtype):
        return x
    return to_float32(x).astype(dtype)


def float_weight_part(w, part: int, weight_format: str, dtype):
    """One dot operand from a stored fp8 / fp4 weight tile, inside a kernel.

    fp8 (e4m3fn storage): as is when `dtype` is e4m3fn, else decoded by its
    bits. fp4 (uint8, two codes per byte): the nibble of `part` (0 = low =
    even feature), as e4m3fn (`e2m1_codes_to_e4m3`) or decoded to float32
    and converted (exact) to `dtype`. `operands.weight_part` is the integer
    counterpart.
    """
    to_e4m3 = jnp.dtype(dtype) == jnp.dtype(FP8_DTYPE)
    if weight_format == "fp8":
        return w if to_e4m3 else to_float32(w).astype(dtype)
    if weight_format != "fp4":
        raise ValueError(f"weight_format: expected 'fp8' or 'fp4', got {weight_format!r}")
    codes = _nibble(w, part)
    if to_e4m3:
        return e2m1_codes_to_e4m3(codes)
    return e2m1_codes_to_float32(codes).astype(dtype)


def kernel_formats(w_dtype, weight_format: str | None, activation_format: str | None,
                   quantize_activation: bool) -> tuple[str, str | None]:
    """(weight_format, activation_format) of a kernel call, with API.md section 7's
    defaults: an e4m3fn weight is "fp8", a uint8 one packed "int4" (fp4 must be
    named), an int8 one "int8"; the activations "fp8" for float weights and
    "int8" for integer ones with `quantize_activation`, else None."""
    if weight_format is None:
        w_dtype = jnp.dtype(w_dtype)
        weight_format = ("fp8" if w_dtype == jnp.dtype(FP8_DTYPE)
                         else "int4" if w_dtype == jnp.uint8 else "int8")
    if not quantize_activation:
        return weight_format, None
    if activation_format is None:
        activation_format = "fp8" if weight_format in ("fp8", "fp4") else "int8"
    return weight_format, activation_format


def kernel_name(block_size: int, packed: bool, weight_format: str,
                activation_format: str | None) -> str:
    """``quantized_matmul_per_channel_packed_int4_a8`` and the like (the GPU
    kernel's too): int8 containers unnamed, fp8 / fp4 weights and fp8
    activations by their format."""
    weight = {"fp8": "_fp8", "fp4": "_fp4"}.get(weight_format,
                                                 "_packed_int4" if packed else "")
    act = {None: "", "int8": "_a8", "fp8": "_a8_fp8"}[activation_format]
    return ("quantized_matmul_" + ("blockwise" if block_size != -1 else "per_channel")
            + weight + act)
