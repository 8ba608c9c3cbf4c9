"""The calibrated quantizers on the float grids of API.md section 7 (quantize_weight(format=...,
method="gptq" | "awq")), NVFP4's divisor form and the one rule for float formats
(xla_qops.schemes.float_format_problem).

GPTQ on a float grid is checked by what a wrong grid would break: on held-out
inputs from the same (correlated) distribution it beats round to nearest of the
same format by a wide margin; every value it stores is one of the format's
(e4m3 / e2m1, saturating at 448 / 6); the op's output on it equals the float64
statement (tests/numpy_reference.py). AWQ's clip search has round to nearest as
one candidate, so on its own objective it is never worse.
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import numpy_reference as ref
import xla_qops
from test_quantizers import layer, outlier_layer
from xla_qops import quantizers, schemes
from xla_qops.quantizers import float_formats

FORMATS = [("fp8", -1), ("fp8", 32), ("mxfp4", -1), ("nvfp4", -1)]
format_ids = [f"{f}-{'pc' if b == -1 else f'g{b}'}" for f, b in FORMATS]


def dequantized(qw) -> np.ndarray:
    """float64 ``[out, in]`` of a float QuantizedWeight, by the float64 statement."""
    return ref.dequantize_float(np.asarray(qw.w), np.asarray(qw.scale), qw.weight_format,
                                qw.block_size)


def output_error(w, qw, x) -> float:
    d = w.astype(np.float64) - dequantized(qw)
    return float(np.sum((x.astype(np.float64) @ d.T) ** 2))


@pytest.mark.parametrize("fmt,block_size", FORMATS, ids=format_ids)
def test_gptq_on_the_float_grid_beats_round_to_nearest_held_out(fmt, block_size):
    """Held-out inputs: GPTQ below a tenth of RTN's output error on every format (measured
    0.013-0.016 of it; the inputs are strongly correlated, so there is much to compensate);
    rounding onto a wrong grid (the int one, or without saturation) would leave the
    format's values or raise the error."""
    w, x, x_test = layer(np.random.default_rng(21), held_out=400)
    kw = dict(format=fmt, block_size=block_size)
    rtn = output_error(w, xla_qops.quantize_weight(w, **kw), x_test)
    gptq = output_error(w, xla_qops.quantize_weight(w, method="gptq", calibration=x, **kw),
                        x_test)
    assert gptq < 0.1 * rtn, gptq / rtn


@pytest.mark.parametrize("fmt,block_size", FORMATS, ids=format_ids)
def test_awq_on_the_float_grid_is_never_worse_and_pays_off_on_outliers(fmt, block_size):
    """AWQ's clip search tries the format's own scale of each clipped range; r = 1 is round
    to nearest, so on the calibration objective it is never worse; on `outlier_layer` (a
    barely used feature with large weights in each group) clipping pays off on held-out
    inputs wherever the format's scale can follow the clip (MX's powers of two move only
    across a binade, so there it is only never worse)."""
    w, x, x_test = outlier_layer(np.random.default_rng(22))
    kw = dict(format=fmt, block_size=block_size)
    rtn = xla_qops.quantize_weight(w, **kw)
    awq = xla_qops.quantize_weight(w, method="awq", calibration=x, **kw)
    assert output_error(w, awq, x) <= output_error(w, rtn, x)
    if fmt != "mxfp4":
        assert output_error(w, awq, x_test) < 0.8 * output_error(w, rtn, x_test)


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("fmt,block_size", FORMATS, ids=format_ids)
def test_every_stored_value_is_a_code_of_the_format(method, fmt, block_size):
    """The methods' values are the format's own (RNE onto e4m3 / e2m1, saturating): the
    value grid `quantize_float` returns is unchanged by rounding it again, stays within
    +-448 / +-6 and reaches it (the weights are scaled so that GPTQ's compensation pushes
    past the top), and the stored codes decode (float64 statement) to exactly those values."""
    w, x = layer(np.random.default_rng(23))
    top = 448.0 if fmt == "fp8" else 6.0
    h = quantizers.calibration_hessian(x)
    b = schemes.format_block_size(fmt, block_size)
    values, scale = quantizers.quantize_float(w, fmt, b, method, h)
    np.testing.assert_array_equal(float_formats.round_values(values, fmt), values)
    assert np.abs(values).max() == top
    qw = xla_qops.quantize_weight(w, format=fmt, block_size=block_size, method=method,
                                  calibration=x)
    decoded = ref.float_values(np.asarray(qw.w), qw.weight_format, qw.block_size)
    np.testing.assert_array_equal(decoded, values.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(qw.scale), scale)


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("fmt,block_size", FORMATS, ids=format_ids)
def test_the_op_on_a_calibrated_float_weight_equals_the_float64_statement(method, fmt,
                                                                          block_size):
    w, x = layer(np.random.default_rng(24))
    qw = xla_qops.quantize_weight(w, format=fmt, block_size=block_size, method=method,
                                  calibration=x)
    xs = jnp.asarray(x[:5], jnp.bfloat16)
    for impl in ("reference", "xla", "auto"):
        y = xla_qops.quantized_matmul(xs, qw, impl=impl)
        ref.assert_close(np.asarray(y.astype(jnp.float32)), np.asarray(xs), np.asarray(qw.w),
                         np.asarray(qw.scale), None, qw.block_size,
                         weight_format=qw.weight_format)


