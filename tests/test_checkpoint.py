"""xla_qops.checkpoint: safetensors round trips, metadata, one error listing every mismatch."""

import json
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import xla_qops
from xla_qops import checkpoint
import numpy_reference as ref

RNG = np.random.default_rng(7)


def _weights():
    w1 = RNG.standard_normal((32, 64)).astype(np.float32)
    w2 = RNG.standard_normal((16, 32)).astype(np.float32)
    return {
        "enc.q": xla_qops.quantize_weight(jnp.asarray(w1), bits=4, block_size=32,
                                          symmetric=False),
        "enc.o": xla_qops.quantize_weight(jnp.asarray(w2), bits=8),
    }


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_round_trip_bit_exact(tmp_path):
    weights = _weights()
    bias = RNG.standard_normal(32).astype(np.float32)
    norm = np.ones(16, ml_dtypes.bfloat16)
    path = tmp_path / "m.safetensors"
    checkpoint.save_quantized(path, weights, {"enc.q.bias": bias, "norm.weight": norm},
                              quantize_activation={"enc.o": True})
    # A plain safetensors file (JSON header, raw buffers): no pickle anywhere.
    header = _header(path)
    schemes = json.loads(header["__metadata__"][checkpoint.SCHEMES_KEY])
    assert schemes["enc.q"]["scheme"] == "w4a16" and schemes["enc.q"]["block_size"] == 32
    assert schemes["enc.q"]["packed"] and not schemes["enc.q"]["symmetric"]
    assert schemes["enc.o"]["scheme"] == "w8a8" and schemes["enc.o"]["symmetric"]
    assert header["enc.q.weight"]["dtype"] == "U8" and header["enc.o.weight"]["dtype"] == "I8"
    assert "enc.o.zero_point" not in header and "enc.q.zero_point" in header

    loaded = checkpoint.load_quantized(path)
    assert set(loaded.weights) == {"enc.q", "enc.o"}
    assert loaded.schemes["enc.o"].quantize_activation
    for name, qw in weights.items():
        got = loaded.weights[name]
        assert (got.bits, got.block_size, got.packed) == (qw.bits, qw.block_size, qw.packed)
        np.testing.assert_array_equal(np.asarray(got.w), np.asarray(qw.w))
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(qw.scale))
        if qw.zero_point is None:
            assert got.zero_point is None
        else:
            np.testing.assert_array_equal(np.asarray(got.zero_point), np.asarray(qw.zero_point))
    np.testing.assert_array_equal(loaded.tensors["enc.q.bias"], bias)
    assert loaded.tensors["norm.weight"].dtype == ml_dtypes.bfloat16
    # and the loaded weight computes
    qw = loaded.weights["enc.q"]
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    ref.assert_close(np.asarray(xla_qops.quantized_matmul(jnp.asarray(x), qw)), x,
                     np.asarray(qw.w), np.asarray(qw.scale), np.asarray(qw.zero_point), 32)


def test_wrong_tensors_one_error_listing_all(tmp_path):
    scheme = checkpoint.LayerScheme(bits=4, block_size=32, packed=True, symmetric=False,
                                    quantize_activation=False, in_features=64, out_features=16)
    meta = {checkpoint.SCHEMES_KEY: json.dumps({"lin": scheme.to_json()}), "format": "pt"}
    bad = {
        "lin.weight": np.zeros((2, 32, 16), np.int8),        # unpacked dtype and shape
        "lin.weight_scaler": np.ones((2, 8), np.float32),    # wrong out features
        "lin.bias": np.zeros(15, np.float32),                # wrong length
        # lin.zero_point missing
    }
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path), metadata=meta)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_quantized(path)
    err = info.value
    assert len(err.problems) == 4, err.problems
    msg = str(err)
    assert "lin.weight: expected uint8 [2, 16, 16] (w4a16, block_size=32), got int8 [2, 32, 16]" in msg
    assert "lin.weight_scaler: expected float32 [2, 16]" in msg and "got float32 [2, 8]" in msg
    assert "lin.zero_point: missing" in msg
    assert "lin.bias: expected shape [16]" in msg


def test_expected_state_dict_mismatches(tmp_path):
    path = tmp_path / "m.safetensors"
    weights = _weights()
    checkpoint.save_quantized(path, weights, {"head.weight": np.zeros((4, 16), np.float32)})
    tensors, _, _ = checkpoint.load_state_dict(path)
    expected = {k: v for k, v in tensors.items() if k != "head.weight"}
    expected["enc.o.weight"] = (tuple(tensors["enc.o.weight"].shape), "uint8")
    expected["extra.bias"] = ((3,), "float32")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_state_dict(path, expected)
    problems = info.value.problems
    assert any(p.startswith("enc.o.weight: expected uint8") for p in problems)
    assert any(p.startswith("extra.bias: missing") for p in problems)
    assert any(p.startswith("head.weight: unexpected") for p in problems)
    assert len(problems) == 3


def test_save_rejects_inconsistent_state(tmp_path):
    scheme = checkpoint.LayerScheme(bits=8, block_size=-1, packed=False, symmetric=True,
                                    quantize_activation=False, in_features=8, out_features=4)
    with pytest.raises(checkpoint.CheckpointError, match=r"lin.weight: expected int8 \[4, 8\]"):
        checkpoint.save_state_dict(tmp_path / "x.safetensors",
                                   {"lin.weight": np.zeros((8, 4), np.int8),
                                    "lin.weight_scaler": np.ones(4, np.float32)}, {"lin": scheme})
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        checkpoint.load_quantized(tmp_path / "missing.safetensors")


