"""xla_qops.nnx (API.md section 8): QuantizedLinear and quantize_model on Flax NNX models.

Layer numerics against the float64 statement (tests/numpy_reference.py) with
the quantized arrays the layer holds; the arrays themselves against
`xla_qops.quantize_weight` of the float kernel in [out, in] orientation (the
conversion, done once); the swap (paths, filter_fn, skips), calibrated
methods, jax.jit / nnx.jit, checkpoints (safetensors, orbax) and sharding
metadata. Needs flax (the `flax` extra); the comparison with the torch face is marked
torch (deselected in .venv-jax, which has none); the rest runs in every env.
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
    the core's GPTQ with the per-layer held-out check (torch_bridge's rule): fitted on
    the first batch, judged against round to nearest on the second (held out)."""
    model = Block(nnx.Rngs(0))
    kernel = _kernel_out_in(model.up)
    batches = [_x(seed=2), _x(seed=3)]
    qnnx.quantize_model(model, scheme="w4a16", block_size=16, method="gptq",
                        calibration=batches)
    hessians = [xla_qops.quantizers.calibration_hessian(np.asarray(b).reshape(-1, 64))
                for b in batches]
    expected, check = xla_qops.quantize.quantize_with_holdout(
        kernel, bits=4, block_size=16, symmetric=True, method="gptq",
        fit_hessian=hessians[0], holdout_hessian=hessians[1])
    np.testing.assert_array_equal(np.asarray(model.up.quantized_weight.w), np.asarray(expected.w))
    assert qnnx.quantization_report(model).methods["up"].startswith(check.kept)
    rtn = xla_qops.quantize_weight(kernel, bits=4, block_size=16)
    if check.kept == "gptq":
        assert not np.array_equal(np.asarray(expected.w), np.asarray(rtn.w))  # data mattered


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


# ------------------------------------------------- calibrated methods, as the torch face

D, F = 64, 128  # model width and MLP width: a few milliseconds per eager forward


def _decoder_arrays(seed=0) -> dict:
    """float32 weights [out, in], biases and norm scales of `DecoderBlock`, from numpy: the
    norm scales uneven with an outlier channel, as real activations are (what AWQ is for)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, (n_out, n_in) in dict(q=(D, D), k=(D, D), v=(D, D), o=(D, D), gate=(F, D),
                                    up=(F, D), down=(D, F)).items():
        arrays[name] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        arrays[name + "_bias"] = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
    for norm in ("norm1", "norm2"):
        scale = np.exp(rng.standard_normal(D))
        scale[5] = 20.0
        arrays[norm] = scale.astype(np.float32)
    arrays["v"][7] *= 10.0  # an outlier channel of v's output: o's input, for o's own scale
    return arrays


class DecoderBlock(nnx.Module):
    """norm1 -> v, q, k (v -> o: a Linear feeding a Linear); norm2 -> gate, up; down reads a
    product (no producer to fold into). Groups in run order: (v, q, k) folded into norm1,
    (o) into v's output columns, (gate, up) into norm2, (down) explicit."""

    def __init__(self, arrays: dict):
        rngs = nnx.Rngs(0)
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            w = arrays[name]
            layer = nnx.Linear(w.shape[1], w.shape[0], rngs=rngs)
            layer.kernel[...] = jnp.asarray(w.T)
            layer.bias[...] = jnp.asarray(arrays[name + "_bias"])
            setattr(self, name, layer)
        for norm in ("norm1", "norm2"):
            layer = nnx.RMSNorm(D, epsilon=1e-6, rngs=rngs)
            layer.scale[...] = jnp.asarray(arrays[norm])
            setattr(self, norm, layer)

    def __call__(self, x):
        h = self.norm1(x)
        x = x + self.o(self.v(h)) + self.q(h) * self.k(h)
        h = self.norm2(x)
        return x + self.down(nnx.silu(self.gate(h)) * self.up(h))


