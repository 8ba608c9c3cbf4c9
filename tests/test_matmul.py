"""quantized_matmul against the float64 numpy reference, for every impl and scheme.

Tolerances come from tests/numpy_reference.tolerance (derivation in its
docstring): half an ulp of the output dtype relative to |y|, plus float32
accumulation error K * 2^-24 times the sum of absolute products.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import xla_qops
from cases import X_DTYPES, Scheme, all_schemes, make_weight, make_x, op_args
import numpy_reference as ref

IMPLS = ("reference", "xla", "auto")
SCHEMES = all_schemes(block_size=32)


def check(y, x, qw, scheme):
    assert y.dtype == x.dtype
    ref.assert_close(y, x, qw.w, qw.scale, qw.zero_point, qw.block_size,
                     scheme.quantize_activation)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.id)
def test_every_scheme_matches_reference(scheme, x_dtype, impl):
    rng = np.random.default_rng(0)
    # in/out not multiples of 128; two leading dims.
    qw = make_weight(rng, n=40, k=96, scheme=scheme)
    x = make_x(rng, (2, 3, 96), x_dtype)
    y = xla_qops.quantized_matmul(x, *op_args(qw), scheme.quantize_activation, impl=impl)
    assert y.shape == (2, 3, 40)
    check(y, x, qw, scheme)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", [1, 7, 65])
@pytest.mark.parametrize("scheme", [
    Scheme(8, -1, True, False, False), Scheme(4, 64, False, True, False),
    Scheme(8, 64, False, False, True), Scheme(4, 32, True, True, True)], ids=lambda s: s.id)
def test_decode_and_prefill_rows(scheme, m, impl):
    """M=1 (decode), and M on both sides of the block size (the xla backend
    switches from a batched-over-blocks dot to dequantize-then-dot at M > B)."""
    rng = np.random.default_rng(1)
    qw = make_weight(rng, n=136, k=128, scheme=scheme)
    x = make_x(rng, (m, 128), "float32")
    y = xla_qops.quantized_matmul(x, *op_args(qw), scheme.quantize_activation, impl=impl)
    check(y, x, qw, scheme)


@pytest.mark.parametrize("impl", IMPLS)
def test_in_equals_block_size(impl):
    rng = np.random.default_rng(2)
    scheme = Scheme(4, 64, False, True, False)
    qw = make_weight(rng, n=24, k=64, scheme=scheme)
    x = make_x(rng, (5, 64), "bfloat16")
    check(xla_qops.quantized_matmul(x, qw, impl=impl), x, qw, scheme)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_dimensional_x(impl):
    rng = np.random.default_rng(3)
    scheme = Scheme(8, -1, True, False, False)
    qw = make_weight(rng, n=16, k=32, scheme=scheme)
    x = make_x(rng, (32,), "float32")
    y = xla_qops.quantized_matmul(x, qw, impl=impl)
    assert y.shape == (16,)
    check(y, x, qw, scheme)


def test_packed_and_unpacked_int4_give_identical_results():
    rng = np.random.default_rng(4)
    for block in (-1, 32):
        qw = make_weight(rng, n=48, k=128, scheme=Scheme(4, block, False, True, False))
        x = make_x(rng, (3, 128), "float32")
        for impl in IMPLS:
            for qa in (False, True):
                a = xla_qops.quantized_matmul(x, *op_args(qw), qa, impl=impl)
                b = xla_qops.quantized_matmul(x, *op_args(qw.unpack()), qa, impl=impl)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero_rows_of_x_with_activation_quantization():
    """A token of zeros has absmax 0: its scale must not produce NaN."""
    rng = np.random.default_rng(5)
    scheme = Scheme(8, 32, False, False, True)
    qw = make_weight(rng, n=8, k=64, scheme=scheme)
    x = make_x(rng, (3, 64), "float32").at[1].set(0.0).at[2, :32].set(0.0)
    for impl in IMPLS:
        y = xla_qops.quantized_matmul(x, qw, quantize_activation=True, impl=impl)
        assert np.isfinite(np.asarray(y)).all()
        check(y, x, qw, scheme)


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_and_vmap(impl):
    rng = np.random.default_rng(6)
    scheme = Scheme(4, 32, False, True, True)
    qw = make_weight(rng, n=24, k=64, scheme=scheme)
    xs = make_x(rng, (4, 3, 64), "bfloat16")
    f = jax.jit(lambda x, qw: xla_qops.quantized_matmul(x, qw, quantize_activation=True,
                                                        impl=impl))
    check(f(xs, qw), xs, qw, scheme)
    y = jax.vmap(f, in_axes=(0, None))(xs, qw)
    check(y, xs, qw, scheme)


def test_vmap_over_stacked_weights():
    """QuantizedWeight is a pytree: a stack of layers vmaps like any array."""
    rng = np.random.default_rng(7)
    scheme = Scheme(4, 32, False, True, False)
    layers = [make_weight(rng, n=16, k=64, scheme=scheme) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    x = make_x(rng, (2, 64), "float32")
    ys = jax.vmap(lambda qw: xla_qops.quantized_matmul(x, qw))(stacked)
    for y, qw in zip(ys, layers):
        check(y, x, qw, scheme)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scheme", [
    Scheme(8, -1, False, False, False), Scheme(4, 32, False, True, False),
    Scheme(8, 32, True, False, True)], ids=lambda s: s.id)
def test_gradients(scheme, impl):
    """d/dx, d/dscale and d/dzero_point of sum(y * c) against float64 numpy.

    y = x_hat @ W.T with W = scale*q - zero_point; activation quantization is
    straight-through, so dL/dx = c @ W for every scheme.
    """
    rng = np.random.default_rng(8)
    qw = make_weight(rng, n=24, k=64, scheme=scheme)
    x = make_x(rng, (5, 64), "float32")
    c = rng.standard_normal((5, 24))

    def loss(x, scale, zero_point):
        y = xla_qops.quantized_matmul(x, qw.w, scale, zero_point, qw.block_size,
                                      qw.int4_weight, scheme.quantize_activation, impl=impl)
        return jnp.sum(y * c)

    dx, dscale, dzero = jax.grad(loss, argnums=(0, 1, 2))(x, qw.scale, qw.zero_point)
    w64 = ref.dequantize(qw.w, qw.scale, qw.zero_point, qw.block_size, qw.packed)
    dx_ref = c @ w64
    abs_bound = (64 + 24) * 2.0 ** -24 * (np.abs(c) @ np.abs(w64)) + 1e-30
    assert np.all(np.abs(np.asarray(dx) - dx_ref) <= 4 * abs_bound + 2.0 ** -24 * np.abs(dx_ref))

    # y[m, n] = sum_k x[m, k] * (s[g(k), n] q[k, n] - z[g(k), n]); x as the op sees it
    # (A16: x itself; the straight-through gradient for scale and zero point uses x).
    q = ref.dequantize(qw.w, np.ones_like(np.asarray(qw.scale)), None, qw.block_size,
                       qw.packed)  # integer values, [N, K]
    x64 = np.asarray(x, np.float64)
    groups = 1 if qw.block_size == -1 else 64 // qw.block_size
    xg = x64.reshape(5, groups, -1)
    qg = q.reshape(24, groups, -1)
    dscale_ref = np.einsum("mn,mgk,ngk->gn", c, xg, qg)
    dzero_ref = -np.einsum("mn,mgk->gn", c, xg)
    if qw.block_size == -1:
        dscale_ref, dzero_ref = dscale_ref[0], dzero_ref[0]
    scale_bound = 64 * 2.0 ** -22 * np.einsum("mn,mgk,ngk->gn", np.abs(c), np.abs(xg), np.abs(qg))
    np.testing.assert_array_less(np.abs(np.asarray(dscale) - dscale_ref),
                                 scale_bound.reshape(dscale_ref.shape) + 1e-12)
    if qw.zero_point is not None:
        np.testing.assert_allclose(np.asarray(dzero), dzero_ref, rtol=1e-5, atol=1e-5)


def test_gradient_with_respect_to_integer_weight_is_refused():
    rng = np.random.default_rng(9)
    qw = make_weight(rng, n=8, k=32, scheme=Scheme(8, -1, True, False, False))
    x = make_x(rng, (2, 32), "float32")
    with pytest.raises(TypeError, match="int8"):
        jax.grad(lambda w: xla_qops.quantized_matmul(x, w, qw.scale).sum())(qw.w)


@settings(max_examples=20, deadline=None)
@given(
    bits=st.sampled_from([8, 4]),
    blocks=st.integers(1, 4),
    block_pairs=st.sampled_from([0, 4, 8, 16]),  # 0: per-channel
    m=st.integers(1, 9),
    n=st.integers(1, 33),
    symmetric=st.booleans(),
    packed=st.booleans(),
    quantize_activation=st.booleans(),
    x_dtype=st.sampled_from(X_DTYPES),
    impl=st.sampled_from(IMPLS),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(bits, blocks, block_pairs, m, n, symmetric, packed,
                                quantize_activation, x_dtype, impl, seed):
    block = -1 if block_pairs == 0 else 2 * block_pairs
    k = blocks * (2 * block_pairs if block_pairs else 8)
    scheme = Scheme(bits, block, symmetric, packed and bits == 4, quantize_activation)
    rng = np.random.default_rng(seed)
    qw = make_weight(rng, n=n, k=k, scheme=scheme)
    x = make_x(rng, (m, k), x_dtype)
    y = xla_qops.quantized_matmul(x, *op_args(qw), quantize_activation, impl=impl)
    check(y, x, qw, scheme)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_rows(impl):
    """Zero tokens give an empty [..., out] result of x's dtype, for every impl."""
    rng = np.random.default_rng(10)
    qw = make_weight(rng, n=24, k=64, scheme=Scheme(4, 32, False, True, True))
    x = jnp.zeros((2, 0, 64), jnp.bfloat16)
    y = xla_qops.quantized_matmul(x, qw, quantize_activation=True, impl=impl)
    assert y.shape == (2, 0, 24) and y.dtype == jnp.bfloat16
    dx = jax.grad(lambda x: xla_qops.quantized_matmul(x, qw, impl=impl).sum())(
        x.astype(jnp.float32))
    assert dx.shape == x.shape