@pytest.mark.torch
def test_loads_into_module_swapped_torch_model(tmp_path):
    torch = pytest.importorskip("torch")
    torch_bridge = pytest.importorskip("torch_bridge")
    from torch_bridge import checkpoint as torch_checkpoint
    torch.manual_seed(0)

    def model():
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 16, bias=False))

    source = model()
    torch_bridge.quantize_model(source, scheme="w4a16", block_size=32, symmetric=False)
    path = tmp_path / "t.safetensors"
    torch_checkpoint.save_torch(source, path)
    schemes = checkpoint.read_schemes(_header(path)["__metadata__"])
    assert {s.scheme for s in schemes.values()} == {"w4a16"}

    target = torch_bridge.quantize_model(model(), scheme="w4a16", block_size=32, symmetric=False)
    state, _ = torch_checkpoint.load_torch(path, target)
    target.load_state_dict(state, strict=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)

    wrong = torch_bridge.quantize_model(model(), scheme="w8a16", block_size=-1, symmetric=True)
    with pytest.raises(checkpoint.CheckpointError) as info:
        torch_checkpoint.load_torch(path, wrong)
    names = {p.split(":")[0] for p in info.value.problems}
    assert {"0.weight", "0.weight_scaler", "0.zero_point", "2.weight"} <= names


# ------------------------------------------- float element formats (API.md section 7)

def _float_weights():
    w1 = RNG.standard_normal((32, 64)).astype(np.float32)
    w2 = RNG.standard_normal((16, 32)).astype(np.float32)
    w3 = RNG.standard_normal((16, 64)).astype(np.float32)
    return {"fp8": xla_qops.quantize_weight(w1, format="fp8", block_size=32),
            "nv": xla_qops.quantize_weight(w2, format="nvfp4"),
            "mx": xla_qops.quantize_weight(w3, format="mxfp4")}


def test_float_formats_round_trip_bit_exact(tmp_path):
    weights = _float_weights()
    path = tmp_path / "f.safetensors"
    checkpoint.save_quantized(path, weights, quantize_activation={"fp8": True, "mx": True},
                              activation_format={"mx": "int8"})
    header = _header(path)
    assert header["fp8.weight"]["dtype"] == "F8_E4M3" and header["nv.weight"]["dtype"] == "U8"
    assert not any(name.endswith(".zero_point") for name in header)
    schemes = json.loads(header["__metadata__"][checkpoint.SCHEMES_KEY])
    assert schemes["fp8"]["weight_format"] == "fp8" and schemes["fp8"]["scheme"] == "w8a8-fp8"
    assert schemes["nv"]["scheme"] == "w4a16-fp4" and schemes["nv"]["block_size"] == 16
    assert schemes["mx"]["scheme"] == "w4a8-fp4/int8"

    loaded = checkpoint.load_quantized(path)
    assert loaded.schemes["fp8"].activation_format == "fp8"
    assert loaded.schemes["mx"].activation_format == "int8"
    assert loaded.schemes["nv"].activation_format is None
    for name, qw in weights.items():
        got = loaded.weights[name]
        assert (got.format, got.bits, got.block_size, got.packed, got.zero_point) == (
            qw.format, qw.bits, qw.block_size, qw.packed, None)
        assert np.asarray(got.w).dtype == np.asarray(qw.w).dtype
        np.testing.assert_array_equal(np.asarray(got.w).view(np.uint8),
                                      np.asarray(qw.w).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(qw.scale))
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(xla_qops.quantized_matmul(jnp.asarray(x), loaded.weights["fp8"], impl="xla")),
        np.asarray(xla_qops.quantized_matmul(jnp.asarray(x), weights["fp8"], impl="xla")))


def test_float_format_mismatches_listed(tmp_path):
    scheme = checkpoint.LayerScheme(bits=8, block_size=-1, packed=False, symmetric=True,
                                    quantize_activation=False, in_features=8, out_features=4,
                                    weight_format="fp8")
    meta = {checkpoint.SCHEMES_KEY: json.dumps({"lin": scheme.to_json()}), "format": "pt"}
    path = tmp_path / "bad.safetensors"
    save_file({"lin.weight": np.zeros((4, 8), np.int8),          # int8, not float8_e4m3fn
               "lin.weight_scaler": np.ones(4, np.float32),
               "lin.zero_point": np.zeros(4, np.float32)}, str(path), metadata=meta)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_quantized(path)
    msg = str(info.value)
    assert "lin.weight: expected float8_e4m3fn [4, 8] (w8a16-fp8, block_size=-1), got int8" in msg
    assert "lin.zero_point: unexpected: weight_format='fp8' is symmetric" in msg


def test_layer_scheme_defaults_read_old_files():
    old = {"bits": 4, "block_size": 32, "packed": True, "symmetric": True,
           "quantize_activation": True, "in_features": 64, "out_features": 16,
           "scale_dtype": "float32", "scheme": "w4a8"}
    s = checkpoint.LayerScheme.from_json(old)
    assert (s.weight_format, s.activation_format, s.scheme) == ("int4", "int8", "w4a8")
    with pytest.raises(ValueError, match="weight_format: expected None or one of 'int8', 'int4', "
                                         "'fp8', 'fp4', got 'fp6'"):
        checkpoint.LayerScheme.from_json(dict(old, weight_format="fp6"))
