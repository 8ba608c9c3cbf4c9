"""The Hadamard rotation on the JAX face: `xla_qops.nnx.QuantizedLinear(input_rotation=b)`,
`xla_qops.nnx.quantize_model(..., smoothing="hadamard")`, its checkpoints, and rotated
torch checkpoints run by the NNX Llama decoder (xla_qops_app/jax_llama.py).

The reference is API.md's convention in float64 numpy on the rotated input: y = (x H)
W_q^T, H block-diagonal of normalised Sylvester Hadamard blocks
(`numpy_reference.hadamard_rotation`, from the matrix's definition, not the code's
construction).
"""

import flax.nnx as nnx
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from xla_qops import QuantizedWeight, checkpoint, quantize_weight
from xla_qops import nnx as qnnx
from xla_qops.quantizers import rotation


def _reference(x, qw: QuantizedWeight, block, quantize_activation=False):
    rotated = np.asarray(x, np.float64) @ ref.hadamard_rotation(block, x.shape[-1])
    return ref.quantized_matmul(rotated, np.asarray(qw.w), np.asarray(qw.scale),
                                None if qw.zero_point is None else np.asarray(qw.zero_point),
                                qw.block_size, qw.bits == 4, quantize_activation)


class MLP(nnx.Module):
    """Two Linears; the first one's inputs carry a few large channels (outliers)."""

    def __init__(self, rngs, features=128, hidden=256):
        self.up = nnx.Linear(features, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, features, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def _inputs(n=64, features=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    x[:, [3, 40, 77]] *= 40.0  # outlier channels, as LayerNorm outputs have
    return jnp.asarray(x)


def _cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("bits, block_size, quantize_activation, block", [
    (8, -1, False, 64), (4, 32, False, 16), (8, -1, True, 64), (4, 64, True, 32)])
def test_layer_is_the_float64_convention_on_the_rotated_input(bits, block_size,
                                                              quantize_activation, block):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 128)).astype(np.float32)
    qw = quantize_weight(jnp.asarray(w), bits=bits, block_size=block_size)
    layer = qnnx.QuantizedLinear.from_quantized(qw, quantize_activation=quantize_activation,
                                                input_rotation=block)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    got = np.asarray(layer(jnp.asarray(x)))
    want = _reference(x, qw, block, quantize_activation)
    # A16: x H rounded once to float32 (2^-24 relative) then float32 sums over 128
    # terms; 1e-5 of the largest output covers both. A8: that rounding can move one
    # input across an int8 step (1/127 of the token's absmax) times one weight: 3e-3.
    tol = 1e-5 if not quantize_activation else 3e-3
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    unrotated = ref.quantized_matmul(x.astype(np.float64), np.asarray(qw.w),
                                     np.asarray(qw.scale), None, qw.block_size, bits == 4,
                                     quantize_activation)
    assert np.abs(got - unrotated).max() > 0.1 * np.abs(want).max()  # it did rotate


def test_rotated_rtn_keeps_the_outliers_and_matches_the_torch_face():
    import torch
    from torch_bridge import quantize_model as torch_quantize_model

    x = _inputs()
    model = MLP(nnx.Rngs(0))
    float_out = np.asarray(model(x))
    weights = {n: (np.asarray(getattr(model, n).kernel[...]).T.copy(),
                   np.asarray(getattr(model, n).bias[...]).copy()) for n in ("up", "down")}
    plain = qnnx.quantize_model(nnx.clone(model), scheme="w8a8")
    rotated = qnnx.quantize_model(model, scheme="w8a8", smoothing="hadamard")
    report = qnnx.quantization_report(rotated)
    assert report.rotations == {"up": "Hadamard rotation, blocks of 64",
                                "down": "Hadamard rotation, blocks of 64"}
    assert rotated.up.input_rotation == 64 and plain.up.input_rotation is None
    got = np.asarray(rotated(x))
    # W8A8 with per-token scales set by 40x outliers in 3 of 128 channels: rotating
    # spreads them (measured: half the error; the second layer's inputs have none).
    assert 1 - _cosine(got, float_out) < 0.75 * (1 - _cosine(plain(x), float_out))

    # The torch face on the same float weights gives the same quantized layers.
    torch_model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(),
                                      torch.nn.Linear(256, 128))
    with torch.no_grad():
        for i, n in ((0, "up"), (2, "down")):
            torch_model[i].weight.copy_(torch.from_numpy(weights[n][0]))
            torch_model[i].bias.copy_(torch.from_numpy(weights[n][1]))
    torch_quantize_model(torch_model, scheme="w8a8", smoothing="hadamard")
    for i, n in ((0, "up"), (2, "down")):
        qw = getattr(rotated, n).quantized_weight
        np.testing.assert_array_equal(torch_model[i].weight.numpy(), np.asarray(qw.w))
        np.testing.assert_array_equal(torch_model[i].weight_scaler.numpy(),
                                      np.asarray(qw.scale))
        assert int(torch_model[i].input_rotation) == getattr(rotated, n).input_rotation
    with torch.no_grad():
        torch_out = torch_model(torch.from_numpy(np.array(x))).numpy()
    # Same weights, same rotation; the two faces' float32 rotations and activation
    # roundings may differ by one int8 step in a few inputs: 3e-3 of the largest output.
    np.testing.assert_allclose(got, torch_out, rtol=0, atol=3e-3 * np.abs(got).max())


