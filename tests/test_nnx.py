"""xla_qops.nnx (API.md section 8): QuantizedLinear and quantize_model on Flax NNX models.

Layer numerics against the float64 statement (tests/numpy_reference.py) with
the quantized arrays the layer holds; the arrays themselves against
`xla_qops.quantize_weight` of the float kernel in [out, in] orientation (the
conversion, done once); the swap (paths, filter_fn, skips), calibrated
methods, jax.jit / nnx.jit, checkpoints (safetensors, orbax) and sharding
metadata. Needs flax (the `flax` extra), no torch: runs in .venv and .venv-jax.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx  # both test environments install the flax extra (requirements*.txt)
import numpy_reference as ref  # noqa: E402

import xla_qops  # noqa: E402
from xla_qops import nnx as qnnx  # noqa: E402
from xla_qops.schemes import SCHEMES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class Block(nnx.Module):
    """A small model with each replaceable kind: Linear, a one-contraction Einsum
    (an attention projection), LinearGeneral with one and with two contracted axes,
    and a list of layers."""

    def __init__(self, rngs, bias=True):
        self.up = nnx.Linear(64, 32, use_bias=bias, rngs=rngs)
        self.heads = nnx.Einsum("btd,dhk->bthk", (32, 4, 8), (4, 8) if bias else None,
                                rngs=rngs)
        self.merge = nnx.LinearGeneral((4, 8), 32, axis=(-2, -1), use_bias=bias, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(32, 32, use_bias=bias, rngs=rngs),
                                nnx.LinearGeneral(32, (2, 16), use_bias=bias, rngs=rngs)])

    def __call__(self, x):
        y = self.merge(self.heads(self.up(x)))
        return self.layers[1](self.layers[0](y))


def _x(shape=(2, 3, 64), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _kernel_out_in(module) -> np.ndarray:
    return np.asarray(module.kernel[...], np.float32).reshape(
        module.kernel[...].shape[0], -1).T


@pytest.mark.parametrize("scheme,block_size,symmetric", [
    ("w8a16", -1, True), ("w4a16", 16, False), ("w8a8", -1, True), ("w4a8", 32, True),
    ("w8a16-fp8", -1, True), ("w4a16-mxfp4", -1, True), ("w4a16-nvfp4", -1, True),
    ("w4a8-fp8", 16, True)])
def test_linear_matches_float64_reference(scheme, block_size, symmetric):
    """Every scheme of the core's table: the layer's arrays are quantize_weight's of
    the kernel in [out, in] (converted once), and its output is the float64
    statement of those arrays within numpy_reference's float32 bound."""
    model = Block(nnx.Rngs(0), bias=False)
    kernel = _kernel_out_in(model.up)
    qnnx.quantize_model(model, scheme=scheme, block_size=block_size, symmetric=symmetric,
                        filter_fn=lambda path, module: path == "up")
    layer = model.up
    assert isinstance(layer, qnnx.QuantizedLinear)
    spec = SCHEMES[scheme]
    expected = xla_qops.quantize_weight(
        kernel, bits=spec.bits, block_size=spec.block_size(block_size), symmetric=symmetric,
        format=spec.format)
    qw = layer.quantized_weight
    np.testing.assert_array_equal(np.asarray(qw.w).view(np.uint8),
                                  np.asarray(expected.w).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(qw.scale), np.asarray(expected.scale))
    assert (qw.zero_point is None) == symmetric
    x = _x()
    ref.assert_close(layer(x), x, np.asarray(qw.w), np.asarray(qw.scale),
                     None if qw.zero_point is None else np.asarray(qw.zero_point),
                     qw.block_size, spec.quantize_activation,
                     weight_format=qw.weight_format if qw.format != "int" else None,
                     activation_format=spec.activation_format)


def _float_bound(x64, w64, k):
    """float32 accumulation of k products, rounded once to float32 (Higham's gamma_k
    on sum |x||w|, plus the final rounding of |y|)."""
    return (k + 1) * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64))


