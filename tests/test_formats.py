"""Float element formats (API.md section 7) in the JAX core: decoding, the fp8
activation rule, quantize_weight's float grids, the op on every impl that
supports them, and bad input. The ground truth is tests/numpy_reference.py's
float64 statement of section 7 (bit-field decoding, its own rounding)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import xla_qops
from xla_qops import dispatch
from pallas_kernels import formats
import numpy_reference as ref

K, N = 128, 48


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ decoding

def test_e2m1_codes_widen_to_their_values_exactly():
    codes = np.arange(16, dtype=np.uint8)
    got = np.asarray(formats.fp4_to_fp8(codes)).astype(np.float64)
    want = ref.e2m1_value(codes)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0 is code 8


def test_e4m3fn_storage_decodes_to_the_bit_field_values():
    bits = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)
    w = bits.view(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(jnp.asarray(w).astype(jnp.float32)),
                                  ref.e4m3fn_value(bits))


@pytest.mark.parametrize("blockwise", [False, True])
def test_packed_e2m1_pairs_put_the_even_index_in_the_low_nibble(blockwise):
    codes = _rng().integers(0, 16, (6, 8, 5) if blockwise else (5, 16)).astype(np.uint8)
    axis = 1 if blockwise else -1
    packed = ref.pack_int4(codes.astype(np.int8), axis)
    got = np.asarray(formats.unpack_fp4(packed, axis)).astype(np.float64)
    np.testing.assert_array_equal(got, ref.e2m1_value(codes))


# ------------------------------------------------------- fp8 activation rule

@pytest.mark.parametrize("block_size", [-1, 32])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_fp8_activation_rule_is_bit_exact(block_size, dtype):
    rng = _rng(1)
    x = (rng.standard_normal((9, K)) * np.exp(rng.uniform(-6, 6, (9, 1)))).astype(np.float32)
    x[3] = 0.0                       # an all-zero row: scale 1
    x[4, :] = 1e-3
    x[4, 7] = 3e4                    # one outlier: the rest flush towards 0
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    q, s = formats.quantize_activation_fp8(jnp.asarray(x, dtype), block_size)
    want_q, want_s = ref.quantize_activation_fp8(x, block_size)
    np.testing.assert_array_equal(np.asarray(s), want_s)
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)).astype(np.float64), want_q)
    assert np.all(np.asarray(s)[3] == 1.0)
    assert np.abs(want_q).max() == 448.0  # each group's maximum lands on the top value


# ------------------------------------------------------------- quantizers

def _grid_statement(w, fmt, block_size):
    """float64/float32 statement of section 7's quantizers: (values [out, in], scale)."""
    w = np.asarray(w, np.float32)
    out_features, in_features = w.shape
    b = in_features if block_size == -1 else block_size
    g = w.reshape(out_features, in_features // b, b)           # [out, groups, B]
    amax = np.abs(g).max(-1)
    if fmt == "fp8":
        scale = np.where(amax == 0, 1, amax / np.float32(448)).astype(np.float32)
        values = ref.round_to_e4m3((g / scale[..., None]).astype(np.float32))
    else:
        if fmt == "mxfp4":
            scale = np.where(amax == 0, 1, 2.0 ** (np.floor(np.log2(np.where(amax == 0, 1, amax)))
                                                   - 2)).astype(np.float32)
        else:
            glob = np.float32(np.abs(w).max() / np.float32(448 * 6))
            block = ref.round_to_e4m3((amax / np.float32(6) / glob).astype(np.float32))
            scale = (block.astype(np.float32) * glob).astype(np.float32)
        safe = np.where(scale == 0, 1, scale).astype(np.float32)
        scaled = np.clip((g / safe[..., None]).astype(np.float32), -6, 6).astype(np.float64)
        # Nearest e2m1 magnitude, ties to the even code.
        grid = ref.E2M1_MAGNITUDES
        distance = np.abs(np.abs(scaled)[..., None] - grid)
        best = distance == distance.min(-1, keepdims=True)
        even = best & (np.arange(8) % 2 == 0)
        pick = np.where(even.any(-1), np.argmax(even, -1), np.argmax(best, -1))
        values = np.copysign(grid[pick], scaled) * (scale[..., None] != 0)
    values = values.reshape(out_features, in_features)
    return values, (scale[:, 0] if block_size == -1 else scale.T)


@pytest.mark.parametrize("fmt, block_size", [("fp8", -1), ("fp8", 32), ("mxfp4", -1),
                                             ("mxfp4", 64), ("nvfp4", 16)])
def test_quantize_weight_rounds_onto_the_format_grid(fmt, block_size):
    rng = _rng(2)
    w = (rng.standard_normal((N, K)) * np.exp(rng.uniform(-3, 3, (N, 1)))).astype(np.float32)
    w[5] = 0.0
    qw = xla_qops.quantize_weight(jnp.asarray(w), format=fmt, block_size=block_size)
    b = qw.block_size
    assert b == {"mxfp4": 32 if block_size == -1 else block_size, "nvfp4": 16}.get(fmt, block_size)
    assert qw.format == ("fp8" if fmt == "fp8" else "fp4") and qw.zero_point is None
    assert qw.w.dtype == (jnp.float8_e4m3fn if fmt == "fp8" else jnp.uint8)
    values, scale = _grid_statement(w, fmt, b)
    np.testing.assert_array_equal(np.asarray(qw.scale), scale)
    stored = ref.float_values(np.asarray(qw.w), qw.weight_format, b)
    got = stored if b == -1 else stored.reshape(K, N).T
    np.testing.assert_array_equal(got, values)
    if fmt == "mxfp4":
        mantissa, _ = np.frexp(np.asarray(qw.scale))
        assert np.all(mantissa == 0.5)  # powers of two
    # dequantize() is scale * value(q), exactly.
    np.testing.assert_array_equal(
        np.asarray(qw.dequantize(jnp.float32)),
        ref.dequantize_float(np.asarray(qw.w), np.asarray(qw.scale), qw.weight_format, b)
        .astype(np.float32))


def test_nvfp4_block_scales_are_e4m3_times_one_tensor_factor():
    w = _rng(3).standard_normal((N, K)).astype(np.float32)
    qw = xla_qops.quantize_weight(w, format="nvfp4")
    glob = np.float32(np.abs(w).max() / np.float32(448 * 6))
    block = np.asarray(qw.scale) / glob
    np.testing.assert_allclose(block, ref.round_to_e4m3(block.astype(np.float32)), rtol=2 ** -22)


# --------------------------------------------------------------- the op

FORMAT_CASES = [  # (quantize_weight format, block_size, quantize_activation, activation_format)
    ("fp8", -1, False, None), ("fp8", 32, False, None),
    ("mxfp4", 32, False, None), ("nvfp4", 16, False, None),
    ("fp8", -1, True, None), ("fp8", 32, True, None), ("nvfp4", 16, True, None),
    ("int4", 32, True, "fp8"), ("int8", -1, True, "fp8"),
]


def _weight(fmt, block_size, rng):
    w = rng.standard_normal((N, K)).astype(np.float32)
    if fmt.startswith("int"):
        return xla_qops.quantize_weight(w, bits=int(fmt[3:]), block_size=block_size)
    return xla_qops.quantize_weight(w, format=fmt, block_size=block_size)


@pytest.mark.parametrize("impl", ["reference", "xla", "auto"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("fmt, block_size, qa, act", FORMAT_CASES)
def test_matmul_matches_the_float64_statement(fmt, block_size, qa, act, dtype, impl):
    rng = _rng(4)
    qw = _weight(fmt, block_size, rng)
    x = jnp.asarray(rng.standard_normal((5, K)), dtype)
    y = xla_qops.quantized_matmul(x, qw, quantize_activation=qa, activation_format=act, impl=impl)
    assert y.dtype == x.dtype and y.shape == (5, N)
    act_format = (act or ("fp8" if qw.format != "int" else "int8")) if qa else None
    ref.assert_close(np.asarray(y.astype(jnp.float32)), np.asarray(x), np.asarray(qw.w),
                     np.asarray(qw.scale), None, qw.block_size, qa,
                     weight_format=qw.weight_format, activation_format=act_format)


def test_fp8_weight_is_inferred_from_its_dtype_and_fp4_must_be_named():
    rng = _rng(5)
    fp8 = xla_qops.quantize_weight(rng.standard_normal((N, K)), format="fp8")
    x = jnp.asarray(rng.standard_normal((2, K)), jnp.float32)
    np.testing.assert_array_equal(xla_qops.quantized_matmul(x, fp8.w, fp8.scale),
                                  xla_qops.quantized_matmul(x, fp8))
    fp4 = xla_qops.quantize_weight(rng.standard_normal((N, K)), format="mxfp4")
    as_fp4 = xla_qops.quantized_matmul(x, fp4.w, fp4.scale, block_size=32,
                                       weight_format="fp4")
    as_int4 = xla_qops.quantized_matmul(x, fp4.w, fp4.scale, block_size=32, int4_weight=True)
    np.testing.assert_array_equal(as_fp4, xla_qops.quantized_matmul(x, fp4))
    assert not np.allclose(as_fp4, as_int4)  # the same bytes mean other values


def test_gradient_wrt_x_is_the_float_weight():
    rng = _rng(6)
    qw = _weight("nvfp4", 16, rng)
    x = jnp.asarray(rng.standard_normal((3, K)), jnp.float32)
    g = jax.grad(lambda x: xla_qops.quantized_matmul(x, qw).sum())(x)
    want = np.ones((3, N)) @ ref.dequantize_any(np.asarray(qw.w), np.asarray(qw.scale), None,
                                                qw.block_size, qw.weight_format)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(want, (3, K)), rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def test_pallas_kernels_take_float_formats_and_auto_keeps_the_cpu_path():
    """The Pallas kernels take the float formats (tests/test_pallas_formats.py
    checks them): impl="pallas" runs the interpreted kernel here, impl="auto"
    still never picks it on the CPU."""
    qw = _weight("fp8", -1, _rng(7))
    x = jnp.ones((2, K), jnp.float32)
    spec = xla_qops.spec.check_args(x, qw.w, qw.scale, None, -1, False, False)
    assert spec.scheme == "w8a16-fp8"
    assert all(dispatch._module("pallas").supports(spec, p) for p in ("tpu", "cpu", "cuda"))
    ref.assert_close(np.asarray(xla_qops.quantized_matmul(x, qw, impl="pallas")), np.asarray(x),
                     np.asarray(qw.w), np.asarray(qw.scale), None, -1, weight_format="fp8")
    assert dispatch.auto_choice(spec, "cpu") != "pallas"


# --------------------------------------------------------------- bad input

FP8_W = jnp.ones((N, K), jnp.float8_e4m3fn)
FP4_W = jnp.ones((N, K // 2), jnp.uint8)
S = jnp.ones((N,), jnp.float32)
X = jnp.ones((2, K), jnp.bfloat16)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((X, FP8_W, S, S), {}, ValueError, "zero_point: the float formats are symmetric"),
    ((X, FP4_W, S, S), {"weight_format": "fp4"}, ValueError,
     "zero_point: the float formats are symmetric"),
    ((X, jnp.ones((N, K), jnp.int8), S), {"weight_format": "fp8"}, TypeError,
     "w: weight_format='fp8' is stored as float8_e4m3fn, got int8"),
    ((X, FP8_W, S), {"weight_format": "fp4"}, TypeError,
     r"w: weight_format='fp4' is stored as uint8 .* got float8_e4m3fn"),
    ((X, FP8_W, S), {"weight_format": "e4m3"}, ValueError,
     "weight_format: expected None or one of 'int8', 'int4', 'fp8', 'fp4', got 'e4m3'"),
    ((X, FP8_W, S), {"activation_format": "fp8"}, ValueError,
     "activation_format: applies with quantize_activation=True"),
    ((X, FP8_W, S, None, -1, False, True), {"activation_format": "int4"}, ValueError,
     "activation_format: expected None or one of 'int8', 'fp8', got 'int4'"),
    ((X, FP8_W, S, None, -1, True), {}, ValueError, "int4_weight: fp8 weights hold e4m3fn"),
    ((jnp.ones((2, 126), jnp.float32), jnp.ones((18, 3, N), jnp.uint8), jnp.ones((18, N)),
      None, 7), {"weight_format": "fp4"}, ValueError,
     "block_size: packed fp4 \\(e2m1\\) weights pack pairs inside a block"),
    ((jnp.ones((2, 63), jnp.float32), jnp.ones((N, 31), jnp.uint8), S), {"weight_format": "fp4"},
     ValueError, r"x: packed fp4 \(e2m1\) weights need an even number of input features"),
    ((X, FP8_W[:, :64], S), {}, ValueError, r"w: expected shape \[48, 128\]"),
    ((X, FP8_W, S.astype(jnp.float8_e4m3fn)), {}, TypeError,
     "scale: expected a floating dtype .* got float8_e4m3fn"),
])
def test_bad_float_format_arguments_fail_before_any_work(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        xla_qops.quantized_matmul(*args, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"format": "fp6"}, ValueError, "format: expected one of 'int', 'fp8', 'mxfp4', 'nvfp4'"),
    ({"format": "fp8", "symmetric": False}, ValueError,
     "symmetric: format='fp8' has float weights, which are symmetric"),
    ({"format": "fp8", "bits": 4}, ValueError, "bits: format='fp8' is 8-bit, got bits=4"),
    ({"format": "nvfp4", "block_size": 32}, ValueError,
     "block_size: format='nvfp4' has blocks of 16, got 32"),
    ({"format": "mxfp4", "pack": False}, ValueError, "pack: format='mxfp4' stores e2m1 codes"),
    ({"format": "fp8", "method": "hqq"}, ValueError,
     "method: format='fp8' rounds to nearest even onto its float grid"),
    ({"format": "mxfp4", "block_size": 24}, ValueError, "block_size: expected -1 or a positive"),
])
def test_bad_float_quantizer_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        xla_qops.quantize_weight(np.ones((N, K), np.float32), **kwargs)