def test_rotated_gptq_fits_the_rotated_problem():
    x = _inputs(seed=2)
    held_out = _inputs(seed=3)
    model = MLP(nnx.Rngs(1))
    float_out = np.asarray(model(held_out))
    calibration = [x[i:i + 16] for i in range(0, 64, 16)]
    rtn = qnnx.quantize_model(nnx.clone(model), scheme="w4a16", block_size=32,
                              smoothing="hadamard")
    gptq = qnnx.quantize_model(model, scheme="w4a16", block_size=32, method="gptq",
                               calibration=calibration, smoothing="hadamard")
    report = qnnx.quantization_report(gptq)
    assert set(report.rotations) == {"up", "down"}
    assert report.methods["up"].startswith("gptq")
    assert gptq.down.input_rotation == 64
    # GPTQ on the rotated statistics beats round-to-nearest of the rotated weight on
    # inputs it never saw.
    assert _cosine(gptq(held_out), float_out) > _cosine(rtn(held_out), float_out)


def test_save_and_load_keep_the_rotation(tmp_path):
    x = _inputs()
    model = qnnx.quantize_model(MLP(nnx.Rngs(0)), scheme="w4a16", block_size=32,
                                smoothing="hadamard")
    path = str(tmp_path / "rotated.safetensors")
    qnnx.save_quantized(model, path)
    loaded_file = checkpoint.load_quantized(path)
    assert loaded_file.tensors["up.input_rotation"].shape == ()  # a scalar, as torch's buffer
    assert int(loaded_file.tensors["up.input_rotation"]) == 64
    target = qnnx.quantize_model(MLP(nnx.Rngs(5)), scheme="w4a16", block_size=32,
                                 smoothing="hadamard")
    qnnx.load_quantized(target, path)
    np.testing.assert_array_equal(np.asarray(target(x)), np.asarray(model(x)))

    unrotated = qnnx.quantize_model(MLP(nnx.Rngs(5)), scheme="w4a16", block_size=32)
    with pytest.raises(checkpoint.CheckpointError, match="up.input_rotation: unexpected"):
        qnnx.load_quantized(unrotated, path)
    other = qnnx.quantize_model(MLP(nnx.Rngs(5)), scheme="w4a16", block_size=32,
                                smoothing="hadamard")
    other.up.input_rotation = 32
    with pytest.raises(checkpoint.CheckpointError,
                       match="up.input_rotation: the model rotates by blocks of 32, the "
                             "file says 64"):
        qnnx.load_quantized(other, path)


def test_torch_rotated_llama_checkpoint_runs_in_the_nnx_decoder(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch_bridge
    from torch_bridge.checkpoint import save_torch
    from xla_qops_app import jax_llama

    config = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
                  tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    torch_bridge.quantize_model(hf, scheme="w8a16", smoothing="hadamard")
    assert int(hf.model.layers[0].mlp.down_proj.input_rotation) == 64
    path = str(tmp_path / "model.safetensors")
    save_torch(hf, path)
    model = jax_llama.load(path, config=config, dtype=jnp.float32)
    fused = model.layers[0].self_attn.qkv_proj  # q/k/v share their rotation: still fused
    assert fused is not None and fused.input_rotation == 64
    assert model.layers[1].mlp.down_proj.input_rotation == 64
    ids = np.random.default_rng(1).integers(0, 256, (2, 7))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits[:, -1].numpy()
    got = jax_llama.Generator(model).logits(ids)
    # The same quantized weights and rotations; float32 arithmetic in both, summed in
    # other orders (attention, the rotation): 1e-4 of the largest logit.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())

    # Saved again from the NNX decoder (q/k/v and gate/up split back, each with the
    # fused layer's rotation), it loads to the same logits.
    weights, transforms = jax_llama.quantized_weights(model), jax_llama.input_transforms(model)
    assert len(transforms) == len(weights) and all(int(b) == 64 for b in transforms.values())
    rest = {k: v.numpy() for k, v in hf.state_dict().items()
            if k.rsplit(".", 1)[0] not in weights}
    again = str(tmp_path / "again.safetensors")
    checkpoint.save_quantized(again, weights, {**rest, **transforms})
    reloaded = jax_llama.load(again, config=config, dtype=jnp.float32)
    np.testing.assert_array_equal(jax_llama.Generator(reloaded).logits(ids), got)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(scheme="w8a8", smoothing="smoothquant"), ValueError,
     "smoothing: expected None or 'hadamard' \\(SmoothQuant is torch_bridge"),
    (dict(scheme="w8a8-fp8", smoothing="hadamard"), ValueError,
     "smoothing: 'hadamard' is for the integer schemes"),
    (dict(scheme="w4a16", block_size=32, method="autoround", calibration=[np.zeros((2, 128))],
          smoothing="hadamard"), ValueError, "method: smoothing='hadamard' takes one of"),
])
def test_bad_smoothing_arguments_are_named(kwargs, error, match):
    model = MLP(nnx.Rngs(0))
    with pytest.raises(error, match=match):
        qnnx.quantize_model(model, **kwargs)
    assert isinstance(model.up, nnx.Linear)  # nothing was swapped


@pytest.mark.parametrize("block, error, match", [
    (3, ValueError, "block: expected a power of two >= 2 dividing in_features=128, got 3"),
    (256, ValueError, "dividing in_features=128, got 256"),
    (2.0, TypeError, "block: expected an int, got float")])
def test_bad_input_rotation_is_named(block, error, match):
    qw = quantize_weight(jnp.ones((8, 128)), bits=8)
    with pytest.raises(error, match=match):
        qnnx.QuantizedLinear.from_quantized(qw, input_rotation=block)


def test_rotation_module_is_its_definition():
    for block in (2, 16, 64):
        np.testing.assert_array_equal(rotation.hadamard(block), ref.hadamard_rotation(block, block))
    assert rotation.block_for(384) == 64 and rotation.block_for(96) == 32
    assert rotation.block_for(7) == 1
