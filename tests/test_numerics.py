"""Numerics that must be exact: the same bits on every JAX version.

`make test` runs this on JAX 0.7.1 and on the newest JAX. XLA rewrites a
division by a broadcast or a constant into a multiplication by the
reciprocal (one ulp off, enough to move a .5 tie to the other integer), and
fuses a multiply and a subtract into one FMA, so numerics that must be exact
are computed where no such rewrite applies (xla_qops/quantize.py,
pallas_kernels/activation.py). Each check here compares with the definition
evaluated in float64 numpy and rounded once to float32 per operation (the
correctly rounded float32 result of +, -, *, /), bit for bit, and the
outputs for a fixed, platform-independent input are pinned by a hash that
must not change between versions.
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_qops
from pallas_kernels import activation

F32 = np.float32


def f32(v):
    """A float64 result rounded once to float32."""
    return np.asarray(v, np.float64).astype(F32)


TIE_SCALE = 7 * 2.0 ** -12  # few significand bits; its reciprocal is off by ~1 ulp


def integer_weight(n, k):
    """A weight with no RNG or transcendental behind it (identical on every
    numpy): multiples of 2**-15, and every sixth row built so that its int8
    per-channel scale is TIE_SCALE and its quotients w / scale are exact
    halves -- the ties a multiplication by 1/scale can push either way."""
    i = np.arange(n * k, dtype=np.int64)
    w = ((i * 2654435761) % 65521 - 32760).astype(np.float64) * 2.0 ** -15
    w = w.reshape(n, k)
    halves = (np.arange(k) % 200 - 99.5) * TIE_SCALE
    for r in range(0, n, 6):
        w[r] = halves
        w[r, 0] = 127 * TIE_SCALE  # absmax: scale = 127 * TIE_SCALE / 127, exact
    return w.astype(F32)


def rtn_float64(w, bits, block_size, symmetric):
    """quantize_weight's definition, one correctly rounded float32 step at a time."""
    qmin, qmax = {8: (-128, 127), 4: (-8, 7)}[bits]
    n, k = w.shape
    g = w.astype(np.float64)
    g = g if block_size == -1 else g.reshape(n, k // block_size, block_size).transpose(1, 0, 2)
    lo, hi = g.min(-1), g.max(-1)
    absmax = np.maximum(np.abs(lo), np.abs(hi))
    if symmetric:
        scale = np.where(absmax == 0, F32(1), f32(absmax / qmax))
        zero = None
        q = np.rint(f32(g / scale.astype(np.float64)[..., None]))
    else:
        spread = f32(hi - lo)
        scale = np.where(spread > 0, f32(spread.astype(np.float64) / (qmax - qmin)),
                         np.where(absmax == 0, F32(1), f32(absmax / qmax)))
        zero = np.where(absmax == 0, F32(0),
                        f32(f32(scale.astype(np.float64) * qmin).astype(np.float64) - lo))
        shifted = f32(g + zero.astype(np.float64)[..., None])
        q = np.rint(f32(shifted.astype(np.float64) / scale.astype(np.float64)[..., None]))
    q = np.clip(q, qmin, qmax).astype(np.int8)
    if block_size != -1:
        q = q.transpose(0, 2, 1)
    return q, scale.astype(F32), None if zero is None else zero.astype(F32)


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(np.asarray(a))
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


WEIGHT_CASES = [(8, -1, True), (8, -1, False), (4, 32, True), (4, 32, False)]
# sha256 of (q, scale, zero_point) of quantize_weight(integer_weight(48, 256))
# per case; identical on JAX 0.7.1 and the newest JAX.
WEIGHT_DIGESTS = {
    (8, -1, True): "c1a66838d49cab71",
    (8, -1, False): "1b3d90edb7ed8c5a",
    (4, 32, True): "fe94f22938c23eeb",
    (4, 32, False): "bbd9030a674553bf",
}


@pytest.mark.parametrize("bits,block_size,symmetric", WEIGHT_CASES)
def test_quantize_weight_bits(bits, block_size, symmetric):
    w = integer_weight(48, 256)
    q, scale, zero = rtn_float64(w, bits, block_size, symmetric)
    for qw in (xla_qops.quantize_weight(w, bits=bits, block_size=block_size,
                                        symmetric=symmetric, pack=False),
               jax.jit(lambda w: xla_qops.quantize_weight(
                   w, bits=bits, block_size=block_size, symmetric=symmetric, pack=False))(w)):
        np.testing.assert_array_equal(np.asarray(qw.w), q)
        np.testing.assert_array_equal(np.asarray(qw.scale).view(np.uint32), scale.view(np.uint32))
        if symmetric:
            assert qw.zero_point is None
        else:
            np.testing.assert_array_equal(np.asarray(qw.zero_point).view(np.uint32),
                                          zero.view(np.uint32))
    assert digest(q, scale, zero) == WEIGHT_DIGESTS[(bits, block_size, symmetric)]


def test_quantize_weight_ties_are_exercised():
    """The fixture has quotients w / scale at exact halves, and there a
    multiplication by the (inexact) reciprocal gives other integers: what
    XLA's rewrite of the division would do."""
    w = integer_weight(48, 256)
    q, scale, _ = rtn_float64(w, 8, -1, True)
    assert scale[0] == F32(TIE_SCALE)
    quotient = w.astype(np.float64) / scale.astype(np.float64)[:, None]
    assert np.sum(quotient - np.floor(quotient) == 0.5) >= 8 * 200
    reciprocal = f32(1 / scale.astype(np.float64))
    by_reciprocal = np.clip(np.rint(w * reciprocal[:, None]), -128, 127).astype(np.int8)
    assert np.sum(by_reciprocal != q) > 0


def activation_float64(x, block_size):
    """activation.quantize_activation's definition, one rounding per step."""
    m, k = x.shape
    g = x.astype(np.float64).reshape(m, k // (k if block_size == -1 else block_size), -1)
    absmax = np.abs(g).max(-1)
    inv = np.where(absmax == 0, F32(0), f32(127 / np.where(absmax == 0, 1, absmax)))
    q = np.clip(np.rint(f32(g * inv.astype(np.float64)[..., None])), -127, 127)
    return q.reshape(m, k).astype(np.int8), np.where(absmax == 0, F32(0), f32(absmax / 127))


def activation_input(m, k, dtype):
    i = np.arange(m * k, dtype=np.int64)
    x = ((i * 40503) % 8191 - 4095).astype(np.float64) * 2.0 ** -9
    x[:k] = 0.0  # an all-zero token
    return np.asarray(jnp.asarray(x.reshape(m, k).astype(F32), dtype)).astype(F32)


ACTIVATION_DIGESTS = {(-1, "bfloat16"): "c0582d1b8eabf570", (64, "bfloat16"): "fc48147b4370892c",
                      (-1, "float32"): "065b1d91e0e6765f", (64, "float16"): "9d5a01166c0bd831"}


@pytest.mark.parametrize("block_size,dtype", list(ACTIVATION_DIGESTS))
def test_activation_quantization_bits(block_size, dtype):
    """Integers and per-token scales, eagerly and under jit (where XLA would
    turn absmax / 127 into absmax * (1/127) without the barrier)."""
    x = activation_input(9, 256, dtype)
    q, x_scale = activation_float64(x, block_size)
    for fn in (activation.quantize_activation,
               jax.jit(activation.quantize_activation, static_argnums=1)):
        got_q, got_scale = fn(jnp.asarray(x, dtype), block_size)
        np.testing.assert_array_equal(np.asarray(got_q), q)
        np.testing.assert_array_equal(np.asarray(got_scale).view(np.uint32),
                                      x_scale.view(np.uint32))
    assert digest(q, x_scale) == ACTIVATION_DIGESTS[(block_size, dtype)]


def test_divide_exactly_resists_the_reciprocal_rewrite():
    """Under jit, x / 127 becomes x * (1/127) (the control shows it happens on
    this XLA); divide_exactly keeps the IEEE quotient."""
    x = (np.arange(1, 4097, dtype=F32) * F32(0.37)).astype(F32)
    exact = f32(x.astype(np.float64) / 127)
    rewritten = np.asarray(jax.jit(lambda v: v / 127.0)(x))
    assert np.sum(rewritten != exact) > 0
    kept = np.asarray(jax.jit(lambda v: activation.divide_exactly(v, 127.0))(x))
    np.testing.assert_array_equal(kept.view(np.uint32), exact.view(np.uint32))
