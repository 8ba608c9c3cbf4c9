"""Float64 numpy statement of API.md's convention, independent of xla_qops.

Used by every numerics test as the ground truth. It shares no code with the
package: int4 unpacking, blockwise layouts and activation quantization are
written out again here, from API.md's text.
"""

import os

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


def _scaled_groups(x, block_size: int, top: float):
    """(absmax float32 [M, groups], x * (top / absmax) float32 [M, groups, B]):
    the float32 steps the activation rules share (0 for all-zero groups)."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    group = k if block_size == -1 else block_size
    g = x.reshape(m, k // group, group)
    absmax = np.abs(g).max(-1)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(absmax == 0, np.float32(0), np.float32(top) / absmax)
    return absmax, (g * inv_scale.astype(np.float32)[..., None]).astype(np.float32)


def quantize_activation(x: np.ndarray, block_size: int):
    """API.md's per-token (and per-block) symmetric int8, in float32 like the spec."""
    absmax, scaled = _scaled_groups(x, block_size, 127)
    q = np.clip(np.round(scaled), -127, 127)
    x_scale = (absmax / np.float32(127.0)).astype(np.float32)
    return q.reshape(np.shape(x)), x_scale


# ----------------------------------------------------- float element formats
# API.md section 7, written out from its text: e4m3fn and e2m1 decoding by
# their bit fields, rounding to e4m3 by search of its value grid, and the fp8
# activation rule; `quantized_matmul` and the bound take `weight_format` and
# `activation_format` for them.

E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e4m3fn_value(bits) -> np.ndarray:
    """float64 value of e4m3fn bit patterns (uint8): 1 sign, 4 exponent bits
    (bias 7), 3 mantissa bits; exponent 0 is subnormal; 0x7F/0xFF are NaN."""
    b = np.asarray(bits).astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exponent, mantissa = (b >> 3) & 0xF, b & 0x7
    value = np.where(exponent == 0, mantissa / 8.0 * 2.0 ** -6,
                     (1 + mantissa / 8.0) * 2.0 ** (exponent - 7))
    value = np.where((b & 0x7F) == 0x7F, np.nan, value)
    return sign * value


def e2m1_value(codes) -> np.ndarray:
    """float64 value of e2m1 codes (low nibble): sign bit 3, magnitude by bits 0-2."""
    c = np.asarray(codes).astype(np.int64) & 0xF
    return np.where(c & 8, -1.0, 1.0) * E2M1_MAGNITUDES[c & 7]


def fp8_bits(w) -> np.ndarray:
    """The uint8 bit patterns of a float8_e4m3fn array (numpy/ml_dtypes or JAX)."""
    return np.asarray(w).view(np.uint8)