def test_einsum_and_linear_general_match_their_float64_einsum():
    """An Einsum (output axes reordered by its string) and a LinearGeneral (out split
    into two axes) give the float64 einsum / tensordot of their dequantized kernels,
    bias included."""
    model = Block(nnx.Rngs(0))
    qnnx.quantize_model(model, scheme="w8a16")
    x = np.asarray(_x((2, 3, 32)), np.float64)
    heads = model.heads
    w = np.asarray(heads.quantized_weight.dequantize(), np.float64)  # [h*k, d]
    kernel = w.T.reshape(32, 4, 8)
    expected = np.einsum("btd,dhk->bthk", x, kernel) + np.asarray(heads.bias[...])
    bound = _float_bound(x.reshape(-1, 32), w.T, 32).reshape(2, 3, 4, 8) + 2.0 ** -24 * np.abs(
        expected)
    actual = np.asarray(heads(jnp.asarray(x, jnp.float32)), np.float64)
    assert actual.shape == (2, 3, 4, 8)
    assert np.all(np.abs(actual - expected) <= bound)

    general = model.layers[1]
    w = np.asarray(general.quantized_weight.dequantize(), np.float64)  # [2*16, 32]
    expected = (x @ w.T).reshape(2, 3, 2, 16) + np.asarray(general.bias[...])
    bound = _float_bound(x.reshape(-1, 32), w.T, 32).reshape(2, 3, 2, 16) + 2.0 ** -24 * np.abs(
        expected)
    actual = np.asarray(general(jnp.asarray(x, jnp.float32)), np.float64)
    assert np.all(np.abs(actual - expected) <= bound)


def test_swaps_by_path_and_filter_and_reports_skips():
    model = Block(nnx.Rngs(0))
    seen = []

    def keep(path, module):
        seen.append(path)
        return path != "layers/0"

    qnnx.quantize_model(model, scheme="w4a16", block_size=16, filter_fn=keep)
    assert set(seen) == {"up", "heads", "merge", "layers/0", "layers/1"}
    assert isinstance(model.up, qnnx.QuantizedLinear)
    assert isinstance(model.heads, qnnx.QuantizedLinear)
    assert isinstance(model.layers[1], qnnx.QuantizedLinear)
    assert isinstance(model.layers[0], nnx.Linear)  # filtered out
    assert isinstance(model.merge, nnx.LinearGeneral)  # two contracted axes
    report = qnnx.quantization_report(model)
    assert sorted(report.swapped) == ["heads", "layers/1", "up"]
    reasons = dict(report.skipped)
    assert reasons["layers/0"] == "filter_fn returned False"
    assert "contracts 2 axes" in reasons["merge"]
    assert model(_x()).shape == (2, 3, 2, 16)


def test_gptq_calibration_gathers_each_layers_inputs():
    """method='gptq': the first layer's inputs are the model inputs, so its weight is
    exactly quantize_weight's GPTQ with those inputs as calibration."""
    model = Block(nnx.Rngs(0))
    kernel = _kernel_out_in(model.up)
    batches = [_x(seed=2), _x(seed=3)]
    qnnx.quantize_model(model, scheme="w4a16", block_size=16, method="gptq",
                        calibration=batches)
    expected = xla_qops.quantize_weight(
        kernel, bits=4, block_size=16, method="gptq",
        calibration=np.concatenate([np.asarray(b).reshape(-1, 64) for b in batches]))
    np.testing.assert_array_equal(np.asarray(model.up.quantized_weight.w), np.asarray(expected.w))
    rtn = xla_qops.quantize_weight(kernel, bits=4, block_size=16)
    assert not np.array_equal(np.asarray(expected.w), np.asarray(rtn.w))  # the data mattered


def test_jit_forms_agree_with_eager():
    model = qnnx.quantize_model(Block(nnx.Rngs(0)), scheme="w4a16", block_size=16)
    x = _x()
    eager = np.asarray(model(x))
    by_nnx_jit = nnx.jit(lambda m, x: m(x))(model, x)
    graphdef, state = nnx.split(model)  # the fast form: split once, jit a pure function
    by_jax_jit = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    np.testing.assert_array_equal(np.asarray(by_nnx_jit), eager)
    np.testing.assert_array_equal(np.asarray(by_jax_jit), eager)


@pytest.mark.parametrize("scheme,symmetric", [("w4a16", False), ("w8a8", True),
                                              ("w8a16-fp8", True)])
