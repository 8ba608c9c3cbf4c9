"""The fused XLA path's backward multiplies in the activation dtype (issue L, 3).

`xla_qops.quantized_matmul`'s custom VJP (for every impl) is the fused XLA
formula's backward, `xla_qops.backends.xla.vjp`. JAX's own transpose of the
forward contracted the float32 cotangent of the float32 accumulation against
the bf16 weight promoted to float32 (on cuda a float32 x float32 dot over a
float32 copy of the weight, on tpu a mixed f32 x bf16 one). Here:

* Lowering: ``jax.export`` for tpu and for cuda of forward plus backward
  (``jax.vjp``, with respect to x only as in a LoRA fine-tune, and to x,
  scale and zero point) with bfloat16 x, per-channel W8A16, blockwise W4A16
  g128 (packed int4) decode and prefill, symmetric and asymmetric: every dot
  with a weight-sized operand multiplies bf16 by bf16 into float32 at default
  precision, and (per-channel, decode) no float32 tensor of the weight's size
  exists at all.
* Numerics: each platform's backward run on this CPU (XLA:CPU executes bf16
  and f16 dots) against float64 numpy, with a bound derived from the one
  rounding the plan makes (below).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import numpy_reference as ref
import xla_qops
from cases import Scheme, all_schemes, make_weight, make_x
from xla_qops.backends import xla as backend
from xla_qops.spec import check_args

S = jax.ShapeDtypeStruct
DOT = re.compile(r"stablehlo\.dot_general (.*?) : \((tensor<[^>]*>), (tensor<[^>]*>)\) "
                 r"-> (tensor<[^>]*>)")
# Activation-sized tensors (M x K, M x N, the [in/B, M, out] decode partial
# sums, prefill's [M, 3K/2] split activation) stay below half the weight, so
# "weight-sized" (>= half: int4 contracts its nibble halves) means the weight.
K, N, BLOCK = 1024, 768, 128
DECODE, PREFILL = 8, 192
WEIGHT_HALF = K * N // 2


def element(tensor_type: str) -> str:
    return tensor_type.rsplit("x", 1)[-1].rstrip(">")


def elements(tensor_type: str) -> int:
    return int(np.prod([int(d) for d in tensor_type[len("tensor<"):].split("x")[:-1]]))


def lowered(platform, m, bits, block_size, symmetric, wrt):
    """StableHLO of (y, vjp(ct)) of impl="xla" exported for `platform`."""
    p = 2 if bits == 4 else 1
    w_dtype = jnp.uint8 if bits == 4 else jnp.int8
    if block_size == -1:
        w, s = S((N, K // p), w_dtype), S((N,), jnp.float32)
    else:
        w, s = S((K // block_size, block_size // p, N), w_dtype), S((K // block_size, N),
                                                                     jnp.float32)
    z = None if symmetric else s

    def fn(x, w, s, z, ct):
        def f(x, s, z):
            return xla_qops.quantized_matmul(x, w, s, z, block_size, bits == 4, impl="xla")
        if wrt == "x":
            y, pullback = jax.vjp(lambda x: f(x, s, z), x)
        else:
            y, pullback = jax.vjp(f, x, s, z)
        return y, pullback(ct)

    args = (S((m, K), jnp.bfloat16), w, s, z, S((m, N), jnp.bfloat16))
    return export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


EXPORT_CASES = [  # (bits, block_size, m, symmetric)
    (8, -1, DECODE, True), (8, -1, DECODE, False), (8, -1, PREFILL, False),
    (4, BLOCK, DECODE, True), (4, BLOCK, DECODE, False),
    (4, BLOCK, PREFILL, True), (4, BLOCK, PREFILL, False)]


@pytest.mark.parametrize("wrt", ["x", "all"])
@pytest.mark.parametrize("bits,block_size,m,symmetric", EXPORT_CASES,
                         ids=[f"w{b}-{'pc' if g == -1 else f'g{g}'}-m{m}-{'sym' if s else 'asym'}"
                              for b, g, m, s in EXPORT_CASES])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_weight_sized_dots_are_bf16_forward_and_backward(platform, bits, block_size, m,
                                                         symmetric, wrt):
    text = lowered(platform, m, bits, block_size, symmetric, wrt)
    found = DOT.findall(text)
    # A weight-sized operand, or result (prefill's dscale contracts x.T @ g).
    weight_dots = [d for d in found if max(map(elements, d[1:])) >= WEIGHT_HALF]
    bad = [d for d in weight_dots
           if not (element(d[1]) == element(d[2]) == "bf16" and element(d[3]) == "f32"
                   and "HIGHEST" not in d[0])]
    assert not bad, f"weight-sized dots not bf16 x bf16 -> f32 ({len(bad)} of {len(found)}): {bad}"
    # Not vacuous: the forward's dots and dx's (one per int4 nibble half),
    # plus the prefill dscale's x.T @ g (weight-sized output) with respect to all.
    halves = 2 if bits == 4 else 1
    expected = 2 * halves
    assert len(weight_dots) >= expected, weight_dots
    dx_dots = [d for d in weight_dots if elements(d[3]) * halves == m * K]
    assert len(dx_dots) == halves, weight_dots
    if block_size == -1 or m <= block_size:
        # No float32 copy of the weight anywhere (prefill dequantizes, by design,
        # in the forward too: xla_qops/backends/xla.py).
        copies = [t for t in re.findall(r"tensor<([0-9x]+)xf32>", text)
                  if int(np.prod([int(d) for d in t.split("x")])) >= WEIGHT_HALF]
        assert not copies, copies


# ---- numerics: each platform's backward, executed on this CPU

NUMERIC_SCHEMES = [s for s in all_schemes(block_size=32) if not s.quantize_activation]


def reference_grads(x, g, qw):
    """float64 (dx, dscale, dzero) of sum(y * g) for y = x @ W.T, W = scale*q - zp."""
    x64 = np.asarray(x, np.float64)
    g64 = np.asarray(g, np.float64)
    packed = np.asarray(qw.w).dtype == np.uint8
    w64 = ref.dequantize(qw.w, qw.scale, qw.zero_point, qw.block_size, packed)  # [N, K]
    q = ref.dequantize(qw.w, np.ones(np.shape(qw.scale)), None, qw.block_size, packed)
    m, k = x64.shape
    groups = 1 if qw.block_size == -1 else k // qw.block_size
    xg = x64.reshape(m, groups, -1)                                   # [M, groups, Kg]
    qg = q.T.reshape(groups, -1, q.shape[0])                          # [groups, Kg, N]
    dscale = np.einsum("mn,mgk,gkn->gn", g64, xg, qg)
    dzero = -np.einsum("mn,mg->gn", g64, xg.sum(-1))
    if qw.block_size == -1:
        dscale, dzero = dscale[0], dzero[0]
    # Sums of absolute terms, for the bounds: |W| <= |scale q| + |zp|.
    abs_w = np.abs(ref.dequantize(qw.w, np.abs(np.asarray(qw.scale, np.float64)), None,
                                  qw.block_size, packed))
    if qw.zero_point is not None:
        zp = np.abs(np.asarray(qw.zero_point, np.float64))
        abs_w = abs_w + (zp[:, None] if qw.block_size == -1
                         else np.repeat(zp, qw.block_size, axis=0).T)
    dx_terms = np.abs(g64) @ abs_w                                    # [M, K]
    scale_terms = np.einsum("mn,mgk,gkn->gn", np.abs(g64), np.abs(xg), np.abs(qg))
    zero_terms = np.einsum("mn,mg->gn", np.abs(g64), np.abs(xg).sum(-1))
    if qw.block_size == -1:
        scale_terms, zero_terms = scale_terms[0], zero_terms[0]
    return (g64 @ w64, dscale, dzero), (dx_terms, scale_terms, zero_terms)


def assert_within(name, actual, expected, bound):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    err = np.abs(actual - expected)
    i = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"{name}: {(err > bound).sum()} of {err.size} outside; "
                                  f"worst at {i}: |err| {err[i]:.3g} > bound {bound[i]:.3g}")


@pytest.mark.parametrize("platform,x_dtype", [("tpu", "bfloat16"), ("cuda", "bfloat16"),
                                              ("cuda", "float16")])
@pytest.mark.parametrize("scheme", NUMERIC_SCHEMES, ids=lambda s: s.id)
@pytest.mark.parametrize("m", [3, 40])  # blockwise: decode (M <= B) and prefill (M > B)
def test_backward_matches_float64(platform, x_dtype, scheme, m):
    """The bound. The plan rounds one factor of every product term to x's
    dtype (unit roundoff u = 2**-8 for bfloat16, 2**-11 for float16): the
    cotangent times the scale (per-channel, decode) or the dequantized weight
    (prefill); g, x and the integer weight are exact in it. So each term of
    dx = g @ W is off by at most u * |g| |W| (|W| <= |scale q| + |zp|), the
    float32 accumulation adds (N + 2) * 2**-24 of the same sums, and the final
    rounding of dx to x's dtype u * |dx|. This is the error of a bf16 / f16
    nn.Linear's backward, whose float weight is rounded to bf16 / f16 in the
    same way (and of the float32 transpose at TPU's default precision, which
    rounds its float32 operands to bf16). dscale and dzero multiply only exact
    operands (x, g, q) and accumulate in float32: (K + M + 4) * 2**-24 of their
    sums of absolute terms.
    """
    rng = np.random.default_rng(m)
    qw = make_weight(rng, n=48, k=256, scheme=scheme)
    x = make_x(rng, (m, 256), x_dtype)
    g = make_x(rng, (m, 48), x_dtype)
    spec = check_args(x, qw.w, qw.scale, qw.zero_point, qw.block_size, qw.int4_weight, False)
    dx, dscale, dzero = jax.jit(lambda x, s, z, g: backend.vjp(
        x, qw.w, s, z, spec, g, platform))(x, qw.scale, qw.zero_point, g)
    assert dx.dtype == x.dtype and dscale.dtype == qw.scale.dtype
    (dx_ref, dscale_ref, dzero_ref), (dx_abs, scale_abs, zero_abs) = reference_grads(x, g, qw)
    u = ref.UNIT_ROUNDOFF[x_dtype]
    f32 = ref.F32_EPS
    assert_within("dx", dx, dx_ref, (u + (48 + 2) * f32) * (1 + u) * dx_abs + u * np.abs(dx_ref))
    assert_within("dscale", dscale, dscale_ref, (256 + m + 4) * f32 * scale_abs)
    if qw.zero_point is None:
        assert dzero is None
    else:
        assert_within("dzero", dzero, dzero_ref, (256 + m + 4) * f32 * zero_abs)


def test_float16_cotangent_times_scale_neither_underflows_nor_overflows():
    """Small cotangents and small scales (float16 training without loss
    scaling): g * scale is ~1e-8, below float16's smallest normal (6e-5), so
    rounding it to float16 would lose most of its bits; the plan divides the
    scale by a power of two >= its largest entry first (exact), keeping the
    rounded factor at g's magnitude."""
    rng = np.random.default_rng(11)
    for scheme in (Scheme(8, -1, False, False, False), Scheme(8, 32, True, False, False)):
        w = rng.standard_normal((48, 256)).astype(np.float32) * 1e-3
        qw = xla_qops.quantize_weight(w, bits=8, block_size=scheme.block_size,
                                      symmetric=scheme.symmetric)
        x = make_x(rng, (3, 256), "float16")
        g = jnp.asarray(rng.standard_normal((3, 48)) * 1e-4, jnp.float16)
        spec = check_args(x, qw.w, qw.scale, qw.zero_point, qw.block_size, False, False)
        dx, _, _ = backend.vjp(x, qw.w, qw.scale, qw.zero_point, spec, g, "cuda")
        (dx_ref, _, _), (dx_abs, _, _) = reference_grads(x, g, qw)
        u = ref.UNIT_ROUNDOFF["float16"]
        # float16 output: dx ~1e-6 is itself subnormal; its final rounding is
        # absolute (half the subnormal step, 2**-25).
        bound = (u + 50 * ref.F32_EPS) * (1 + u) * dx_abs + u * np.abs(dx_ref) + 2.0 ** -25
        assert_within("dx", dx, dx_ref, bound)