def float_values(w, weight_format, block_size) -> np.ndarray:
    """value(q) in the stored layout, float64, unpacked."""
    if weight_format == "fp8":
        return e4m3fn_value(fp8_bits(w))
    axis = -1 if block_size == -1 else 1
    p = np.asarray(w).astype(np.int64)
    both = np.stack([e2m1_value(p & 0xF), e2m1_value(p >> 4)], axis=(axis % p.ndim) + 1)
    shape = list(p.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def dequantize_float(w, scale, weight_format, block_size) -> np.ndarray:
    """float64 ``scale * value(q)`` as [out, in]."""
    v = float_values(w, weight_format, block_size)
    scale = np.asarray(scale, np.float64)
    if block_size == -1:
        return v * scale[:, None]
    wf = v * scale[:, None, :]
    return wf.reshape(-1, wf.shape[-1]).T


def round_to_e4m3(v) -> np.ndarray:
    """float32 -> nearest e4m3fn value (ties to the even code), saturating at 448.

    The non-negative finite codes 0..126 increase with their value, so the
    even code of a tie is the even index into that grid."""
    grid = e4m3fn_value(np.arange(127))  # 0 .. 448
    v = np.clip(np.asarray(v, np.float64), -448.0, 448.0)
    a = np.abs(v)
    upper = np.clip(np.searchsorted(grid, a, side="left"), 0, 126)
    lower = np.clip(upper - 1, 0, 126)
    below, above = a - grid[lower], grid[upper] - a
    pick_upper = (above < below) | ((above == below) & (upper % 2 == 0))
    out = np.where(pick_upper, grid[upper], grid[lower])
    out = np.where(a == grid[upper], grid[upper], out)
    return np.copysign(out, v)


def quantize_activation_fp8(x: np.ndarray, block_size: int):
    """API.md's fp8 activation rule in float32 steps: per token (and block),
    inv = 448 / amax, x_q = e4m3(clip(x * inv)), scale = amax / 448; all-zero
    groups scale 1. Returns (x_q as float64 values [M, K], scale float32 [M, groups])."""
    absmax, scaled = _scaled_groups(x, block_size, 448)
    q = round_to_e4m3(scaled)
    x_scale = np.where(absmax == 0, np.float32(1), absmax / np.float32(448)).astype(np.float32)
    return q.reshape(np.shape(x)), x_scale




def dequantize_any(w, scale, zero_point, block_size, weight_format=None) -> np.ndarray:
    """The float64 weight [out, in] of any weight format (None: int8 or int4 by dtype)."""
    if weight_format in ("fp8", "fp4"):
        assert zero_point is None, "the float formats have no zero point"
        return dequantize_float(w, scale, weight_format, block_size)
    return dequantize(w, scale, zero_point, block_size, np.asarray(w).dtype == np.uint8)


def quantize_activation_as(activation_format, x, block_size):
    """(x_q values float64 [M, K], x_scale float32 [M, groups]) in "int8" or "fp8"."""
    if activation_format == "fp8":
        return quantize_activation_fp8(x, block_size)
    q, s = quantize_activation(x, block_size)
    return q.astype(np.float64), s


def quantized_matmul(x, w, scale, zero_point=None, block_size=-1, int4_weight=False,
                     quantize_activation_=False, *, weight_format=None,
                     activation_format=None) -> np.ndarray:
    """float64 result of API.md's convention, shape [..., out].

    `weight_format` None: int8 or int4 by w's dtype; "fp8" / "fp4" for
    section 7's formats. `activation_format` applies with
    `quantize_activation_`: None means "int8".
    """
    x = np.asarray(x, np.float32)  # bf16/f16 -> f32 is exact
    wf = dequantize_any(w, scale, zero_point, block_size, weight_format)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if quantize_activation_:
        q, s = quantize_activation_as(activation_format, x2, block_size)
        group = x2.shape[1] // s.shape[1]
        x64 = q * np.repeat(s.astype(np.float64), group, axis=1)
    else:
        x64 = x2.astype(np.float64)
    return (x64 @ wf.T).reshape(*lead, wf.shape[0])


def quantized_matmul_formats(x, w, scale, zero_point=None, block_size=-1, *,
                             weight_format, activation_format=None) -> np.ndarray:
    """`quantized_matmul` named by formats: `activation_format` None is A16."""
    return quantized_matmul(x, w, scale, zero_point, block_size, False,
                            activation_format is not None, weight_format=weight_format,
                            activation_format=activation_format)


# Unit roundoff (half an ulp, relative) of each output dtype.
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24}
# Half the smallest subnormal of each output dtype: the absolute error of
# rounding a result that lands in the subnormal range.
SUBNORMAL_HALF_STEP = {"bfloat16": 2.0 ** -134, "float16": 2.0 ** -25, "float32": 2.0 ** -150}
F32_EPS = 2.0 ** -24
# Safety factor of the statistical accumulation term of `tolerance`.
SIGMAS = 8.0
# An activation whose x * inv_scale lies within this relative distance of a
# .5 tie may round to either int8 neighbour (`near_ties`).
TIE_WINDOW = 2.0 ** -21


