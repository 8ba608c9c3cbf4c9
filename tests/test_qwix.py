"""xla_qops.qwix.PtqProvider (API.md section 8) against qwix's own PtqProvider.

Both quantize the weights with qwix's code (same integers and scales), so on
the routed rules (int8/int4 weight-only, per channel or tiled; W8A8) the two
differ by float32 accumulation only (W8A16/W4A16), or by their activation
grids (W8A8: ours absmax/127, qwix absmax/127.5); rules the kernels cannot run
stay on qwix's path and give qwix's result bit for bit. The converter is
checked against qwix's own dequantization, and the layer against the float64
statement (tests/numpy_reference.py). Needs flax and qwix, no torch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwix  # both test environments install the flax extra (requirements*.txt)
from flax import nnx
import numpy_reference as ref  # noqa: E402

from xla_qops import qwix as xq  # noqa: E402
from qwix._src.core import qarray  # noqa: E402


class Model(nnx.Module):
    """nnx.Linear layers (dot_general) and an attention-style nnx.Einsum."""

    def __init__(self, rngs):
        self.up = nnx.Linear(64, 32, rngs=rngs)
        self.heads = nnx.Einsum("btd,dhk->bhtk", (32, 4, 8), (4, 1, 8), rngs=rngs)
        self.down = nnx.Linear(32, 16, use_bias=False, rngs=rngs)

    def __call__(self, x):
        y = self.heads(self.up(x))  # [b, h, t, k]
        y = jnp.transpose(y, (0, 2, 1, 3)).reshape(x.shape[0], x.shape[1], 32)
        return self.down(y)


def _x(shape=(2, 3, 64), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _both(rule_kwargs, x, model=Model):
    rules = [qwix.QuantizationRule(module_path=".*", **rule_kwargs)]
    ours = qwix.quantize_model(model(nnx.Rngs(0)), xq.PtqProvider(rules), x)
    theirs = qwix.quantize_model(model(nnx.Rngs(0)), qwix.PtqProvider(rules), x)
    return ours, theirs


WEIGHT_ONLY = [dict(weight_qtype=jnp.int8), dict(weight_qtype=jnp.int4),
               dict(weight_qtype=jnp.int4, tile_size=16),
               dict(weight_qtype=jnp.int8, tile_size=0.5),
               dict(weight_qtype=jnp.int4, tile_size=8, weight_calibration_method="minmax")]


@pytest.mark.parametrize("rule", WEIGHT_ONLY, ids=str)
def test_weight_only_routes_to_the_kernels_and_agrees_with_qwix(rule):
    x = _x()
    ours, theirs = _both(rule, x)
    for layer in (ours.up, ours.heads, ours.down):  # converted once, held in the state
        assert isinstance(layer.kernel.array, xq.KernelWeight)
    assert isinstance(theirs.up.kernel.array, qarray.QArray)
    y_ours, y_theirs = np.asarray(ours(x), np.float64), np.asarray(theirs(x), np.float64)
    # Same weights; each side sums float32 products in its own order, three layers
    # deep: a few float32 ulps of the output's scale (|y| ~ 1, 64-term dots).
    np.testing.assert_allclose(y_ours, y_theirs, rtol=0, atol=64 * 2.0 ** -24 * 8)


def test_jit_forms_agree_with_eager():
    x = _x()
    ours, _ = _both(dict(weight_qtype=jnp.int4, tile_size=16), x)
    eager = np.asarray(ours(x))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(ours, x)), eager)
    graphdef, state = nnx.split(ours)
    y = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    np.testing.assert_array_equal(np.asarray(y), eager)


@pytest.mark.parametrize("rule", WEIGHT_ONLY, ids=str)
def test_converted_weight_dequantizes_as_qwix_does(rule):
    """(q - zp) * scale (qwix) against scale * q - scale * zp (ours): one float32
    rounding of each product and of the difference."""
    w = jax.random.normal(jax.random.key(3), (64, 32), jnp.float32)  # nnx [in, out]
    how = qwix._src.core.dot_general.get_how_to_quantize(
        dimension_numbers=(((1,), (0,)), ((), ())), ndims=(2, 2), for_lhs=False,
        tile_size=rule.get("tile_size"), qtype=rule["weight_qtype"],
        calibration_method=rule.get("weight_calibration_method", "absmax"))
    qa = qarray.quantize(w, how)
    kernel = xq.from_qarray(qa, 0)
    theirs = np.asarray(qarray.dequantize(qa), np.float64).T  # [out, in]
    ours = np.asarray(kernel.weight.dequantize(), np.float64)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=4 * 2.0 ** -24 * scale)
    assert kernel.weight.packed == (kernel.weight.bits == 4)


def test_layer_matches_float64_reference():
    x = _x((5, 64))
    ours, _ = _both(dict(weight_qtype=jnp.int4, tile_size=16), x,
                    model=lambda rngs: nnx.Linear(64, 32, use_bias=False, rngs=rngs))
    qw = ours.kernel.array.weight
    ref.assert_close(ours(x), x, np.asarray(qw.w), np.asarray(qw.scale), None, qw.block_size)


def test_w8a8_agrees_within_the_two_activation_grids():
    """One layer: |ours - qwix| <= sum_k |w_k| (s_ours + s_qwix) / 2 per token, the two
    per-token activation steps (absmax/127 and absmax/127.5), plus float32 sums."""
    x = _x((6, 64))
    ours, theirs = _both(dict(weight_qtype=jnp.int8, act_qtype=jnp.int8), x,
                         model=lambda rngs: nnx.Linear(64, 32, use_bias=False, rngs=rngs))
    assert isinstance(ours.kernel.array, xq.KernelWeight)
    assert ours.kernel.array.quantize_activation
    w = np.asarray(ours.kernel.array.weight.dequantize(), np.float64)  # [out, in]
    absmax = np.abs(np.asarray(x, np.float64)).max(axis=1, keepdims=True)
    steps = (absmax / 127 + absmax / 127.5) / 2
    bound = steps * np.abs(w).sum(axis=1)[None, :] + 64 * 2.0 ** -23 * (
        np.abs(np.asarray(x, np.float64)) @ np.abs(w).T)
    diff = np.abs(np.asarray(ours(x), np.float64) - np.asarray(theirs(x), np.float64))
    assert np.all(diff <= bound)
    assert diff.max() > 0  # the grids differ, and the bound is what covers it


@pytest.mark.parametrize("rule", [dict(weight_qtype=jnp.float8_e4m3fn),
                                  dict(weight_qtype=jnp.int8, act_qtype=jnp.int8,
                                       act_static_scale=True)], ids=str)
def test_other_rules_fall_back_to_qwix_bit_for_bit(rule):
    x = _x()
    ours, theirs = _both(rule, x)
    assert not isinstance(ours.up.kernel.array, xq.KernelWeight)
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(theirs(x)))


def test_rules_select_modules_and_unmatched_stay_float():
    x = _x()
    rules = [qwix.QuantizationRule(module_path="up", weight_qtype=jnp.int4)]
    model = qwix.quantize_model(Model(nnx.Rngs(0)), xq.PtqProvider(rules), x)
    assert isinstance(model.up.kernel.array, xq.KernelWeight)
    assert not hasattr(model.down.kernel, "array")  # float, untouched
    float_model = Model(nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model.down.kernel[...]),
                                  np.asarray(float_model.down.kernel[...]))


def test_supported_qwix_version_is_the_installed_one():
    import importlib.metadata
    assert importlib.metadata.version("qwix") in xq.SUPPORTED_QWIX


def test_docs_flax_examples_run_as_written():
    """docs/flax.md's code blocks, in order, as a user pastes them."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "flax.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    namespace = {}
    exec(compile(blocks[0], "flax.md", "exec"), namespace)
    from xla_qops.nnx import QuantizedLinear
    assert isinstance(namespace["model"].up, QuantizedLinear)
    # The split-once jitted step computes what the quantized model computes eagerly, up
    # to float32 ulps (XLA fuses the jitted gelu differently from eager op-by-op; the
    # difference passes through a 512-term dot): 2**-16 of the output's scale.
    eager = np.asarray(namespace["model"](namespace["x"]), np.float32)
    y = np.asarray(namespace["y"], np.float32)
    np.testing.assert_allclose(y, eager, rtol=0, atol=2.0 ** -16 * np.abs(eager).max())
    exec(compile(blocks[1], "flax.md", "exec"), namespace)
    assert isinstance(namespace["qmodel"].up.kernel.array, xq.KernelWeight)
    assert namespace["y"].shape == (4, 256)
