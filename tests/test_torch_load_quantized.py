"""Whole quantized checkpoints into a model in one call (torch_bridge.load_quantized,
xla_qops.checkpoint.load_quantized).

A tiny transformers Llama is quantized here, written as a compressed-tensors
checkpoint (and as GPTQ) from the formats' published layouts -- the
compressed-tensors tensors by our exporter, which tests/test_interop.py
checks against compressed-tensors' own decompressor -- with a config.json,
then loaded into a freshly initialised model. Its logits must equal, bit for
bit, those of the original model with the same `QuantizedWeight`s swapped in
by hand, and be close to the fake-quantized float model.
"""

import copy
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import numpy_reference as ref
import torch_bridge
import xla_qops
from xla_qops import checkpoint, interop
from cases import pack_words
from conftest import recorded_cpu_matmuls

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_llama(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def linears(model):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"]


def quantize_layers(model):
    """path -> (QuantizedWeight, quantize_activation): attention W4A16 g32 asym-free
    (symmetric), MLP W8A8 per-channel."""
    out = {}
    for name, m in linears(model):
        w = m.weight.detach().numpy()
        if name.rsplit(".", 1)[-1] in ATTENTION:
            out[name] = (xla_qops.quantize_weight(w, bits=4, block_size=32), False)
        else:
            out[name] = (xla_qops.quantize_weight(w, bits=8), True)
    return out


def write_compressed_tensors(model, quantized, directory):
    tensors = {}
    for name, (qw, qa) in quantized.items():
        if qw.bits == 4:
            layer = interop.to_compressed_tensors(qw)
            tensors.update({f"{name}.{k}": v for k, v in layer.tensors.items()})
        else:  # int-quantized W8A8: the int8 weight as is, scale [out, 1]
            tensors[f"{name}.weight"] = np.asarray(qw.w)
            tensors[f"{name}.weight_scale"] = np.asarray(qw.scale).reshape(-1, 1)
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in quantized:
            tensors[name] = t.numpy()
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "mixed-precision",
        "ignore": ["lm_head"],
        "config_groups": {
            "attention": {"targets": ["re:.*self_attn\\.[qkvo]_proj$"], "format": "pack-quantized",
                          "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                      "strategy": "group", "group_size": 32}},
            "mlp": {"targets": ["re:.*mlp\\..*_proj$"], "format": "int-quantized",
                    "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                          "strategy": "token", "dynamic": True}}}}}
    (directory / "config.json").write_text(json.dumps(config))


def swapped_by_hand(model, quantized):
    model = copy.deepcopy(model)
    for name, (qw, qa) in quantized.items():
        parent, _, attr = name.rpartition(".")
        module = torch_bridge.XlaQuantizedLinear(qw.in_features, qw.out_features,
                                                 is_symmetric=qw.zero_point is None,
                                                 block_size=qw.block_size,
                                                 int4_weight=qw.bits == 4,
                                                 quantize_activation=qa)
        module.load_quantized_weight(qw)
        setattr(model.get_submodule(parent), attr, module)
    return model


def fake_quantized(model, quantized):
    """float Linears holding the dequantized weights; the W8A8 ones quantize
    their inputs as API.md says (numpy_reference.quantize_activation) first."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, (qw, qa) in quantized.items():
            linear = model.get_submodule(name)
            linear.weight.copy_(torch.from_numpy(np.asarray(qw.dequantize())))
            if qa:
                linear.register_forward_pre_hook(
                    lambda module, args, block=qw.block_size: (_quantize_dequantize(args[0], block),))
    return model


def _quantize_dequantize(x, block_size):
    x2 = x.reshape(-1, x.shape[-1]).numpy()
    q, s = ref.quantize_activation(x2, block_size)
    x_hat = q * np.repeat(s, x2.shape[1] // s.shape[1], axis=1)
    return torch.from_numpy(x_hat.astype(np.float32)).reshape(x.shape)


IDS = torch.tensor([[3, 17, 99, 42, 5, 64, 120, 7]])


@pytest.fixture(scope="module")
def compressed_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ct")
    source = tiny_llama(0)
    quantized = quantize_layers(source)
    write_compressed_tensors(source, quantized, directory)
    return directory, source, quantized


def test_load_compressed_tensors_model(compressed_checkpoint):
    directory, source, quantized = compressed_checkpoint
    model = tiny_llama(1)  # other weights: everything must come from the checkpoint
    report = torch_bridge.load_quantized(model, directory)
    assert report.format == "compressed-tensors" and report.loaded > 0
    assert len(report.swapped) == 14
    assert {report.swapped[n] for n in report.swapped if "mlp" in n} == {"w8a8"}
    assert {report.swapped[n] for n in report.swapped if "self_attn" in n} == {"w4a16"}
    assert "swapped 14 linear layers (8 w4a16, 6 w8a8)" in str(report)
    with torch.no_grad(), recorded_cpu_matmuls() as calls:
        logits = model(IDS).logits
    with torch.no_grad():
        expected = swapped_by_hand(source, quantized)(IDS).logits
        fake_logits = fake_quantized(source, quantized)(IDS).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    # Each of the 14 layers against the float64 reference, on the inputs it got.
    assert len(calls) == 14
    for y, *args in calls:
        ref.assert_close(y, *args)
    # Against the fake-quantized float model (dequantized weights, W8A8's
    # activations quantized the same way): the layers differ only by float32
    # summation order, ~1e-7 of the logits (measured 3e-7 of the largest).
    # That difference can move an activation lying on a .5 tie to the other
    # int8 neighbour in a later W8A8 layer, which moves the logits by up to
    # 1.5e-3 of the largest (measured, one flip in each of the 6 W8A8 layers):
    # 5e-3 allows three such flips, down from 5% (the fake model then lacked
    # W8A8's activation rounding, a 3e-3 difference this bound alone would not
    # notice: the per-layer check above is the exact one).
    assert (logits - fake_logits).abs().max() < 5e-3 * fake_logits.abs().max()


def test_load_into_jax_weights(compressed_checkpoint):
    directory, _, quantized = compressed_checkpoint
    ckpt = checkpoint.load_quantized(directory)
    assert ckpt.metadata == {"format": "compressed-tensors"}
    assert set(ckpt.weights) == set(quantized)
    for name, (qw, qa) in quantized.items():
        np.testing.assert_array_equal(np.asarray(ckpt.weights[name].dequantize()),
                                      np.asarray(qw.dequantize()))
        assert ckpt.schemes[name].quantize_activation == qa
    assert "model.norm.weight" in ckpt.tensors and "lm_head.weight" in ckpt.tensors


def test_mismatches_are_listed_together_and_nothing_loads(compressed_checkpoint, tmp_path):
    directory, _, _ = compressed_checkpoint
    from safetensors.numpy import load_file
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["model.norm.weight"]
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :32].copy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    model = tiny_llama(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(torch_bridge.CheckpointMismatch) as info:
        torch_bridge.load_quantized(model, tmp_path)
    message = str(info.value)
    assert "3 problem(s), nothing loaded" in message
    assert "model.norm.weight: missing from the checkpoint" in message
    assert "model.extra.weight: in the checkpoint, not in the model" in message
    assert "lm_head.weight: the checkpoint has shape [128, 32], the model [128, 64]" in message
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, torch_bridge.XlaQuantizedLinear) for m in model.modules())


def test_load_gptq_model(tmp_path):
    """A GPTQ checkpoint (qweight/qzeros/scales packed from the published
    layout, config.json with quant_method gptq): the model's logits equal the
    source model with `from_gptq`'s weights swapped in by hand."""
    source = tiny_llama(3)
    rng = np.random.default_rng(0)
    tensors, quantized = {}, {}
    for name, m in linears(source):
        k, n = m.in_features, m.out_features
        codes = rng.integers(0, 16, (k, n))
        zeros = rng.integers(0, 16, (k // 32, n))
        scales = rng.uniform(0.001, 0.02, (k // 32, n)).astype(np.float16)
        layer = dict(qweight=pack_words(codes, 4, 0).view(np.int32),
                     qzeros=pack_words((zeros - 1) % 16, 4, 1).view(np.int32), scales=scales)
        tensors.update({f"{name}.{part}": a for part, a in layer.items()})
        quantized[name] = (interop.from_gptq(**layer, bits=4), False)
    for name, t in source.state_dict().items():
        if name.rsplit(".", 1)[0] not in quantized:
            tensors[name] = t.numpy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
        "sym": False, "checkpoint_format": "gptq"}}))
    model = tiny_llama(4)
    report = torch_bridge.load_quantized(model, tmp_path)
    assert report.format == "gptq" and set(report.swapped.values()) == {"w4a16"}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits,
                                   swapped_by_hand(source, quantized)(IDS).logits, rtol=0, atol=0)
    # Without the config the format and bits come from the tensors.
    (tmp_path / "config.json").unlink()
    assert interop.read_checkpoint(tmp_path).format == "gptq"


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="source: .* is neither a directory nor a file"):
        torch_bridge.load_quantized(tiny_llama(5), tmp_path / "nope")
    save_file({"model.norm.weight": np.ones(64, np.float32)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="no config.json quantization_config and no GPTQ/AWQ"):
        torch_bridge.load_quantized(tiny_llama(5), tmp_path)
    with pytest.raises(ValueError, match="format: expected one of gptq, awq, compressed-tensors"):
        interop.read_checkpoint(tmp_path, format="exl2")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got dict"):
        torch_bridge.load_quantized({}, tmp_path)
