"""quantize_weight and QuantizedWeight: layouts, round-trip error, edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_qops
import numpy_reference as ref

QMAX = {8: 127, 4: 7}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [-1, 16, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_half_a_step(bits, block_size, symmetric):
    """Round-to-nearest: |w - dequantize(quantize(w))| <= scale / 2 per element,
    plus float32 rounding of scale*q - zero_point (a few ulps of |w|)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 128)).astype(np.float32)
    if not symmetric:
        w += 0.7  # shifted distribution: zero points matter
    qw = xla_qops.quantize_weight(w, bits=bits, block_size=block_size, symmetric=symmetric)
    deq = ref.dequantize(qw.w, qw.scale, qw.zero_point, block_size, qw.packed)
    scale = np.asarray(qw.scale, np.float64)
    per_elem = (np.repeat(scale, block_size, axis=0).T if block_size != -1
                else np.broadcast_to(scale[:, None], w.shape))
    bound = per_elem / 2 + 4 * 2.0 ** -24 * (np.abs(w) + per_elem * 2 ** bits)
    assert np.all(np.abs(deq - w) <= bound)
    # The error really is of the size the bit width implies (not trivially 0).
    assert np.abs(deq - w).max() > per_elem.max() / 8
    # Symmetric scale = absmax / qmax.
    if symmetric:
        groups = w.reshape(24, -1, 128 if block_size == -1 else block_size)
        absmax = np.abs(groups).max(-1)
        expect = absmax.T if block_size != -1 else absmax[:, 0]
        np.testing.assert_allclose(scale, expect / QMAX[bits], rtol=1e-7)
        assert qw.zero_point is None


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [-1, 32])
def test_layouts_and_dtypes(bits, block_size):
    qw = xla_qops.quantize_weight(np.ones((40, 64), np.float32), bits=bits,
                                  block_size=block_size, symmetric=False)
    packed = bits == 4
    if block_size == -1:
        assert qw.w.shape == ((40, 32) if packed else (40, 64))
        assert qw.scale.shape == qw.zero_point.shape == (40,)
    else:
        assert qw.w.shape == ((2, 16, 40) if packed else (2, 32, 40))
        assert qw.scale.shape == qw.zero_point.shape == (2, 40)
    assert qw.w.dtype == (jnp.uint8 if packed else jnp.int8)
    assert qw.scale.dtype == jnp.float32
    assert (qw.in_features, qw.out_features) == (64, 40)
    assert qw.dequantize().shape == (40, 64)


def test_packing_matches_api_md_byte_formula():
    q = np.array([[-8, 7, 0, -1, 3, -4]], np.int8)
    qw = xla_qops.QuantizedWeight(w=jnp.asarray(q), scale=jnp.ones(1), zero_point=None,
                                  bits=4, block_size=-1, packed=False).pack()
    expected = [(int(q[0, 2 * i]) & 0xF) | ((int(q[0, 2 * i + 1]) & 0xF) << 4) for i in range(3)]
    assert np.asarray(qw.w).tolist() == [expected]
    np.testing.assert_array_equal(np.asarray(qw.unpack().w), q)
    np.testing.assert_array_equal(ref.pack_int4(q, -1), np.asarray(qw.w))