def test_safetensors_roundtrip_is_exact(tmp_path, scheme, symmetric):
    model = qnnx.quantize_model(Block(nnx.Rngs(0)), scheme=scheme, symmetric=symmetric,
                                block_size=16 if scheme == "w4a16" else -1)
    path = tmp_path / "model.safetensors"
    qnnx.save_quantized(model, path)
    other = qnnx.quantize_model(Block(nnx.Rngs(7)), scheme=scheme, symmetric=symmetric,
                                block_size=16 if scheme == "w4a16" else -1)
    x = _x()
    assert not np.array_equal(np.asarray(other(x)), np.asarray(model(x)))
    qnnx.load_quantized(other, path)
    _assert_same_state(model, other)
    np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(model(x)))
    loaded = xla_qops.checkpoint.load_quantized(path)  # the core reads it as its own
    assert loaded.schemes["up"].scheme == (scheme if scheme != "w8a16-fp8" else "w8a16-fp8")


def _assert_same_state(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(a)))
    flat_b = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(b))))
    assert len(flat_a) == len(flat_b)
    for path, value in flat_a:
        other = flat_b[path]
        assert value.dtype == other.dtype and value.shape == other.shape, path
        np.testing.assert_array_equal(np.asarray(value).view(np.uint8),
                                      np.asarray(other).view(np.uint8))


def test_orbax_roundtrip_is_exact(tmp_path):
    import orbax.checkpoint as ocp  # a dependency of flax
    model = qnnx.quantize_model(Block(nnx.Rngs(0)), scheme="w4a16", block_size=16,
                                symmetric=False)
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
    other = qnnx.quantize_model(Block(nnx.Rngs(7)), scheme="w4a16", block_size=16,
                                symmetric=False)
    graphdef, abstract = nnx.split(other)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "state", abstract)
    other = nnx.merge(graphdef, restored)
    _assert_same_state(model, other)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(scheme="w3a16"), ValueError, ["scheme", "'w8a16'", "'w3a16'"]),
    (dict(block_size=0), ValueError, ["block_size", "0"]),
    (dict(block_size=16.0), TypeError, ["block_size", "float"]),
    (dict(method="gptq"), ValueError, ["calibration", "gptq", "None"]),
    (dict(calibration=[np.ones((1, 64))]), ValueError, ["calibration", "rtn"]),
    (dict(scheme="w8a16-fp8", symmetric=False), ValueError, ["symmetric", "False"]),
    (dict(filter_fn="up"), TypeError, ["filter_fn", "str"]),
    (dict(method="gptq", calibration=np.ones((2, 64))), TypeError, ["calibration", "ndarray"]),
])
def test_bad_arguments_name_themselves_and_leave_the_model(kwargs, error, words):
    model = Block(nnx.Rngs(0))
    with pytest.raises(error) as info:
        qnnx.quantize_model(model, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert isinstance(model.up, nnx.Linear)


def test_model_must_be_an_nnx_module():
    with pytest.raises(TypeError, match="model: expected a flax.nnx.Module, got dict"):
        qnnx.quantize_model({})


SHARDING_CHILD = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from xla_qops import nnx as qnnx
    mesh = jax.make_mesh((2,), ("model",))
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    with set_mesh(mesh):
        layer = nnx.Linear(64, 32, kernel_init=init, use_bias=False, rngs=nnx.Rngs(0))
    model = nnx.Sequential(layer)
    x = jnp.ones((4, 64))
    expected = model(x)
    for block_size, specs in ((-1, (P("model", None), P("model"))),
                              (16, (P(None, None, "model"), P(None, "model")))):
        m = qnnx.quantize_model(nnx.clone(model), scheme="w8a16", block_size=block_size)
        q = m.layers[0]
        key = "out_sharding" if "out_sharding" in q.weight.get_metadata() else "sharding_names"
        assert tuple(q.weight.get_metadata()[key]) == tuple(specs[0]), q.weight.get_metadata()
        for variable, spec in zip((q.weight, q.scale), specs):
            sharding = variable[...].sharding
            assert sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec),
                                             variable[...].ndim), (sharding, spec)
        graphdef, state = nnx.split(m)
        step = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        hlo = step.lower(state, x).compile().as_text()
        assert "all-gather" not in hlo, "the sharded weight was gathered"
        y = step(state, x)
        assert float(jnp.abs(y - expected).max()) < 0.05 * float(jnp.abs(expected).max())
    print("ok")
""")


def test_sharding_metadata_carries_over_and_nothing_is_gathered():
    """A kernel partitioned over `out` on a 2-device mesh: the quantized weight and
    scale carry the mapped partitioning (metadata and placement), and the jitted
    forward has no all-gather (a child process: the device count is set at start)."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                      + " --xla_force_host_platform_device_count=2").strip())
    result = subprocess.run([sys.executable, "-c", SHARDING_CHILD], env=env, cwd=HERE,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