def _weight_terms(w, scale, zero_point, block_size, weight_format=None):
    """float64 ``scale * value(q)`` and the zero point, both expanded to [out, in]
    (zero point None)."""
    sq = dequantize_any(w, scale, None, block_size, weight_format)
    if zero_point is None:
        return sq, None
    zp = np.asarray(zero_point, np.float64)
    z = np.repeat(zp, block_size, axis=0).T if block_size != -1 else np.broadcast_to(
        zp[:, None], sq.shape)
    return sq, z


def _activations(x2, block_size, quantize_activation_, activation_format=None):
    """The float64 activations the product multiplies ([M, K]; x_scale * x_q for A8)
    and, for A8, x_scale expanded to [M, K] (else None)."""
    if not quantize_activation_:
        return x2.astype(np.float64), None
    q, s = quantize_activation_as(activation_format, x2, block_size)
    group = x2.shape[1] // s.shape[1]
    s_k = np.repeat(s.astype(np.float64), group, axis=1)
    return q * s_k, s_k


def near_ties(x, block_size):
    """[M, K] bool: activations whose int8 value is not robust to the last bits.

    API.md's x_q = round(x * inv_scale) with float32 operations
    (pallas_kernels/activation.py); an implementation that forms the quotient
    otherwise (x / x_scale, as torch_xla does; a fused multiply; a TPU's
    division) may differ by an ulp or two of x * inv_scale, which moves an
    activation lying that close to a .5 tie to the other int8 neighbour.
    Exact ties are common with bfloat16 x (~100 per row of 14336: x / absmax
    is a ratio of two 8-bit significands), rare with float32 x (~1 in 10^5).
    """
    _, scaled = _scaled_groups(x, block_size, 127)
    v = np.abs(scaled).astype(np.float64)
    near = np.abs(v - np.floor(v) - 0.5) <= TIE_WINDOW * np.maximum(v, 1.0)
    return near.reshape(np.shape(x))


def tolerance(x, w, scale, zero_point, block_size, out_dtype, quantize_activation_=False,
              activation_ties=False, *, weight_format=None, activation_format=None):
    """Elementwise error bound for an implementation against `quantized_matmul`
    (the sum of `tolerance_parts`)."""
    rounding, accumulation = tolerance_parts(x, w, scale, zero_point, block_size, out_dtype,
                                             quantize_activation_, activation_ties,
                                             weight_format=weight_format,
                                             activation_format=activation_format)
    return rounding + accumulation


