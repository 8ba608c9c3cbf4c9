"""The host-CPU C++ kernels (impl="custom_call") on the float element formats
(API.md section 7): fp8 (e4m3fn) and fp4 (packed e2m1) weights, with float
activations (A16) or quantized ones (int8 or e4m3fn), against the float64
statement in tests/numpy_reference.py.

Shapes reach every path of csrc/ (docs/cpu_kernels.md): the per-channel dot
form (M <= 16), the blockwise decode's register form (M <= 4) and wide form
(M = 5..16), the panel path (M = 17 and up); N and K that are not multiples
of the tiles. Weights are random codes over the whole format (subnormal
e4m3 values included), not only what a quantizer makes. The decoders are
checked exactly (one product per output), the fp8 activation rule bit for
bit (an identity weight puts x_scale * x_q in the output), and every form
gives the same bits for any thread count.
"""

import textwrap

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import xla_qops
from xla_qops import dispatch
from xla_qops.backends import custom_call
from xla_qops.quantize import QuantizedWeight
from xla_qops.spec import check_args
from pallas_kernels import formats
from cases import Scheme, assert_same_at_every_thread_count, make_weight
import numpy_reference as ref
from conftest import cpu_kernels_expected, isa_expected, run_under_isa

pytestmark = pytest.mark.skipif(not cpu_kernels_expected() and not custom_call.available(),
                                reason="xla_qops._cpu_kernels is not built on this platform")