def test_public_gradient_lowers_to_the_plan():
    """quantized_matmul's VJP is `backend.vjp`: grad with respect to x of the
    public op exported for cuda equals, dot for dot, the plan's lowering."""
    rng = np.random.default_rng(3)
    qw = make_weight(rng, n=48, k=256, scheme=Scheme(4, 32, False, True, False))
    x = make_x(rng, (3, 256), "bfloat16")
    g = make_x(rng, (3, 48), "bfloat16")
    spec = check_args(x, qw.w, qw.scale, qw.zero_point, 32, True, False)
    _, pullback = jax.vjp(lambda x: xla_qops.quantized_matmul(x, qw, impl="xla"), x)
    (dx,) = pullback(g)
    # On this CPU the float32 plan runs (XLA:CPU's bf16 dots are slow) ...
    expected, _, _ = backend.vjp(x, qw.w, qw.scale, qw.zero_point, spec, g, "cpu")
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(expected))
    # ... and for cuda the bf16 one.
    def public(x, g):
        return jax.vjp(lambda x: xla_qops.quantized_matmul(x, qw, impl="xla"), x)[1](g)[0]

    def plan(x, g):
        return backend.vjp(x, qw.w, qw.scale, qw.zero_point, spec, g, "cuda")[0]

    texts = [export.export(jax.jit(f), platforms=["cuda"])(x, g).mlir_module()
             for f in (public, plan)]
    shapes = [sorted((d[1], d[2], d[3]) for d in DOT.findall(t)) for t in texts]
    # The public one also holds the forward's dots.
    assert set(shapes[1]) <= set(shapes[0]) and shapes[1], shapes