def tolerance_parts(x, w, scale, zero_point, block_size, out_dtype, quantize_activation_=False,
                    activation_ties=False, *, weight_format=None, activation_format=None):
    """(final rounding, accumulation) parts of the elementwise error bound for an
    implementation against `quantized_matmul`.

    An implementation computes in float32 -- products exact or rounded once,
    the scale and zero point applied to the weight or to partial sums, sums
    in any order and grouping (sequential, SIMD lanes, tiles, blocks, shards)
    -- and rounds once to the output dtype. Per output element, with
    ``t_k = x_k * (scale_k q_k)`` and ``z_k = x_k * zero_point_k`` the terms
    it adds (x the float32 activations, or ``x_scale * x_q`` for A8):

        A = sqrt(sum_k (|t_k| + |z_k|)^2)      spread of the terms
        D = |sum_k t_k| + |sum_k z_k|          what partial sums drift towards
        bound = u_out * |y|                                 final rounding
              + min(SIGMAS * u32 * sqrt(K) * (A + D),       accumulation, statistical
                    (K + 2) * u32 * sum_k (|t_k| + |z_k|))  accumulation, worst case
              + x_scale * |w_k| for each activation at a tie (A8 with
                                                    activation_ties only)

    Why the statistical term: each float32 addition ``s_i + v`` errs by
    ``delta_i`` with ``|delta_i| <= u32 |s_i + v|``, and these errors behave as
    independent zero-mean variables (uniform over half an ulp), so the total
    is a sum of K of them with standard deviation at most
    ``u32 / sqrt(3) * sqrt(sum_i s_i^2)``, not their worst case
    ``u32 * sum_i |s_i|``. For sequential summation of zero-mean terms the
    partial sums are a random walk, ``sum_i s_i^2 ~ K^2 rms(t)^2 / 2 =
    K A^2 / 2``; terms with a common sign drift linearly towards the total,
    adding ``K D^2 / 3``; a two-level grouping (lanes or tiles, then their
    sums) at most doubles the sum. So ``sigma <= 0.577 * u32 * sqrt(K) *
    (A + D)``; SIGMAS = 8 is about 14 of those sigmas, which leaves room for
    partial sums whose random walk strays twice as far as typical (the
    error's distribution is a mixture over such paths, heavier-tailed than a
    normal). Measured: float32 sequential summation, the worst order,
    reaches 0.15 of this term, BLAS-ordered sums 0.12 (~10^5 elements of
    K = 96 ... 14336, tests/test_reference_checker.py asserts < 0.25); the
    suite's real implementations (XLA:CPU, the C++ kernels, Pallas in
    interpret mode, torch paths, sharded sums) at most 0.13 of the
    accumulation part. The per-term roundings (a product, the weight
    dequantized in float32, the scale applied to a partial sum) add a few
    u32 * A and u32 * D, far inside it. The worst-case term (Higham's
    gamma_K) is the smaller one for K below a few hundred, where it is tight
    enough anyway.

    Activation quantization: API.md's integers are defined by float32
    operations (one division per group, one multiply per element,
    round-half-even; pallas_kernels/activation.py), which the reference and
    every backend of this project perform identically (tests/test_numerics.py
    pins the bits), so ``x_scale * x_q`` is the exact input of both and
    int8 x int8 products are exact: by default an activation rounded to the
    other neighbour is an error, as it was under the old bound at small K.
    `activation_ties=True` is for implementations outside the project that
    form the quotient otherwise (torch_xla: x / x_scale): each activation at
    a tie (`near_ties`) may then be one x_scale step off, x_scale * |w_k|
    added per such activation. (It is opt-in because bfloat16 inputs put
    ~100 activations of a 14336-long row on exact ties, whose allowance would
    hide a bfloat16-rounded weight.) The fp8 activation rule (section 7) is
    likewise defined by float32 operations and round-to-nearest-even, and an
    e4m3 activation times an e4m3, e2m1 or int8 weight value is exact in
    float32 (at most 4 x 8 significand bits): the same bound holds.

    What it catches (tests/test_reference_checker.py, K = 96 ... 14336, every
    activation dtype, A16 and A8): a uniform 1% error, 8 input features
    dropped, the weight rounded to bfloat16 -- which the old worst-case bound,
    growing as K u32 sum|t|, let through at full-size K.
    """
    x = np.asarray(x, np.float32)
    x2 = x.reshape(-1, x.shape[-1])
    k = x2.shape[1]
    sq, z = _weight_terms(w, scale, zero_point, block_size, weight_format)
    xe, s_k = _activations(x2, block_size, quantize_activation_, activation_format)
    p = xe @ sq.T
    if z is None:
        zsum = np.zeros_like(p)
    else:  # sum_k x_k zp_k, from per-group sums of x (z is constant over a group)
        group = k if block_size == -1 else block_size
        zp = np.asarray(zero_point, np.float64).reshape(-1, sq.shape[0])  # [groups, out]
        zsum = xe.reshape(xe.shape[0], -1, group).sum(-1) @ zp
    y = np.abs(p - zsum)
    mag = np.abs(sq) if z is None else np.abs(sq) + np.abs(z)
    spread = np.sqrt((xe * xe) @ (mag * mag).T)
    drift = np.abs(p) + np.abs(zsum)
    acc = SIGMAS * F32_EPS * np.sqrt(k) * (spread + drift)
    if 2 * SIGMAS * np.sqrt(k) > k + 2:  # else (A, D <= sum|t|) never the smaller one
        acc = np.minimum(acc, (k + 2) * F32_EPS * (np.abs(xe) @ mag.T))
    if quantize_activation_ and activation_ties:
        steps = near_ties(x2, block_size) * s_k
        if steps.any():
            acc = acc + steps @ np.abs(sq if z is None else sq - z).T
    name = np.dtype(out_dtype).name
    u_out = UNIT_ROUNDOFF[name]
    shape = (*x.shape[:-1], sq.shape[0])
    return ((u_out * y + SUBNORMAL_HALF_STEP[name]).reshape(shape),
            ((1 + u_out) * acc).reshape(shape))