def _calibration(count=3, seed=10):
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.standard_normal((4, 16, D)), jnp.float32),) for _ in range(count)]


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_awq_beats_round_to_nearest_on_held_out_inputs():
    """The AWQ scales (searched per group, folded) and clipping lower the model's output
    error on inputs the calibration never saw, against round to nearest."""
    arrays = _decoder_arrays()
    held_out = _calibration(count=1, seed=99)[0][0]
    reference = DecoderBlock(arrays)(held_out)
    errors = {}
    for method in ("rtn", "awq"):
        model = qnnx.quantize_model(
            DecoderBlock(arrays), scheme="w4a16", block_size=32, method=method,
            calibration=_calibration() if method != "rtn" else None)
        errors[method] = _relative_error(model(held_out), reference)
    assert errors["awq"] < errors["rtn"], errors


def _float64_rms_norm(x, scale, epsilon=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + epsilon) * scale


def test_folded_scales_equal_the_unfolded_math():
    """After AWQ: the norms' scales hold 1/s, v's output columns hold o's 1/s and down
    multiplies its input by 1/s (no producer). The quantized model equals the float64
    statement of the unfolded math -- original norms and biases, each layer's stored
    weight divided by its input scale (v's rows multiplied back by o's)."""
    arrays = _decoder_arrays()
    model = qnnx.quantize_model(DecoderBlock(arrays), scheme="w4a16", block_size=32,
                                method="awq", calibration=_calibration())
    scales = qnnx.quantization_report(model).input_scales
    places = {path: place for path, (place, _) in scales.items()}
    assert places == {"v": "folded into norm1", "q": "folded into norm1",
                      "k": "folded into norm1", "o": "folded into v",
                      "gate": "folded into norm2", "up": "folded into norm2",
                      "down": "explicit"}, places
    s = {path: s.astype(np.float64) for path, (_, s) in scales.items()}
    assert not np.array_equal(np.asarray(model.norm1.scale[...]), arrays["norm1"])
    np.testing.assert_array_equal(np.asarray(model.down.input_scale[...]),
                                  (1.0 / scales["down"][1]).astype(np.float32))

    def unfolded(path):  # float64 [out, in] of the layer in the float model's terms
        w = np.asarray(getattr(model, path).quantized_weight.dequantize(), np.float64)
        w = w / s[path][None, :]
        return w * s["o"][:, None] if path == "v" else w

    weights = {path: unfolded(path) for path in s}
    layer = lambda path, x: x @ weights[path].T + arrays[path + "_bias"]  # noqa: E731
    x = np.asarray(_calibration(count=1, seed=99)[0][0], np.float64)
    h = _float64_rms_norm(x, arrays["norm1"].astype(np.float64))
    y = x + layer("o", layer("v", h)) + layer("q", h) * layer("k", h)
    h = _float64_rms_norm(y, arrays["norm2"].astype(np.float64))
    gate = layer("gate", h)
    expected = y + layer("down", gate / (1 + np.exp(-gate)) * layer("up", h))
    actual = np.asarray(model(jnp.asarray(x, jnp.float32)), np.float64)
    # float32 against float64: four matmuls in sequence of at most 128 products (each
    # within (k+1) 2^-24 of sum |x||w|, here below 100 |y|), two norms and the folds'
    # own float32 roundings (1/s and its products, 2^-24 each): far below 1e-4 of |y|;
    # a fold that lost a factor (bias, column, norm) is off by O(|y|).
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def _torch_decoder(arrays):
    import torch  # the torch face: the test is marked torch (not run in .venv-jax)

    class TorchDecoderBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                w = arrays[name]
                layer = torch.nn.Linear(w.shape[1], w.shape[0])
                with torch.no_grad():
                    layer.weight.copy_(torch.from_numpy(w))
                    layer.bias.copy_(torch.from_numpy(arrays[name + "_bias"]))
                setattr(self, name, layer)
            for norm in ("norm1", "norm2"):
                layer = torch.nn.RMSNorm(D, eps=1e-6)
                with torch.no_grad():
                    layer.weight.copy_(torch.from_numpy(arrays[norm]))
                setattr(self, norm, layer)

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.o(self.v(h)) + self.q(h) * self.k(h)
            h = self.norm2(x)
            return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

    return torch, TorchDecoderBlock().eval()