@pytest.mark.parametrize("block_size", [-1, 16])
def test_packed_and_unpacked_hold_the_same_values(block_size):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    packed = xla_qops.quantize_weight(w, bits=4, block_size=block_size)
    unpacked = xla_qops.quantize_weight(w, bits=4, block_size=block_size, pack=False)
    assert packed.packed and not unpacked.packed and unpacked.w.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(packed.unpack().w), np.asarray(unpacked.w))
    np.testing.assert_array_equal(np.asarray(unpacked.pack().w), np.asarray(packed.w))
    np.testing.assert_array_equal(np.asarray(packed.dequantize()),
                                  np.asarray(unpacked.dequantize()))
    assert np.asarray(unpacked.w).min() >= -8 and np.asarray(unpacked.w).max() <= 7


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [-1, 16])
def test_all_zero_and_constant_groups(bits, symmetric, block_size):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 32)).astype(np.float32)
    w[0] = 0.0                 # all-zero channel
    w[1, :16] = 0.0            # all-zero block (blockwise) / partly zero channel
    w[2] = 0.3                 # constant channel
    qw = xla_qops.quantize_weight(w, bits=bits, block_size=block_size, symmetric=symmetric)
    assert np.isfinite(np.asarray(qw.scale)).all()
    assert np.all(np.asarray(qw.scale) > 0)
    deq = np.asarray(qw.dequantize())
    assert np.all(deq[0] == 0.0)
    if block_size == 16:
        assert np.all(deq[1, :16] == 0.0)
    np.testing.assert_allclose(deq[2], 0.3, rtol=2e-7)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_refused(bad):
    w = np.ones((4, 8), np.float32)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="w: expected finite values, found 1 NaN/inf"):
        xla_qops.quantize_weight(w)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(block_size=5), ValueError, "block_size: expected -1 or a positive divisor of in=32, got 5"),
    (dict(block_size=0), ValueError, "block_size: .* got 0"),
    (dict(block_size=-2), ValueError, "block_size: .* got -2"),
    (dict(bits=3), ValueError, "bits: expected 8 or 4, got 3"),
    (dict(block_size=8.0), TypeError, "block_size: expected an int, got float"),
])
def test_bad_quantize_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        xla_qops.quantize_weight(np.ones((4, 32), np.float32), **kwargs)


@pytest.mark.parametrize("shape, block_size, what", [((4, 33), -1, "in=33"),
                                                     ((4, 30), 3, "block_size=3")])
def test_int4_with_an_odd_pairing_axis_packs_only_on_request(shape, block_size, what):
    # Packing pairs input features (within a block): an odd count cannot pack. A
    # clear error names `pack` (it used to fail inside jax's broadcasting); unpacked
    # works, and QuantizedWeight.pack() says the same.
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with pytest.raises(ValueError, match=f"pack: int4 values pack in pairs .* {what} is odd"):
        xla_qops.quantize_weight(w, bits=4, block_size=block_size)
    unpacked = xla_qops.quantize_weight(w, bits=4, block_size=block_size, pack=False)
    assert not unpacked.packed and unpacked.w.dtype == np.int8
    with pytest.raises(ValueError, match=f"pack: .* {what} is odd"):
        unpacked.pack()


def test_bad_weight_rank_and_dtype():
    with pytest.raises(ValueError, match=r"w: expected a float weight \[out, in\].*\(32,\)"):
        xla_qops.quantize_weight(np.ones(32, np.float32))
    with pytest.raises(TypeError, match="w: expected a floating dtype, got int8"):
        xla_qops.quantize_weight(np.ones((4, 32), np.int8))


def test_pytree_and_nbytes():
    w = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    qw = xla_qops.quantize_weight(w, bits=4, block_size=32, symmetric=False)
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    assert [leaf.shape for leaf in leaves] == [(2, 16, 16), (2, 16), (2, 16)]
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.bits, rebuilt.block_size, rebuilt.packed) == (4, 32, True)
    # int4 packed: 16*64/2 bytes of weight + two float32 [2, 16] arrays.
    assert qw.nbytes == 16 * 64 // 2 + 2 * 2 * 16 * 4
    sym = xla_qops.quantize_weight(w, bits=8)
    assert sym.nbytes == 16 * 64 + 16 * 4 and jax.tree_util.tree_leaves(sym)[0].dtype == jnp.int8
    # Static fields do not become tracers under jit. (jit may fuse scale*q - zp
    # into one FMA: results agree to an ulp, not bit for bit.)
    out = np.asarray(jax.jit(lambda q: q.dequantize())(qw))
    eager = np.asarray(qw.dequantize())
    np.testing.assert_allclose(out, eager, rtol=0, atol=2.0 ** -22 * np.abs(eager).max())


def test_dequantize_matches_numpy_reference():
    w = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32)
    for bits in (8, 4):
        for block in (-1, 16):
            qw = xla_qops.quantize_weight(w, bits=bits, block_size=block, symmetric=False)
            expected = ref.dequantize(qw.w, qw.scale, qw.zero_point, block, qw.packed)
            # float32 scale*q - zp vs float64: one rounding of each operation.
            np.testing.assert_allclose(np.asarray(qw.dequantize()), expected,
                                       rtol=0, atol=4 * 2.0 ** -24 * np.abs(expected).max() + 1e-7)