def random_float_weight(rng, n, k, fmt, block_size, scale_range=(0.5, 2.0)):
    """A QuantizedWeight of random codes over the whole format (no NaN codes)."""
    blockwise = block_size != -1
    shape = (k // block_size, block_size, n) if blockwise else (n, k)
    if fmt == "fp8":
        bits = rng.integers(0, 256, shape).astype(np.uint8)
        bits = np.where(bits & 0x7F == 0x7F, bits ^ 1, bits).astype(np.uint8)  # no NaN
        w = jnp.asarray(bits.view(ml_dtypes.float8_e4m3fn))
        packed, nbits = False, 8
    else:
        codes = rng.integers(0, 16, shape).astype(np.int8)
        w = jnp.asarray(ref.pack_int4(codes, 1))  # pairs along the input axis
        packed, nbits = True, 4
    scale_shape = (k // block_size, n) if blockwise else (n,)
    scale = rng.uniform(*scale_range, scale_shape).astype(np.float32) * 0.01
    return QuantizedWeight(w=w, scale=jnp.asarray(scale), zero_point=None, bits=nbits,
                           block_size=block_size, packed=packed, format=fmt)


def make_x(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(np.float32)
    return jnp.asarray(x, dtype)


def act_format_of(qw, qa, act):
    if not qa:
        return None
    return act or ("fp8" if qw.format != "int" else "int8")


def run(x, qw, qa=False, act=None, impl="custom_call"):
    return xla_qops.quantized_matmul(x, qw, quantize_activation=qa, activation_format=act,
                                     impl=impl)


def check(y, x, qw, qa=False, act=None):
    """Within the float64 statement's error bound (numpy_reference.assert_close)."""
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (qw.out_features,)
    ref.assert_close(y, x, qw.w, qw.scale, qw.zero_point, qw.block_size, qa,
                     weight_format=qw.format if qw.format != "int" else None,
                     activation_format=act_format_of(qw, qa, act))


# --------------------------------------------------------------- supports

FORMAT_COMBOS = [  # (weight_format, quantize_activation, activation_format)
    ("fp8", False, None), ("fp4", False, None), ("fp8", True, "fp8"), ("fp4", True, "fp8"),
    ("int8", True, "fp8"), ("int4", True, "fp8"), ("fp8", True, "int8"), ("fp4", True, "int8"),
]


@pytest.mark.parametrize("wf, qa, af", FORMAT_COMBOS)
def test_supports_the_float_formats(wf, qa, af):
    rng = np.random.default_rng(0)
    if wf.startswith("int"):
        qw = make_weight(rng, 16, 64, Scheme(int(wf[3:]), 32, True, True, qa))
    else:
        qw = random_float_weight(rng, 16, 64, wf, 32)
    x = jnp.ones((2, 64), jnp.float32)
    spec = check_args(x, qw.w, qw.scale, qw.zero_point, qw.block_size, qw.int4_weight, qa,
                      weight_format=qw.weight_format, activation_format=af)
    assert custom_call.supports(spec, "cpu") and not custom_call.supports(spec, "tpu")
    assert dispatch.auto_choice(spec, "cpu") == "custom_call"


# --------------------------------------------------------------- decoders

@pytest.mark.parametrize("block_size", [-1, 64])
@pytest.mark.parametrize("m", [1, 3, 5, 20])
def test_every_e4m3_value_decodes_exactly(block_size, m):
    """Each output is one product x * scale * value(q) (x one-hot, float32):
    exact, so every e4m3 code (subnormals included) and the decoders' column
    and k order show bit for bit."""
    rng = np.random.default_rng(1)
    k, n = 128, 256
    codes = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)
    bits = np.resize(rng.permutation(codes), (n, k)).astype(np.uint8)  # [out, in]
    bits[:, 0] = np.resize(codes, n)
    w = bits if block_size == -1 else bits.T.reshape(k // block_size, block_size, n)
    scale_shape = (n,) if block_size == -1 else (k // block_size, n)
    qw = QuantizedWeight(w=jnp.asarray(w.view(ml_dtypes.float8_e4m3fn)),
                         scale=jnp.ones(scale_shape, jnp.float32), zero_point=None, bits=8,
                         block_size=block_size, packed=False, format="fp8")
    cols = rng.choice(k, m, replace=False)
    cols[0] = 0
    x = np.zeros((m, k), np.float32)
    x[np.arange(m), cols] = 1.0
    y = np.asarray(run(jnp.asarray(x), qw))
    want = ref.e4m3fn_value(bits[:, cols].T)
    np.testing.assert_array_equal(y, want.astype(np.float32))


@pytest.mark.parametrize("block_size", [-1, 32])
@pytest.mark.parametrize("m", [1, 4, 6, 20])
def test_every_e2m1_value_decodes_exactly(block_size, m):
    rng = np.random.default_rng(2)
    k, n = 64, 96
    codes = rng.integers(0, 16, (n, k)).astype(np.int8)  # [out, in]
    w = ref.pack_int4(codes, 1) if block_size == -1 else ref.pack_int4(
        codes.T.reshape(k // block_size, block_size, n), 1)
    scale_shape = (n,) if block_size == -1 else (k // block_size, n)
    qw = QuantizedWeight(w=jnp.asarray(w), scale=jnp.ones(scale_shape, jnp.float32),
                         zero_point=None, bits=4, block_size=block_size, packed=True,
                         format="fp4")
    cols = np.arange(m) * 7 % k
    x = np.zeros((m, k), np.float32)
    x[np.arange(m), cols] = 1.0
    y = np.asarray(run(jnp.asarray(x), qw))
    want = ref.e2m1_value(codes[:, cols].T.astype(np.uint8))
    np.testing.assert_array_equal(y, want.astype(np.float32))


@pytest.mark.parametrize("block_size", [-1, 32])
def test_nan_weight_codes_make_their_columns_nan(block_size):
    rng = np.random.default_rng(3)
    qw = random_float_weight(rng, 40, 64, "fp8", block_size)
    bits = np.asarray(qw.w).view(np.uint8).copy()
    if block_size == -1:
        bits[5, 9], bits[33, 60] = 0x7F, 0xFF
    else:
        bits[0, 9, 5], bits[1, 28, 33] = 0x7F, 0xFF
    qw = QuantizedWeight(w=jnp.asarray(bits.view(ml_dtypes.float8_e4m3fn)), scale=qw.scale,
                         zero_point=None, bits=8, block_size=block_size, packed=False,
                         format="fp8")
    for m in (1, 5, 20):
        y = np.asarray(run(make_x(rng, (m, 64), "float32"), qw))
        assert np.isnan(y[:, [5, 33]]).all()
        assert np.isfinite(np.delete(y, [5, 33], axis=1)).all()


# --------------------------------------------------------------- against the reference

A16_CASES = [("fp8", -1), ("fp8", 32), ("fp8", 6), ("fp4", -1), ("fp4", 32), ("fp4", 16),
             ("fp4", 6)]


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("fmt, block_size", A16_CASES)
def test_a16_float_weights(fmt, block_size, x_dtype):
    """W8A16-fp8 and W4A16-fp4, M = 1..17 (dot form / register / wide form / panels)."""
    rng = np.random.default_rng(4)
    k = 192 if block_size in (-1, 32, 16) else 5 * block_size
    qw = random_float_weight(rng, 67, k, fmt, block_size)
    for m in range(1, 18):
        x = make_x(rng, (m, k), x_dtype)
        check(run(x, qw), x, qw)


A8_CASES = [  # (weight, block_size, activation_format)
    ("fp8", -1, "fp8"), ("fp8", 32, "fp8"), ("fp4", -1, "fp8"), ("fp4", 16, "fp8"),
    ("fp8", 32, "int8"), ("fp4", -1, "int8"),
    ("int8", -1, "fp8"), ("int8", 32, "fp8"), ("int4", -1, "fp8"), ("int4", 32, "fp8"),
]


# Zero points only where the weight format has them (the int formats).
A8_SYM_CASES = [(*case, symmetric) for case in A8_CASES
                for symmetric in ((True,) if case[0].startswith("fp") else (True, False))]


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("wf, block_size, af, symmetric", A8_SYM_CASES)
def test_a8_float_products(wf, block_size, af, symmetric, x_dtype):
    """fp8 activations (and int8 ones with float weights): exact products of the
    two quantized operands, float32 sums; zero points of int weights too."""
    rng = np.random.default_rng(5)
    k = 160
    if wf.startswith("int"):
        qw = make_weight(rng, 70, k, Scheme(int(wf[3:]), block_size, symmetric, True, True))
    else:
        qw = random_float_weight(rng, 70, k, wf, block_size)
    for m in (1, 2, 4, 5, 9, 16, 17):
        x = make_x(rng, (m, k), x_dtype)
        check(run(x, qw, True, af), x, qw, True, af)


@pytest.mark.parametrize("fmt, block_size", [("fp8", -1), ("fp8", 128), ("fp4", 32)])
def test_long_k_and_wide_n(fmt, block_size):
    """Several x chunks of the dot form (K = 2304), K slices of the blockwise
    decode (18 groups), column blocks (N = 2200), and the panel path."""
    rng = np.random.default_rng(6)
    k = 2304
    qw = random_float_weight(rng, 2200, k, fmt, block_size)
    for m, x_dtype in ((1, "bfloat16"), (4, "bfloat16"), (7, "float16"), (16, "bfloat16"),
                       (24, "bfloat16")):
        x = make_x(rng, (m, k), x_dtype)
        check(run(x, qw), x, qw)
        if m in (1, 16):
            check(run(x, qw, True), x, qw, True)


# --------------------------------------------------------------- the fp8 activation rule

def _rule_inputs(rng, m, k):
    x = (rng.standard_normal((m, k)) * np.exp(rng.uniform(-8, 8, (m, 1)))).astype(np.float32)
    x[1] = 0.0                       # all-zero row: scale 1
    x[2, :] = 1e-3
    x[2, 7] = 3e4                    # one outlier: the rest flush towards 0
    # Exact ties of the e4m3 grid with absmax 448 (inv = 1): between 1 and 1.125,
    # 2^-10 (between 0 and 2^-9), 3 * 2^-10 (between 2^-9 and 2^-8), 432 (416 / 448).
    x[3] = rng.choice([1.0625, -1.0625, 2.0 ** -10, 3 * 2.0 ** -10, 1.1875, 432.0, -432.0,
                       5 * 2.0 ** -11], k)
    x[3, 0] = 448.0
    # A tiny row (inv = 448 / absmax still finite) with float32 subnormals in it.
    x[4] = np.float32(1e-30) * rng.standard_normal(k).astype(np.float32)
    x[4, :8] = np.float32(3e-39)
    return x


@pytest.mark.parametrize("block_size", [-1, 32])
@pytest.mark.parametrize("x_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("m", [5, 12, 20])
def test_fp8_activations_are_the_reference_rule_bit_for_bit(block_size, x_dtype, m):
    """An identity fp8 weight (scale 1) puts x_scale * x_q in the output (one
    float32 product per element, then the rounding to x's dtype), so the
    kernels' e4m3 activations must be the rule's, ties and subnormals included
    (M 5 / 12: dot form or wide decode; 20: panels)."""
    rng = np.random.default_rng(7)
    k = 128
    x = jnp.asarray(_rule_inputs(rng, m, k), x_dtype)
    eye = np.eye(k, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)  # [out, in] = I
    w = eye if block_size == -1 else eye.T.reshape(k // block_size, block_size, k)
    scale_shape = (k,) if block_size == -1 else (k // block_size, k)
    qw = QuantizedWeight(w=jnp.asarray(w), scale=jnp.ones(scale_shape, jnp.float32),
                         zero_point=None, bits=8, block_size=block_size, packed=False,
                         format="fp8")
    y = np.asarray(run(x, qw, True, "fp8").astype(jnp.float32))
    xf = np.asarray(x.astype(jnp.float32))
    q, s = ref.quantize_activation_fp8(xf, block_size)  # the float64 statement of the rule
    q, s = np.asarray(q, np.float32), np.asarray(s, np.float32)
    group = k if block_size == -1 else block_size
    want = (np.repeat(s, group, axis=1) * q).astype(np.float32)
    want = np.asarray(jnp.asarray(want).astype(x_dtype).astype(jnp.float32))
    np.testing.assert_array_equal(y, want)
    # JAX's rule (pallas_kernels.formats: the xla / reference backends) is the
    # same statement.
    jq, js = formats.quantize_activation_fp8(jnp.asarray(xf), block_size)
    np.testing.assert_array_equal(np.asarray(jq.astype(jnp.float32)), q)
    np.testing.assert_array_equal(np.asarray(js), s)


# --------------------------------------------------------------- bad values, threads

@pytest.mark.parametrize("wf, block_size, qa", [("fp8", -1, False), ("fp4", 32, False),
                                                ("fp8", 32, True), ("int8", -1, True)])
def test_nan_and_inf_stay_in_their_rows(wf, block_size, qa):
    rng = np.random.default_rng(8)
    if wf.startswith("int"):
        qw = make_weight(rng, 40, 64, Scheme(8, block_size, True, False, qa))
    else:
        qw = random_float_weight(rng, 40, 64, wf, block_size)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[1, 5], x[2, 7] = np.nan, np.inf
    y = np.asarray(run(jnp.asarray(x, jnp.bfloat16), qw, qa, "fp8" if qa else None),
                   np.float32)
    assert np.isnan(y[1]).all() and not np.isfinite(y[2]).all()
    assert np.isfinite(y[[0, 3]]).all()


def test_results_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(9)
    cases = []
    for fmt, block_size in (("fp8", -1), ("fp8", 32), ("fp4", 32), ("fp4", -1)):
        qw = random_float_weight(rng, 200, 256, fmt, block_size)
        for m in (1, 4, 12, 40):
            x = make_x(rng, (m, 256), "bfloat16")
            cases += [(x, qw, False, None), (x, qw, True, "fp8")]
    qw = make_weight(rng, 200, 256, Scheme(4, 32, False, True, True))
    for m in (1, 4, 12, 40):
        cases.append((make_x(rng, (m, 256), "bfloat16"), qw, True, "fp8"))
    assert_same_at_every_thread_count(run, cases)


@pytest.mark.parametrize("forced", ["generic", "avx2"])
def test_lower_kernel_sets_match_the_reference(forced):
    """XLA_QOPS_CPU_ISA=generic / avx2: the portable kernels and the AVX2 set
    decode and quantize the same way (the decoders exactly, the fp8 rule bit
    for bit)."""
    script = textwrap.dedent(f"""
        import numpy as np
        from xla_qops.backends import custom_call
        import test_custom_call_formats as t
        assert custom_call.isa() == {isa_expected(forced)!r}, custom_call.isa()
        t.test_every_e4m3_value_decodes_exactly(-1, 3)
        t.test_every_e4m3_value_decodes_exactly(64, 20)
        t.test_every_e2m1_value_decodes_exactly(32, 4)
        t.test_nan_weight_codes_make_their_columns_nan(32)
        for bs in (-1, 32):
            t.test_fp8_activations_are_the_reference_rule_bit_for_bit(bs, "bfloat16", 5)
            t.test_fp8_activations_are_the_reference_rule_bit_for_bit(bs, "float32", 20)
        rng = np.random.default_rng(0)
        for fmt, bs in (("fp8", -1), ("fp8", 16), ("fp4", -1), ("fp4", 16)):
            qw = t.random_float_weight(rng, 20, 48, fmt, bs)
            for m, dt in ((1, "float32"), (9, "bfloat16"), (2, "float16")):
                x = t.make_x(rng, (m, 48), dt)
                t.check(t.run(x, qw), x, qw)
                t.check(t.run(x, qw, True), x, qw, True)
        qw = t.make_weight(rng, 20, 48, t.Scheme(4, 16, False, True, True))
        x = t.make_x(rng, (3, 48), "bfloat16")
        t.check(t.run(x, qw, True, "fp8"), x, qw, True, "fp8")
        print("generic ok")
    """)
    out = run_under_isa(forced, script)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "generic ok" in out.stdout