def _log_ratio(ratio, acc_ratio, actual, x, quantize_activation_):
    """With XLA_QOPS_TOLERANCE_LOG=<file>: one line per check, the worst
    |error| / tolerance and the worst (|error| - rounding part) / accumulation
    part (to measure the margin the suite runs with)."""
    path = os.environ.get("XLA_QOPS_TOLERANCE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{ratio:.4g}\t{acc_ratio:.4g}\tK={np.shape(x)[-1]}\t{np.asarray(x).dtype}\tA8={bool(quantize_activation_)}"
                    f"\t{actual.shape}\t{os.environ.get('PYTEST_CURRENT_TEST', '?')}\n")


def assert_close(actual, x, w, scale, zero_point=None, block_size=-1,
                 quantize_activation_=False, activation_ties=False, *, weight_format=None,
                 activation_format=None):
    """Asserts |actual - reference| <= tolerance elementwise, with a useful message.

    A NaN or infinity where the reference is finite is outside the tolerance.
    """
    actual = np.asarray(actual, np.float64)
    formats = dict(weight_format=weight_format, activation_format=activation_format)
    ref = quantized_matmul(x, w, scale, zero_point, block_size, False, quantize_activation_,
                           **formats)
    rounding, accumulation = tolerance_parts(x, w, scale, zero_point, block_size,
                                             np.asarray(x).dtype, quantize_activation_,
                                             activation_ties, **formats)
    tol = rounding + accumulation
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.abs(actual - ref)
        finite = np.isfinite(ref)
        bad = np.where(finite, ~(err <= tol),
                       ~((np.isnan(ref) & np.isnan(actual)) | (ref == actual)))
        ratio = np.where(finite & np.isfinite(err), err / tol, np.where(bad, np.inf, 0.0))
        acc_ratio = np.where(finite & np.isfinite(err), (err - rounding) / accumulation, 0.0)
    _log_ratio(float(ratio.max(initial=0.0)), float(acc_ratio.max(initial=0.0)), actual, x,
               quantize_activation_)
    if bad.any():
        i = np.unravel_index(np.argmax(ratio), err.shape)
        raise AssertionError(
            f"{bad.sum()} of {bad.size} elements outside tolerance; worst at {i}: "
            f"got {actual[i]}, reference {ref[i]}, |err| {err[i]:.3g} > tol {tol[i]:.3g} "
            f"({ratio[i]:.3g} x)")


def hadamard_rotation(block: int, in_features: int) -> np.ndarray:
    """smoothing="hadamard"'s rotation [in, in], float64: block-diagonal, each block the
    normalised Sylvester Hadamard matrix by its definition H[i, j] = (-1)^popcount(i & j)
    / sqrt(block) (independent of xla_qops.quantizers.rotation's recursive construction)."""
    i = np.arange(block)
    parity = np.vectorize(lambda v: bin(v).count("1") % 2)(i[:, None] & i[None, :])
    return np.kron(np.eye(in_features // block), np.where(parity, -1.0, 1.0) / np.sqrt(block))
