"""Every bad input to quantized_matmul raises a clear TypeError/ValueError at
trace time, naming the argument with the expected and actual shape/dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_qops

K, N, B = 64, 24, 16
X = jnp.ones((3, K), jnp.bfloat16)
W8 = jnp.ones((N, K), jnp.int8)
S = jnp.ones((N,), jnp.float32)
W8_BLOCK = jnp.ones((K // B, B, N), jnp.int8)
S_BLOCK = jnp.ones((K // B, N), jnp.float32)
W4_PACKED = jnp.ones((N, K // 2), jnp.uint8)


@pytest.mark.parametrize("args, kwargs, error, match", [
    # dtypes
    ((X, W8.astype(jnp.float32), S), {}, TypeError,
     r"w: expected int8 .* or uint8 \(packed int4\), got float32"),
    ((X, W8, S.astype(jnp.int32)), {}, TypeError,
     "scale: expected a floating dtype .* got int32"),
    ((X, W8, S, S.astype(jnp.int8)), {}, TypeError,
     "zero_point: expected a floating dtype .* got int8"),
    ((X.astype(jnp.int32), W8, S), {}, TypeError,
     "x: expected dtype bfloat16, float16 or float32, got int32"),
    ((X.astype(jnp.float64) if jax.config.jax_enable_x64 else np.ones((3, K)), W8, S), {},
     TypeError, "x: expected dtype bfloat16, float16 or float32, got float64"),
    ((X, W4_PACKED, S), {}, TypeError, "w: uint8 is the packed int4 form and needs int4_weight=True"),
    # ranks
    ((jnp.ones((), jnp.float32), W8, S), {}, ValueError, r"x: expected rank >= 1"),
    ((X, W8[None], S), {}, ValueError, r"w: expected rank 2 \[out, in\] for block_size=-1, got shape \[1, 24, 64\]"),
    ((X, W8, S_BLOCK, None, B), {}, ValueError, r"w: expected rank 3 \[in/B, B, out\] for block_size=16, got shape \[24, 64\]"),
    # shapes
    ((X, W8[:, :32], S), {}, ValueError, r"w: expected shape \[24, 64\] \[out, in\] for in=64 \(x.shape\[-1\]\), got \[24, 32\]"),
    ((X, W8, S[:5]), {}, ValueError, r"scale: expected shape \[24\] \[out\] to match w \[24, 64\], got \[5\]"),
    ((X, W8, S, S[:, None]), {}, ValueError, r"zero_point: expected shape \[24\] \[out\] .* got \[24, 1\]"),
    ((X, W8_BLOCK, S_BLOCK[:, :3], None, B), {}, ValueError, r"scale: expected shape \[4, 24\] \[in/B, out\]"),
    ((X, W8_BLOCK[:, :8], S_BLOCK, None, B), {}, ValueError, r"w: expected shape \[4, 16, 24\] \[in/B, B, out\] .* got \[4, 8, 24\]"),
    ((jnp.ones((3, 48), jnp.float32), W8, S), {}, ValueError, r"w: expected shape \[24, 48\] .* got \[24, 64\]"),
    # block size
    ((X, W8_BLOCK, S_BLOCK, None, 0), {}, ValueError, "block_size: expected -1 .* got 0"),
    ((X, W8_BLOCK, S_BLOCK, None, 24), {}, ValueError, r"block_size: expected a divisor of in=64 \(x.shape\[-1\]\), got 24"),
    ((X, W8_BLOCK, S_BLOCK, None, -3), {}, ValueError, "block_size: expected -1 .* got -3"),
    ((X, W8_BLOCK, S_BLOCK, None, 16.0), {}, TypeError, "block_size: expected an int, got float"),
    # int4 forms
    ((jnp.ones((3, 63), jnp.float32), jnp.ones((N, 31), jnp.uint8), S, None, -1, True), {},
     ValueError, "x: packed int4 weights need an even number of input features, got in=63"),
    ((jnp.ones((3, 126), jnp.float32), jnp.ones((18, 3, N), jnp.uint8), jnp.ones((18, N)), None, 7, True), {},
     ValueError, "block_size: packed int4 weights pack pairs inside a block, so block_size must be even, got 7"),
    ((X, jnp.ones((N, K // 2), jnp.int8), S, None, -1, True), {}, ValueError,
     r"w: expected shape \[24, 64\] .* got \[24, 32\] \(this is the packed int4 shape: packed int4 must be stored as uint8"),
    ((X, jnp.ones((K // B, B // 2, N), jnp.int8), S_BLOCK, None, B, True), {}, ValueError,
     r"got \[4, 8, 24\] \(this is the packed int4 shape"),
    # flags and impl
    ((X, W8, S, None, -1, 1), {}, TypeError, "int4_weight: expected a bool, got int"),
    ((X, W8, S, None, -1, False, "yes"), {}, TypeError, "quantize_activation: expected a bool, got str"),
    ((X, W8, S), dict(impl="fastest"), ValueError, r"impl: expected one of 'auto', 'reference', 'xla'.* got 'fastest'"),
    ((X, W8), {}, TypeError, "scale: required when w is an array"),
    (([[1.0] * K], W8, S), {}, TypeError, "x: expected an array, got list"),
])
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        xla_qops.quantized_matmul(*args, **kwargs)


def test_bad_input_is_caught_at_trace_time_under_jit():
    f = jax.jit(lambda x, w, s: xla_qops.quantized_matmul(x, w, s))
    with pytest.raises(ValueError, match=r"scale: expected shape \[24\]"):
        f(X, W8, S[:5])


def test_quantized_weight_with_extra_arguments_is_refused():
    qw = xla_qops.quantize_weight(np.ones((N, K), np.float32))
    with pytest.raises(TypeError, match="w: a QuantizedWeight carries its own scale, block_size"):
        xla_qops.quantized_matmul(X, qw, S, block_size=B)


def _fake_backend(monkeypatch, available, supported, platforms=("cpu", "tpu", "cuda", "rocm")):
    import sys
    import types
    from xla_qops import dispatch
    module = types.ModuleType("fake_backend", "fake backend: only for this test")
    module.available = lambda: available
    module.supports = lambda spec, platform: supported and platform in platforms
    if platforms == ("cpu", "tpu", "cuda", "rocm"):
        module.matmul = lambda *args: pytest.fail("an unavailable backend must not run")
    else:  # traced for the platforms it supports, never run here
        module.matmul = lambda x, w, scale, zp, spec, platform: jnp.zeros(
            (x.shape[0], spec.out_features), x.dtype)
    monkeypatch.setitem(sys.modules, "fake_backend", module)
    monkeypatch.setitem(dispatch.BACKENDS, "fake", "fake_backend")


def test_impl_that_is_not_available_is_a_clear_error(monkeypatch):
    """A named backend this installation lacks fails with a message rather than
    silently falling back to another one."""
    _fake_backend(monkeypatch, available=False, supported=True)
    with pytest.raises(ValueError, match="impl: 'fake' is not available on this installation "
                                         r"\(fake backend: only for this test\)"):
        xla_qops.quantized_matmul(X, W8, S, impl="fake")


def test_impl_that_does_not_cover_the_scheme_is_a_clear_error(monkeypatch):
    _fake_backend(monkeypatch, available=True, supported=False)
    with pytest.raises(ValueError, match=r"impl: 'fake' does not support w8a16 block_size=-1 "
                                         r"\(bfloat16 x\) on cpu, tpu, cuda or rocm"):
        xla_qops.quantized_matmul(X, W8, S, impl="fake")


def test_impl_that_runs_elsewhere_fails_when_lowered_here(monkeypatch):
    """Supported on TPU only: tracing succeeds (the function could be exported
    for TPU), lowering for this CPU fails, naming impl, scheme and platform."""
    _fake_backend(monkeypatch, available=True, supported=True, platforms=("tpu",))
    fn = jax.jit(lambda x: xla_qops.quantized_matmul(x, W8, S, impl="fake"))
    assert jax.eval_shape(fn, X).shape == (X.shape[0], W8.shape[0])
    with pytest.raises(ValueError, match=r"impl: 'fake' cannot run w8a16 block_size=-1 "
                                         r"\(bfloat16 x\) on cpu; lowering for cpu needs"):
        fn.lower(X)