@pytest.mark.torch
@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_nnx_and_torch_faces_give_the_same_codes(method):
    """The same weights and inputs (numpy), the same method: the same groups, scales, folds,
    held-out decisions and so the same stored codes, layer by layer. The two frameworks'
    float32 RMSNorms differ in the last bit here and there (rsqrt), so the activation
    statistics and with them s, the grids' scales and the folded norms may differ by a
    few float32 ulps (rtol 1e-6 is 8 ulps of 2^-23); a different fold, grid or code would
    be off by far more."""
    arrays = _decoder_arrays()
    torch, torch_model = _torch_decoder(arrays)
    import torch_bridge
    calibration = _calibration()
    torch_bridge.quantize_model(torch_model, scheme="w4a16", block_size=32, method=method,
                                calibration=[torch.from_numpy(np.array(x))
                                             for (x,) in calibration], progress=False)
    model = qnnx.quantize_model(DecoderBlock(arrays), scheme="w4a16", block_size=32,
                                method=method, calibration=calibration)
    torch_report = {layer.name: layer for layer in
                    torch_bridge.quantization_report(torch_model).swapped}
    report = qnnx.quantization_report(model)
    for path in ("q", "k", "v", "o", "gate", "up", "down"):
        theirs, ours = getattr(torch_model, path), getattr(model, path)
        np.testing.assert_array_equal(np.asarray(ours.weight[...]).view(np.uint8),
                                      theirs.weight.numpy().view(np.uint8), err_msg=path)
        np.testing.assert_allclose(np.asarray(ours.scale[...]), theirs.weight_scaler.numpy(),
                                   rtol=1e-6, atol=0, err_msg=path)
        assert torch_report[path].method == report.methods[path], path
        assert torch_report[path].input_scale == report.input_scales[path][0], path
    for norm in ("norm1", "norm2"):
        np.testing.assert_allclose(np.asarray(getattr(model, norm).scale[...]),
                                   getattr(torch_model, norm).weight.detach().numpy(),
                                   rtol=1e-6, atol=0, err_msg=norm)


@pytest.mark.parametrize("method", xla_qops.quantizers.METHODS)
def test_every_registered_method_runs_and_its_layers_run_their_stored_weights(method):
    """Each method of the registry: the quantized model's layers compute the float64
    statement (numpy_reference) of the arrays they store, an explicit input scale
    applied first; calibrated methods name what they used per layer."""
    arrays = _decoder_arrays()
    calibrated = method in xla_qops.quantizers.CALIBRATED
    model = qnnx.quantize_model(DecoderBlock(arrays), scheme="w4a16", block_size=32,
                                method=method,
                                calibration=_calibration() if calibrated else None)
    report = qnnx.quantization_report(model)
    assert set(report.methods) == {"q", "k", "v", "o", "gate", "up", "down"}
    for path, used in report.methods.items():
        assert used == method or used.startswith(f"rtn (fallback: {method}"), (path, used)
    x = _x((3, F))
    for path in report.methods:
        layer = getattr(model, path)
        assert isinstance(layer, qnnx.QuantizedLinear)
        inputs = x[:, :layer.in_features]
        if layer.input_scale is not None:
            inputs = inputs * layer.input_scale[...]
        qw = layer.quantized_weight
        without_bias = np.asarray(layer(x[:, :layer.in_features]), np.float64) - np.asarray(
            layer.bias[...], np.float64)
        ref.assert_close(without_bias, np.asarray(inputs), np.asarray(qw.w),
                         np.asarray(qw.scale),
                         None if qw.zero_point is None else np.asarray(qw.zero_point),
                         qw.block_size)


def test_awq_model_with_an_explicit_input_scale_saves_and_restores(tmp_path):
    """The explicit input scale is state like the weight: written by save_quantized and
    restored bit for bit into a model of the same structure (its state zeroed here)."""
    calibration = _calibration()
    model = qnnx.quantize_model(DecoderBlock(_decoder_arrays()), scheme="w4a16",
                                block_size=32, method="awq", calibration=calibration)
    assert model.down.input_scale is not None
    path = tmp_path / "model.safetensors"
    qnnx.save_quantized(model, path)
    other = nnx.clone(model)
    nnx.update(other, jax.tree_util.tree_map(jnp.zeros_like, nnx.state(other)))
    x = calibration[0][0]
    assert not np.array_equal(np.asarray(other(x)), np.asarray(model(x)))
    qnnx.load_quantized(other, path)
    _assert_same_state(model, other)
    np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(model(x)))
