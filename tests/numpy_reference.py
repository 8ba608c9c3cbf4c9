"""Float64 numpy statement of API.md's convention, independent of xla_qops.

Used by every numerics test as the ground truth. It shares no code with the
package: int4 unpacking, blockwise layouts and activation quantization are
written out again here, from API.md's text.
"""

import numpy as np


def unpack_int4(packed: np.ndarray, axis: int) -> np.ndarray:
    """uint8 pairs along `axis` -> int8 values in [-8, 7] (even index = low nibble)."""
    p = packed.astype(np.int16)
    low = p & 0xF
    high = (p >> 4) & 0xF
    low = np.where(low >= 8, low - 16, low)
    high = np.where(high >= 8, high - 16, high)
    both = np.stack([low, high], axis=(axis % packed.ndim) + 1)
    shape = list(packed.shape)
    shape[axis] *= 2
    return both.reshape(shape).astype(np.int8)


def pack_int4(q: np.ndarray, axis: int) -> np.ndarray:
    """int8 in [-8, 7] -> uint8, ``(q[2i] & 0xF) | ((q[2i+1] & 0xF) << 4)``."""
    q = np.moveaxis(q.astype(np.int16), axis, -1)
    byte = (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)
    return np.moveaxis(byte.astype(np.uint8), -1, axis)


def dequantize(w, scale, zero_point, block_size, packed) -> np.ndarray:
    """The float64 weight ``scale * q - zero_point`` as [out, in]."""
    w = np.asarray(w)
    scale = np.asarray(scale, np.float64)
    zp = None if zero_point is None else np.asarray(zero_point, np.float64)
    if block_size == -1:
        q = unpack_int4(w, -1) if packed else w
        wf = q.astype(np.float64) * scale[:, None]
        if zp is not None:
            wf = wf - zp[:, None]
        return wf
    q = unpack_int4(w, 1) if packed else w  # [in/B, B, out]
    wf = q.astype(np.float64) * scale[:, None, :]
    if zp is not None:
        wf = wf - zp[:, None, :]
    return wf.reshape(-1, wf.shape[-1]).T


def quantize_activation(x: np.ndarray, block_size: int):
    """API.md's per-token (and per-block) symmetric int8, in float32 like the spec."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    group = k if block_size == -1 else block_size
    g = x.reshape(m, k // group, group)
    absmax = np.abs(g).max(-1)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(absmax == 0, np.float32(0), np.float32(127) / absmax)
    q = np.clip(np.round(g * inv_scale.astype(np.float32)[..., None]), -127, 127)
    x_scale = (absmax / np.float32(127.0)).astype(np.float32)
    return q.reshape(m, k), x_scale


def quantized_matmul(x, w, scale, zero_point=None, block_size=-1, int4_weight=False,
                     quantize_activation_=False) -> np.ndarray:
    """float64 result of API.md's convention, shape [..., out]."""
    x = np.asarray(x, np.float32)  # bf16/f16 -> f32 is exact
    packed = np.asarray(w).dtype == np.uint8
    wf = dequantize(w, scale, zero_point, block_size, packed)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if quantize_activation_:
        q, s = quantize_activation(x2, block_size)
        group = x2.shape[1] // s.shape[1]
        x64 = q.astype(np.float64) * np.repeat(s.astype(np.float64), group, axis=1)
    else:
        x64 = x2.astype(np.float64)
    return (x64 @ wf.T).reshape(*lead, wf.shape[0])


# Unit roundoff (half an ulp, relative) of each output dtype.
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24}
F32_EPS = 2.0 ** -24


def tolerance(x, w, scale, zero_point, block_size, out_dtype, quantize_activation_=False):
    """Elementwise error bound for an implementation against `quantized_matmul`.

    Derivation: an implementation computes in float32 (exact integer products
    and int32 sums for A8) and rounds once to the output dtype.
    * float32 accumulation of K products, and applying scale/zero point to
      partial sums, is bounded by the classic gamma_K ~= K * u32 times the sum
      of absolute terms S = |x| @ (|scale*q| + |zero_point|).T (the zero-point
      term enters separately, so cancellation is bounded by S, not |y|).
    * the final rounding to the output dtype adds u_out * |y|.
    * with activation quantization, x_q is defined by float32 operations
      (one IEEE division per group, one multiply per element, round-half-even;
      see xla_qops/activation.py), so the reference and every implementation
      get the same integers; only the final products
      x_scale * scale * acc are rounded, which the K * u32 * S term covers
      (S is taken with |x| + x_scale to bound |x_hat|).
    """
    x = np.asarray(x, np.float32)
    x2 = np.abs(x.reshape(-1, x.shape[-1]).astype(np.float64))
    packed = np.asarray(w).dtype == np.uint8
    q = np.abs(dequantize(w, np.abs(np.asarray(scale, np.float64)), None, block_size, packed))
    abs_w = q
    if zero_point is not None:
        zp = np.abs(np.asarray(zero_point, np.float64))
        abs_w = abs_w + (np.repeat(zp, block_size, axis=0).T if block_size != -1 else zp[:, None])
    if quantize_activation_:
        _, s = quantize_activation(x.reshape(-1, x.shape[-1]), block_size)
        group = x2.shape[1] // s.shape[1]
        x2 = x2 + np.repeat(s.astype(np.float64), group, axis=1)
    k = x2.shape[1]
    s_abs = x2 @ abs_w.T
    y = np.abs(quantized_matmul(x, w, scale, zero_point, block_size, False,
                                quantize_activation_).reshape(-1, abs_w.shape[0]))
    u_out = UNIT_ROUNDOFF[np.dtype(out_dtype).name]
    bound = u_out * y + (1 + u_out) * (k + 2) * F32_EPS * s_abs
    return bound.reshape(*x.shape[:-1], abs_w.shape[0])


def assert_close(actual, x, w, scale, zero_point=None, block_size=-1,
                 quantize_activation_=False):
    """Asserts |actual - reference| <= tolerance elementwise, with a useful message."""
    actual = np.asarray(actual, np.float64)
    ref = quantized_matmul(x, w, scale, zero_point, block_size, False, quantize_activation_)
    tol = tolerance(x, w, scale, zero_point, block_size, np.asarray(x).dtype,
                    quantize_activation_)
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    err = np.abs(actual - ref)
    bad = err > tol
    if bad.any():
        i = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(
            f"{bad.sum()} of {bad.size} elements outside tolerance; worst at {i}: "
            f"got {actual[i]}, reference {ref[i]}, |err| {err[i]:.3g} > tol {tol[i]:.3g}")