def test_nvfp4_divisor_form_is_llm_compressors_rule():
    """float32 statement of compressed-tensors' NVFP4 (generate_gparam, calculate_qparams,
    then w / float32(s / g)): g = 448*6 / amax, s = e4m3(amax_b / 6 * g); the library
    itself is the judge in tests/test_interop_formats.py."""
    rng = np.random.default_rng(25)
    w = (rng.standard_normal((32, 64)) * np.exp(rng.uniform(-4, 2, (32, 1)))).astype(np.float32)
    # torch's `2688 / amax` there: reciprocal, then a product (two float32 roundings)
    g = np.float32(np.float32(1) / np.abs(w).max() * np.float32(448 * 6))
    amax = np.abs(w.reshape(32, 4, 16)).max(-1)
    local = (amax / np.float32(6)).astype(np.float32)
    block = np.clip(local * g, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    want_scale = (block / g).astype(np.float32)  # [out, in/16]
    q, scale = float_formats.quantize(w, "nvfp4", 16, nvfp4_divisor=True)
    np.testing.assert_array_equal(scale, want_scale.T)
    scaled = (w.reshape(32, 4, 16) / want_scale[..., None]).astype(np.float32)
    want_codes = scaled.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    np.testing.assert_array_equal(q, want_codes.reshape(32, 64).T.reshape(4, 16, 32))
    # ... and differs from the multiplier form (ModelOpt's, quantize_weight's) somewhere.
    _, multiplier = float_formats.quantize(w, "nvfp4", 16)
    assert not np.array_equal(multiplier, scale)


def test_nvfp4_divisor_form_exports_to_compressed_tensors_exactly():
    """The multiplier form's scales are not float32(s / g) for most weights (the export
    needs exact=False); the divisor form's always are, and read back bit for bit."""
    w = np.random.default_rng(26).standard_normal((64, 256)).astype(np.float32) * 3
    qw = xla_qops.quantize.quantize_float(w, "nvfp4", 16, nvfp4_divisor=True)
    layer_ = xla_qops.interop.to_compressed_tensors(qw)  # exact=True
    back = xla_qops.interop.from_compressed_tensors(
        layer_.tensors, num_bits=4, group_size=16, strategy="tensor_group",
        compression_format="nvfp4-pack-quantized")
    np.testing.assert_array_equal(np.asarray(back.w), np.asarray(qw.w))
    np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(qw.scale))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="hqq"), "method: format='fp8' rounds to nearest even onto its float grid, "
                         "with method 'rtn', 'gptq', 'awq', got 'hqq'"),
    (dict(method="gptq"), "calibration: method='gptq' needs calibration inputs"),
    (dict(method="rtn", calibration=np.ones((4, 64))),
     "calibration: method='rtn' uses no calibration inputs"),
    (dict(method="gptq", calibration=np.ones((4, 32))),
     r"calibration: expected a float \[n, in=64\] sample"),
])
def test_float_format_method_errors_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        xla_qops.quantize_weight(np.ones((8, 64), np.float32), format="fp8", **kwargs)


@pytest.mark.parametrize("fmt, kwargs, message", [
    ("fp8", dict(symmetric=False), "symmetric: format='fp8' has float weights, which are "
                                   "symmetric (no zero point, API.md section 7), got "
                                   "symmetric=False"),
    ("nvfp4", dict(block_size=32), "block_size: format='nvfp4' has blocks of 16, got 32 (NVFP4)"),
    ("mxfp4", dict(block_size=7), "block_size: e2m1 codes are stored in pairs inside a block, "
                                  "so it must be even for format='mxfp4', got 7"),
    ("fp8", dict(block_size=7), None),
    ("int", dict(symmetric=False, method="hqq"), None),
    ("mxfp4", dict(method="awq"), None),
])
def test_one_rule_for_the_float_formats(fmt, kwargs, message):
    """The predicate every face calls; the command line spells its options."""
    assert schemes.float_format_problem(fmt, subject=f"format={fmt!r}", **kwargs) == message
    cli = schemes.float_format_problem("nvfp4", subject="scheme w4a16-nvfp4", block_size=32,
                                       cli=True)
    assert cli == "block-size: scheme w4a16-nvfp4 has blocks of 16, got 32 (NVFP4)"
    assert schemes.float_format_problem("fp8", subject="scheme w8a16-fp8", symmetric=False,
                                        cli=True).startswith("asymmetric: scheme w8a16-fp8 "
                                                             "has float weights")
