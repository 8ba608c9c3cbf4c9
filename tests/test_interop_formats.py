"""Float-format checkpoints (issue F section 3): fp8 and fp4 weights in and out.

Every import is compared bit for bit with the producing library's own
dequantization where it runs here (compressed-tensors' compressors and
decompressors in .venv, gguf-py's `dequantize` in both environments), and
otherwise with a float64 statement of the format's published formula
(DeepSeek-V3's ``weight_dequant``, ModelOpt's ``NVFP4QTensor.dequantize``),
rounded once to float32. Imported weights must hold the checkpoint's
storage (fp8 bytes, e2m1 codes), never a dequantized copy. Tests that need
torch (compressed-tensors, torch float8 tensors) are marked ``torch``.
"""

import json

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import xla_qops
from xla_qops import interop
from xla_qops.interop import floats

FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
RNG = np.random.default_rng(2024)
E2M1_F64 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


@pytest.fixture
def torch():
    import torch
    return torch


def _fp8(shape):
    """Random finite e4m3fn values (no NaN codes), both signs, zeros included."""
    bits = RNG.integers(0, 256, shape, dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0  # NaN -> 0
    return bits.view(FP8)


def _codes(shape):
    return RNG.integers(0, 16, shape, dtype=np.uint8)


def _pairs(codes):
    """e2m1 codes [N, K] -> uint8 [N, K/2], the even index in the low nibble (by hand)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _dequantized(qw):
    return np.array(qw.dequantize(jnp.float32))  # writable (torch.from_numpy)


def _assert_bits(qw, expected_f32):
    """qw.dequantize() equals `expected_f32` [out, in] bit for bit (the sign of zero too)."""
    ours = _dequantized(qw)
    expected = np.asarray(expected_f32, np.float32)
    assert ours.shape == expected.shape
    bad = ours.view(np.uint32) != expected.view(np.uint32)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} differ; e.g. ours {ours[bad][:4]} "
                           f"expected {expected[bad][:4]}")


def _stored_fp8(qw):
    """An fp8 weight's values as [out, in], read off its storage."""
    w = np.asarray(qw.w)
    assert w.dtype == FP8
    return w.reshape(qw.in_features, qw.out_features).T if qw.blockwise else w


def _stored_codes(qw):
    values, _ = interop.compressed_tensors.stored_values(qw)
    return values


def _by_block(scale_nb, block):
    """[N, K/block] -> [N, K]."""
    return np.repeat(scale_nb, block, axis=1)


# ------------------------------------------------------------- native fp8 (DeepSeek-V3)

def _deepseek_weight_dequant(x, s, block=128):
    """DeepSeek-V3 inference/kernel.py `weight_dequant` in float64: y = x * s[i//B, j//B]
    (x widened to float32 -- exact -- times the float32 block scale, one rounding)."""
    n, k = x.shape
    s64 = np.asarray(s, np.float32).astype(np.float64)
    full = np.repeat(np.repeat(s64, block, axis=0), block, axis=1)[:n, :k]
    return (x.astype(np.float64) * full).astype(np.float32)


@pytest.mark.parametrize("n,k,scale_dtype", [(256, 256, np.float32), (200, 384, np.float32),
                                             (72, 128, BF16), (130, 512, np.float16)])
def test_fp8_blocks_match_deepseek_weight_dequant(n, k, scale_dtype):
    x = _fp8((n, k))
    s = RNG.uniform(1e-4, 2e-2, (-(-n // 128), k // 128)).astype(scale_dtype)
    qw = interop.from_fp8_blocks(x, s)
    assert qw.format == "fp8" and qw.zero_point is None
    assert qw.block_size == (-1 if k == 128 else 128)
    np.testing.assert_array_equal(_stored_fp8(qw).view(np.uint8), x.view(np.uint8))
    _assert_bits(qw, _deepseek_weight_dequant(x, s))


def test_fp8_blocks_other_block_and_jax_input():
    n, k = 96, 192
    x = _fp8((n, k))
    s = RNG.uniform(0.5, 2, (2, 3)).astype(np.float32)
    qw = interop.from_fp8_blocks(jnp.asarray(x), jnp.asarray(s), block=(64, 64))
    assert qw.block_size == 64
    full = np.repeat(np.repeat(s.astype(np.float64), 64, 0), 64, 1)[:n]
    _assert_bits(qw, (x.astype(np.float64) * full).astype(np.float32))


def test_fp8_blocks_bad_input():
    x = _fp8((256, 200))
    with pytest.raises(ValueError, match=r"weight_scale_inv: .*in=200 is not a multiple of 128"):
        interop.from_fp8_blocks(x, np.ones((2, 2), np.float32))
    x = _fp8((200, 256))
    with pytest.raises(ValueError, match=r"weight_scale_inv: expected shape \[2, 2\] .*got "
                                         r"\[1, 2\]"):
        interop.from_fp8_blocks(x, np.ones((1, 2), np.float32))
    with pytest.raises(TypeError, match="weight: expected dtype float8_e4m3fn, got float32"):
        interop.from_fp8_blocks(x.astype(np.float32), np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="weight_scale_inv: expected dtype float32 or "
                                        "bfloat16 or float16, got int32"):
        interop.from_fp8_blocks(x, np.ones((2, 2), np.int32))
    nan = x.copy()
    nan.view(np.uint8)[0, 0] = 0x7F
    with pytest.raises(ValueError, match="weight: 1 values are e4m3fn NaN"):
        interop.from_fp8_blocks(nan, np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="weight_scale_inv: 1 scales are not finite"):
        interop.from_fp8_blocks(x, np.array([[1, np.inf], [1, 1]], np.float32))


# ------------------------------------------------------------- compressed-tensors, float

def _ct_fp8_case(strategy, n, k, scale_dtype, group=None, block=None):
    """(tensors, config keywords, float64-stated float32 weight) of a float-quantized layer."""
    w = _fp8((n, k))
    if strategy == "tensor":
        s = RNG.uniform(1e-3, 1e-2, (1,))
        full = np.broadcast_to(s.reshape(1, 1), (n, k))
    elif strategy == "channel":
        s = RNG.uniform(1e-3, 1e-2, (n, 1))
        full = np.broadcast_to(s, (n, k))
    elif strategy == "group":
        s = RNG.uniform(1e-3, 1e-2, (n, k // group))
        full = _by_block(s, group)
    else:
        rows, cols = block
        s = RNG.uniform(1e-3, 1e-2, (-(-n // rows), -(-k // cols)))
        full = np.repeat(np.repeat(s, rows, 0), cols, 1)[:n, :k]
    s = s.astype(scale_dtype)
    full = np.broadcast_to(full, (n, k)).astype(scale_dtype).astype(np.float64)
    kwargs = dict(num_bits=8, strategy=strategy, compression_format="float-quantized")
    if group is not None:
        kwargs["group_size"] = group
    if block is not None:
        kwargs["block_structure"] = list(block)
    expected = (w.astype(np.float64) * full).astype(np.float32)
    return {"weight": w, "weight_scale": s}, kwargs, expected


@pytest.mark.parametrize("strategy,n,k,group,block", [
    ("tensor", 48, 64, None, None), ("channel", 40, 96, None, None),
    ("group", 32, 256, 128, None), ("block", 256, 256, None, (128, 128)),
    ("block", 200, 384, None, (128, 128)),   # out not a multiple of 128
    ("block", 96, 128, None, (32, 64))])
@pytest.mark.parametrize("scale_dtype", [np.float32, BF16, np.float16])
def test_ct_float_quantized_fp8(strategy, n, k, group, block, scale_dtype):
    tensors, kwargs, expected = _ct_fp8_case(strategy, n, k, scale_dtype, group, block)
    tensors["input_scale"] = np.array([0.02], np.float32)  # static: accepted, not used
    qw = interop.from_compressed_tensors(tensors, **kwargs)
    assert qw.format == "fp8" and qw.bits == 8 and not qw.packed and qw.zero_point is None
    expected_block = {"tensor": -1, "channel": -1, "group": group,
                      "block": block[1] if block else None}[strategy]
    assert qw.block_size == (-1 if expected_block == k else expected_block)
    np.testing.assert_array_equal(_stored_fp8(qw).view(np.uint8),
                                  tensors["weight"].view(np.uint8))
    _assert_bits(qw, expected)


def _nvfp4_case(n, k, scale_dtype=FP8):
    codes = _codes((n, k))
    block_scale = RNG.uniform(0.01, 448, (n, k // 16)).astype(np.float32).astype(scale_dtype)
    global_scale = np.array([RNG.uniform(100, 5000)], np.float32)
    # compressed-tensors: scale = weight_scale / global (float32, one rounding), then x * scale.
    scale = (block_scale.astype(np.float64) / global_scale.astype(np.float64)[0]).astype(
        np.float32)
    expected = (E2M1_F64[codes] * _by_block(scale, 16).astype(np.float64)).astype(np.float32)
    tensors = {"weight_packed": _pairs(codes), "weight_scale": block_scale,
               "weight_global_scale": global_scale}
    return tensors, codes, expected


@pytest.mark.parametrize("n,k", [(32, 64), (40, 256)])
def test_ct_nvfp4(n, k):
    tensors, codes, expected = _nvfp4_case(n, k)
    tensors["input_global_scale"] = np.array([3.0], np.float32)
    qw = interop.from_compressed_tensors(tensors, num_bits=4, group_size=16,
                                         strategy="tensor_group",
                                         compression_format="nvfp4-pack-quantized")
    assert qw.format == "fp4" and qw.packed and qw.block_size == 16 and qw.zero_point is None
    assert qw.w.dtype == jnp.uint8 and qw.w.shape == (k // 16, 8, n)
    np.testing.assert_array_equal(_stored_codes(qw), codes)
    _assert_bits(qw, expected)


def test_ct_mxfp4_and_mxfp8():
    n, k = 24, 128
    codes = _codes((n, k))
    e = RNG.integers(110, 135, (n, k // 32)).astype(np.uint8)
    scale = np.exp2(e.astype(np.float64) - 127)
    qw = interop.from_compressed_tensors(
        {"weight_packed": _pairs(codes), "weight_scale": e}, num_bits=4, group_size=32,
        strategy="group", compression_format="mxfp4-pack-quantized")
    assert qw.format == "fp4" and qw.block_size == 32
    _assert_bits(qw, (E2M1_F64[codes] * _by_block(scale, 32)).astype(np.float32))
    np.testing.assert_array_equal(_stored_codes(qw), codes)
    w = _fp8((n, k))
    qw = interop.from_compressed_tensors(
        {"weight": w, "weight_scale": e.view(ml_dtypes.float8_e8m0fnu)}, num_bits=8,
        group_size=32, strategy="group", compression_format="mxfp8-quantized")
    assert qw.format == "fp8" and qw.block_size == 32
    _assert_bits(qw, (w.astype(np.float64) * _by_block(scale, 32)).astype(np.float32))


def test_ct_float_formats_bad_input():
    tensors, kwargs, _ = _ct_fp8_case("channel", 16, 64, np.float32)
    with pytest.raises(ValueError, match="symmetric: float-quantized weights are symmetric"):
        interop.from_compressed_tensors(tensors, **kwargs, symmetric=False)
    with pytest.raises(ValueError, match="weight_zero_point: float-quantized weights have no "
                                         "zero point"):
        interop.from_compressed_tensors(
            dict(tensors, weight_zero_point=np.ones((16, 1), np.int8)), **kwargs)
    # An all-zero zero point means none.
    interop.from_compressed_tensors(dict(tensors, weight_zero_point=np.zeros((16, 1), np.int8)),
                                    **kwargs)
    with pytest.raises(ValueError, match="num_bits: compression_format 'float-quantized' "
                                         "holds 8-bit e4m3fn weights, got 4"):
        interop.from_compressed_tensors(tensors, **dict(kwargs, num_bits=4))
    with pytest.raises(TypeError, match="weight: expected dtype float8_e4m3fn, got int8"):
        interop.from_compressed_tensors(dict(tensors, weight=np.zeros((16, 64), np.int8)),
                                        **kwargs)
    with pytest.raises(ValueError, match=r"weight_scale: the channel strategy expects shape "
                                         r"\[16, 1\], got \[8, 1\]"):
        interop.from_compressed_tensors(dict(tensors, weight_scale=np.ones((8, 1), np.float32)),
                                        **kwargs)
    with pytest.raises(ValueError, match="strategy: float-quantized weights use"):
        interop.from_compressed_tensors(tensors, **dict(kwargs, strategy="tensor_group"))
    block, bkw, _ = _ct_fp8_case("block", 128, 256, np.float32, block=(128, 128))
    with pytest.raises(ValueError, match="block_structure: the block strategy needs"):
        interop.from_compressed_tensors(block, **dict(bkw, block_structure=None))
    odd = {"weight": _fp8((128, 200)), "weight_scale": np.ones((1, 2), np.float32)}
    with pytest.raises(ValueError, match=r"weight_scale: .*in=200 is not a multiple of 128"):
        interop.from_compressed_tensors(odd, **bkw)
    nv, _, _ = _nvfp4_case(16, 64)
    nv_kwargs = dict(num_bits=4, group_size=16, strategy="tensor_group",
                     compression_format="nvfp4-pack-quantized")
    with pytest.raises(KeyError, match="NVFP4 needs its 'weight_global_scale'"):
        interop.from_compressed_tensors({k: v for k, v in nv.items()
                                         if k != "weight_global_scale"}, **nv_kwargs)
    with pytest.raises(ValueError, match="group_size: nvfp4-pack-quantized has groups of 16, "
                                         "got 32"):
        interop.from_compressed_tensors(nv, **dict(nv_kwargs, group_size=32))
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \[16, 4\], got \[16, 2\]"):
        interop.from_compressed_tensors(dict(nv, weight_scale=nv["weight_scale"][:, :2]),
                                        **nv_kwargs)
    with pytest.raises(ValueError, match=r"weight_global_scale: expected one value"):
        interop.from_compressed_tensors(dict(nv, weight_global_scale=np.ones(2, np.float32)),
                                        **nv_kwargs)
    with pytest.raises(TypeError, match="weight_packed: expected dtype uint8, got int32"):
        interop.from_compressed_tensors(
            dict(nv, weight_packed=nv["weight_packed"].astype(np.int32)), **nv_kwargs)
    mx = {"weight_packed": _pairs(_codes((4, 64))),
          "weight_scale": np.full((4, 2), 255, np.uint8)}
    with pytest.raises(ValueError, match=r"weight_scale: 8 exponents are 255 \(E8M0's NaN\)"):
        interop.from_compressed_tensors(mx, num_bits=4, group_size=32, strategy="group",
                                        compression_format="mxfp4-pack-quantized")


def test_ct_export_round_trips():
    # fp8: channel, block (scales repeat over 128 rows) and group.
    for strategy, n, k, group, block in (("channel", 40, 96, None, None),
                                         ("block", 200, 256, None, (128, 128)),
                                         ("group", 32, 256, 64, None)):
        tensors, kwargs, expected = _ct_fp8_case(strategy, n, k, np.float32, group, block)
        qw = interop.from_compressed_tensors(tensors, **kwargs)
        layer = interop.to_compressed_tensors(qw)
        assert layer.compression_format == "float-quantized"
        assert layer.config["type"] == "float" and layer.config["strategy"] == strategy
        for name in tensors:
            np.testing.assert_array_equal(np.asarray(layer.tensors[name]).view(np.uint8),
                                          np.asarray(tensors[name]).view(np.uint8))
        back = interop.from_compressed_tensors(
            layer.tensors, compression_format=layer.compression_format,
            **{key: layer.config[key] for key in ("num_bits", "group_size", "strategy",
                                                  "block_structure")})
        _assert_bits(back, expected)
    # NVFP4 in its own (divisor) form: the same tensors come back.
    tensors, _, expected = _nvfp4_case(40, 128)
    qw = interop.from_compressed_tensors(tensors, num_bits=4, group_size=16,
                                         strategy="tensor_group",
                                         compression_format="nvfp4-pack-quantized")
    layer = interop.to_compressed_tensors(qw)
    assert layer.compression_format == "nvfp4-pack-quantized"
    assert layer.tensors["weight_scale"].dtype == FP8
    assert layer.tensors["weight_global_scale"].dtype == np.float32
    back = interop.from_compressed_tensors(layer.tensors, num_bits=4, group_size=16,
                                           strategy="tensor_group",
                                           compression_format="nvfp4-pack-quantized")
    _assert_bits(back, expected)
    np.testing.assert_array_equal(layer.tensors["weight_packed"], tensors["weight_packed"])
    # MXFP4 from quantize_weight (power-of-two scales): exact.
    w = RNG.standard_normal((24, 128)).astype(np.float32)
    qw = xla_qops.quantize_weight(w, format="mxfp4")
    layer = interop.to_compressed_tensors(qw)
    assert layer.compression_format == "mxfp4-pack-quantized"
    assert layer.tensors["weight_scale"].dtype == np.uint8
    back = interop.from_compressed_tensors(layer.tensors, num_bits=4, group_size=32,
                                           strategy="group",
                                           compression_format=layer.compression_format)
    _assert_bits(back, _dequantized(qw))


def test_ct_export_nvfp4_from_quantize_weight():
    """quantize_weight's NVFP4 scale is one float32 per block; compressed-tensors stores an
    e4m3 scale and a float32 divisor. Where no divisor reproduces every block scale the
    export refuses (exact=True) or rounds each block scale to the nearest it can hold."""
    w = RNG.standard_normal((32, 256)).astype(np.float32)
    qw = xla_qops.quantize_weight(w, format="nvfp4")
    try:
        layer = interop.to_compressed_tensors(qw)
    except ValueError as e:
        assert "block scales are not float32(s / g)" in str(e) and "exact=False" in str(e)
        layer = interop.to_compressed_tensors(qw, exact=False)
    back = interop.from_compressed_tensors(layer.tensors, num_bits=4, group_size=16,
                                           strategy="tensor_group",
                                           compression_format=layer.compression_format)
    np.testing.assert_array_equal(_stored_codes(back), _stored_codes(qw))
    np.testing.assert_allclose(np.asarray(back.scale), np.asarray(qw.scale), rtol=2 ** -22)


def test_ct_export_config_group_and_errors():
    w = RNG.standard_normal((64, 256)).astype(np.float32)
    qw = xla_qops.quantize_weight(w, format="fp8", block_size=128)
    layer = interop.to_compressed_tensors(qw)
    assert layer.config["strategy"] == "group" and layer.config["group_size"] == 128
    group = layer.config_group(quantize_activation=True)
    assert group["format"] == "float-quantized" and group["weights"]["type"] == "float"
    assert group["input_activations"] == {"num_bits": 8, "type": "float", "symmetric": True,
                                          "strategy": "token", "dynamic": True}
    args = interop.compressed_tensors.scheme_args(
        {"quant_method": "compressed-tensors", "config_groups": {"g": group}})
    assert args["quantize_activation"]
    back = interop.from_compressed_tensors(layer.tensors, **args["importer"])
    _assert_bits(back, _dequantized(qw))
    block, bkw, _ = _ct_fp8_case("block", 256, 256, np.float32, block=(128, 128))
    blayer = interop.to_compressed_tensors(interop.from_compressed_tensors(block, **bkw))
    assert blayer.config_group(True)["input_activations"]["strategy"] == "group"
    with pytest.raises(ValueError, match="compression_format: a fp8 weight is written as "
                                         "'float-quantized', got 'pack-quantized'"):
        interop.to_compressed_tensors(qw, compression_format="pack-quantized")
    with pytest.raises(ValueError, match="scale_dtype: bfloat16 does not hold these"):
        interop.to_compressed_tensors(qw, scale_dtype=BF16)
    fp4 = xla_qops.quantize_weight(w, format="mxfp4")
    with pytest.raises(ValueError, match="quantize_activation: compressed-tensors has no "
                                         "scheme with fp4 weights and fp8 activations"):
        interop.to_compressed_tensors(fp4).config_group(quantize_activation=True)
    with pytest.raises(ValueError, match="qw: mxfp4-pack-quantized has blocks of 32, got "
                                         "block_size 16"):
        interop.to_compressed_tensors(xla_qops.quantize_weight(w, format="nvfp4"),
                                      compression_format="mxfp4-pack-quantized")


def test_ct_scheme_args_float_configs():
    def config(fmt, weights, acts=None):
        return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}
    fp8_block = config("float-quantized",
                       {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                        "block_structure": [128, 128], "dynamic": False},
                       {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
                        "group_size": 128, "dynamic": True})
    args = interop.compressed_tensors.scheme_args(fp8_block)
    assert args["quantize_activation"]
    assert args["importer"]["block_structure"] == [128, 128]
    assert args["importer"]["compression_format"] == "float-quantized"
    static = config("float-quantized", {"num_bits": 8, "type": "float", "strategy": "tensor"},
                    {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False})
    assert interop.compressed_tensors.scheme_args(static)["quantize_activation"]
    nvfp4a16 = config("nvfp4-pack-quantized",
                      {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                       "group_size": 16, "symmetric": True,
                       "scale_dtype": "torch.float8_e4m3fn"})
    args = interop.compressed_tensors.scheme_args(nvfp4a16)
    assert not args["quantize_activation"] and args["importer"]["strategy"] == "tensor_group"
    # Early FP8 checkpoints (2024) called their format naive-quantized.
    early = config("naive-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"})
    args = interop.compressed_tensors.scheme_args(early)
    assert args["importer"]["compression_format"] == "float-quantized"
    tensors, kwargs, expected = _ct_fp8_case("channel", 16, 64, BF16)
    _assert_bits(interop.from_compressed_tensors(
        tensors, **dict(kwargs, compression_format="naive-quantized")), expected)
    with pytest.raises(ValueError, match="weights of type 'int' do not go with format "
                                         "'float-quantized'"):
        interop.compressed_tensors.scheme_args(
            config("float-quantized", {"num_bits": 8, "type": "int", "strategy": "channel"}))


# ------------------------------------------------------------- ModelOpt

def test_modelopt_nvfp4_and_fp8():
    n, k = 48, 128
    codes = _codes((n, k))
    block_scale = RNG.uniform(0.01, 448, (n, k // 16)).astype(np.float32).astype(FP8)
    scale_2 = np.array(RNG.uniform(1e-5, 1e-3), np.float32)
    tensors = {"weight": _pairs(codes), "weight_scale": block_scale,
               "weight_scale_2": scale_2, "input_scale": np.array(0.01, np.float32)}
    qw = interop.from_modelopt(tensors, quant_algo="NVFP4")
    # ModelOpt NVFP4QTensor.dequantize: per_block = float32(scale) * double_scale; x * it.
    per_block = (block_scale.astype(np.float64) * np.float64(scale_2)).astype(np.float32)
    _assert_bits(qw, (E2M1_F64[codes] * _by_block(per_block, 16).astype(np.float64)).astype(
        np.float32))
    np.testing.assert_array_equal(_stored_codes(qw), codes)
    with pytest.raises(KeyError, match="NVFP4 needs its per-tensor 'weight_scale_2'"):
        interop.from_modelopt({k_: v for k_, v in tensors.items() if k_ != "weight_scale_2"})
    with pytest.raises(ValueError, match="quant_algo: expected one of NVFP4, FP8, got 'W4A8'"):
        interop.from_modelopt(tensors, quant_algo="W4A8")
    w = _fp8((n, k))
    qw = interop.from_modelopt({"weight": w, "weight_scale": np.array(0.003, np.float32)},
                               quant_algo="FP8")
    _assert_bits(qw, (w.astype(np.float64) * np.float64(np.float32(0.003))).astype(np.float32))


# ------------------------------------------------------------- GGUF MXFP4 / NVFP4

GGML = gguf.GGMLQuantizationType


def _gguf_fp4_blocks(name, n, k):
    values, size = gguf.GGML_QUANT_SIZES[GGML[name]]
    blocks = RNG.integers(0, 256, (n * k // values, size), dtype=np.uint8)
    if name == "MXFP4":
        # Every exponent but 0, 1 (subnormal scales) and 253, 254 (overflowing products).
        blocks[:, 0] = RNG.integers(2, 253, len(blocks))
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("name", ["MXFP4", "NVFP4"])
def test_gguf_fp4_exact_against_gguf_dequantize(name):
    if not hasattr(GGML, name):
        pytest.skip(f"gguf {gguf.__name__} has no {name}")
    n, k = 40, 256
    data = _gguf_fp4_blocks(name, n, k)
    qw = interop.from_gguf(data, name, (n, k))
    assert qw.format == "fp4" and qw.block_size == {"MXFP4": 32, "NVFP4": 16}[name]
    reference = gguf.quants.dequantize(data, GGML[name]).astype(np.float32)
    ours = _dequantized(qw)
    finite = np.isfinite(reference)
    np.testing.assert_array_equal(ours[~finite], reference[~finite])
    _assert_bits(qw, np.where(finite, reference, ours))


def test_gguf_mxfp4_layout_and_quantizer():
    """One block by hand: byte j holds value j (low nibble) and j + 16 (high)."""
    codes = np.arange(32) % 16
    block = np.concatenate([[127], codes[:16] | (codes[16:] << 4)]).astype(np.uint8)
    qw = interop.from_gguf(block, "MXFP4", (1, 32))
    expected = np.where(codes == 8, 0.0, E2M1_F64[codes])  # gguf's code 8 is +0
    _assert_bits(qw, expected.astype(np.float32)[None])
    # gguf-py's own MXFP4 quantizer, read back exactly.
    w = RNG.standard_normal((16, 128)).astype(np.float32)
    data = gguf.quants.quantize(w, GGML.MXFP4)
    qw = interop.from_gguf(data, GGML.MXFP4, (16, 128))
    _assert_bits(qw, gguf.quants.dequantize(data, GGML.MXFP4))
    with pytest.raises(ValueError, match="target_bits: MXFP4 imports as fp4"):
        interop.from_gguf(data, "MXFP4", (16, 128), target_bits=8)
    bad = data.copy().reshape(-1, 17)
    bad[3, 0] = 255
    with pytest.raises(ValueError, match=r"data: 1 exponents are 255"):
        interop.from_gguf(bad, "MXFP4", (16, 128))


def test_read_gguf_file_with_mxfp4(tmp_path):
    path = str(tmp_path / "fp4.gguf")
    data = _gguf_fp4_blocks("MXFP4", 8, 64)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=GGML.MXFP4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    weights, others, _ = interop.read_gguf(path)
    assert list(weights) == ["blk.0.ffn_down.weight"] and not others
    qw = weights["blk.0.ffn_down.weight"]
    assert qw.format == "fp4" and (qw.out_features, qw.in_features) == (8, 64)
    _assert_bits(qw, gguf.quants.dequantize(data, GGML.MXFP4))


# ------------------------------------------------------------- whole checkpoints

def _save(directory, tensors, config=None, name="model.safetensors", extra=None):
    from safetensors.numpy import save_file
    directory.mkdir(exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / name))
    if config is not None:
        (directory / "config.json").write_text(json.dumps({"quantization_config": config}))
    for file, content in (extra or {}).items():
        (directory / file).write_text(json.dumps(content))


def test_read_checkpoint_native_fp8(tmp_path):
    x = _fp8((200, 256))
    s = RNG.uniform(1e-3, 1e-2, (2, 2)).astype(np.float32)
    tensors = {"model.layers.0.mlp.down_proj.weight": x,
               "model.layers.0.mlp.down_proj.weight_scale_inv": s,
               "model.norm.weight": np.ones(256, BF16)}
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": [128, 128]}
    _save(tmp_path / "a", tensors, config)
    got = interop.read_checkpoint(tmp_path / "a")
    assert got.format == "fp8" and list(got.weights) == ["model.layers.0.mlp.down_proj"]
    assert got.quantize_activation == {"model.layers.0.mlp.down_proj": True}
    assert got.tensors["model.norm.weight"].dtype == BF16
    _assert_bits(got.weights["model.layers.0.mlp.down_proj"], _deepseek_weight_dequant(x, s))
    _save(tmp_path / "b", tensors)  # no config.json: told by .weight_scale_inv
    assert interop.read_checkpoint(tmp_path / "b").format == "fp8"
    _save(tmp_path / "c", tensors, {"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(ValueError, match="without weight_block_size"):
        interop.read_checkpoint(tmp_path / "c")
    odd = {"l.weight": _fp8((128, 200)), "l.weight_scale_inv": np.ones((1, 2), np.float32)}
    _save(tmp_path / "d", odd, config)
    with pytest.raises(ValueError, match=r"l: weight_scale_inv: .*in=200 is not a multiple"):
        interop.read_checkpoint(tmp_path / "d")


def test_read_checkpoint_compressed_tensors_float(tmp_path):
    fp8_t, fp8_kw, fp8_w = _ct_fp8_case("block", 200, 256, BF16, block=(128, 128))
    nv_t, _, nv_w = _nvfp4_case(64, 256)
    tensors = {f"model.layers.0.self_attn.q_proj.{k}": v for k, v in fp8_t.items()}
    tensors.update({f"model.layers.0.mlp.up_proj.{k}": v for k, v in nv_t.items()})
    tensors["model.layers.0.self_attn.q_proj.input_scale"] = np.array([0.1], np.float32)
    config = {"quant_method": "compressed-tensors", "format": "mixed-precision",
              "config_groups": {
                  "fp8": {"targets": ["re:.*self_attn.*"], "format": "float-quantized",
                          "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                      "strategy": "block", "block_structure": [128, 128]},
                          "input_activations": {"num_bits": 8, "type": "float",
                                                "strategy": "tensor", "dynamic": False}},
                  "nvfp4": {"targets": ["re:.*mlp.*"], "format": "nvfp4-pack-quantized",
                            "weights": {"num_bits": 4, "type": "float", "symmetric": True,
                                        "strategy": "tensor_group", "group_size": 16}}}}
    _save(tmp_path / "ct", tensors, config)
    got = interop.read_checkpoint(tmp_path / "ct")
    assert sorted(got.weights) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]
    assert got.quantize_activation == {"model.layers.0.mlp.up_proj": False,
                                       "model.layers.0.self_attn.q_proj": True}
    assert not got.tensors  # input_scale belongs to its layer
    _assert_bits(got.weights["model.layers.0.self_attn.q_proj"], fp8_w)
    _assert_bits(got.weights["model.layers.0.mlp.up_proj"], nv_w)
    # Without config.json, the parameters are read off the tensors.
    _save(tmp_path / "bare", tensors)
    bare = interop.read_checkpoint(tmp_path / "bare")
    _assert_bits(bare.weights["model.layers.0.mlp.up_proj"], nv_w)
    _assert_bits(bare.weights["model.layers.0.self_attn.q_proj"], fp8_w)


def test_read_checkpoint_modelopt(tmp_path):
    n, k = 32, 64
    codes = _codes((n, k))
    block_scale = RNG.uniform(0.01, 448, (n, k // 16)).astype(np.float32).astype(FP8)
    tensors = {"m.o_proj.weight": _pairs(codes), "m.o_proj.weight_scale": block_scale,
               "m.o_proj.weight_scale_2": np.array(2e-4, np.float32),
               "m.o_proj.input_scale": np.array(0.01, np.float32)}
    hf_quant = {"producer": {"name": "modelopt"},
                "quantization": {"quant_algo": "NVFP4", "group_size": 16}}
    _save(tmp_path / "mo", tensors, extra={"hf_quant_config.json": hf_quant})
    (tmp_path / "mo" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    got = interop.read_checkpoint(tmp_path / "mo")
    assert got.format == "modelopt" and got.quantize_activation == {"m.o_proj": True}
    per_block = (block_scale.astype(np.float64) * np.float64(np.float32(2e-4))).astype(np.float32)
    _assert_bits(got.weights["m.o_proj"], (E2M1_F64[codes] * _by_block(
        per_block, 16).astype(np.float64)).astype(np.float32))


def test_from_state_dict_fp8():
    x = _fp8((128, 256))
    s = RNG.uniform(1e-3, 1e-2, (1, 2)).astype(np.float32)
    weights, others = interop.from_state_dict(
        {"a.weight": x, "a.weight_scale_inv": s, "b.bias": np.zeros(3, np.float32)}, "fp8")
    assert list(weights) == ["a"] and list(others) == ["b.bias"]
    _assert_bits(weights["a"], _deepseek_weight_dequant(x, s))


def test_imported_float_weights_run_in_quantized_matmul():
    """Each imported form goes through quantized_matmul (A16) close to x @ W^T."""
    cases = [interop.from_fp8_blocks(_fp8((64, 256)), RNG.uniform(1e-3, 1e-2, (1, 2)).astype(
                 np.float32)),
             interop.from_compressed_tensors(*_nvfp4_case(48, 64)[:1], num_bits=4,
                                             strategy="tensor_group",
                                             compression_format="nvfp4-pack-quantized"),
             interop.from_gguf(_gguf_fp4_blocks("MXFP4", 16, 64), "MXFP4", (16, 64))]
    for qw in cases:
        x = RNG.standard_normal((3, qw.in_features)).astype(np.float32)
        w = _dequantized(qw).astype(np.float64)
        y = np.asarray(xla_qops.quantized_matmul(jnp.asarray(x), qw, impl="reference"))
        expected = x.astype(np.float64) @ w.T
        np.testing.assert_allclose(y, expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(x).sum() * np.abs(w).max())


# ------------------------------------------------------------- torch inputs

@pytest.mark.torch
def test_torch_float8_and_float4_tensors(torch):
    x = _fp8((200, 256))
    s = RNG.uniform(1e-3, 1e-2, (2, 2)).astype(np.float32)
    tx = torch.from_numpy(x.view(np.uint8)).view(torch.float8_e4m3fn)
    qw = interop.from_fp8_blocks(tx, torch.from_numpy(s).to(torch.bfloat16))
    _assert_bits(qw, _deepseek_weight_dequant(x, s.astype(BF16)))
    tensors, codes, expected = _nvfp4_case(32, 64)
    as_torch = {"weight_packed": torch.from_numpy(tensors["weight_packed"]).view(
                    torch.float4_e2m1fn_x2),
                "weight_scale": torch.from_numpy(tensors["weight_scale"].view(np.uint8)).view(
                    torch.float8_e4m3fn),
                "weight_global_scale": torch.from_numpy(tensors["weight_global_scale"])}
    qw = interop.from_compressed_tensors(as_torch, num_bits=4, strategy="tensor_group",
                                         compression_format="nvfp4-pack-quantized")
    _assert_bits(qw, expected)


# ------------------------------------------------------------- compressed-tensors itself

def _args(**config):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(**config)


def _scheme(**config):
    from compressed_tensors.quantization import QuantizationScheme
    return QuantizationScheme(targets=["Linear"], weights=_args(**config))


def _numpy_state(state, torch):
    out = {}
    for name, t in state.items():
        out[name] = t.float().numpy().astype(BF16) if t.dtype == torch.bfloat16 else (
            t.view(torch.uint8).numpy().view(FP8) if t.dtype == torch.float8_e4m3fn
            else t.numpy())
    return out


@pytest.mark.torch
@pytest.mark.parametrize("strategy,n,k,extra", [
    ("tensor", 48, 64, {}), ("channel", 40, 96, {}),
    ("block", 256, 384, {"block_structure": [128, 128]}),
    ("block", 200, 256, {"block_structure": [128, 128]}),
    ("group", 32, 256, {"group_size": 128})])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_ct_library_fp8(strategy, n, k, extra, scale_dtype, torch):
    """Their FloatQuantizationCompressor writes the layer, we import it; their
    dequantize (in the scale's dtype) reads it: bit for bit with float32 scales,
    ours rounded to bf16 with bf16 scales (fp8 x bf16 products are exact in float32)."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    config = dict(num_bits=8, type="float", symmetric=True, strategy=strategy, **extra)
    scheme = _scheme(**config)
    dtype = getattr(torch, scale_dtype)
    w = torch.randn(n, k, dtype=torch.float32) * 0.02
    shape = {"tensor": (1,), "channel": (n, 1), "group": (n, k // extra.get("group_size", 1)),
             "block": (-(-n // 128), -(-k // 128))}[strategy]
    s = (torch.rand(shape) * 1e-4 + 2e-5).to(dtype)
    packed = BaseCompressor.load_from_registry("float-quantized").compress(
        {"weight": w.to(dtype), "weight_scale": s}, scheme)
    assert packed["weight"].dtype == torch.float8_e4m3fn
    qw = interop.from_compressed_tensors(packed, compression_format="float-quantized",
                                         num_bits=8, strategy=strategy, **extra)
    ours = _dequantized(qw)
    theirs = dequantize(packed["weight"], packed["weight_scale"], args=scheme.weights)
    assert theirs.dtype == dtype
    if scale_dtype == "float32":
        np.testing.assert_array_equal(theirs.numpy().view(np.uint32), ours.view(np.uint32))
        if strategy != "block" or n % 128 == 0:  # their decompressor infers the strategy
            again = BaseCompressor.load_from_registry("float-quantized").decompress(
                dict(packed), scheme)["weight"]
            np.testing.assert_array_equal(again.numpy(), ours)
    else:
        np.testing.assert_array_equal(theirs.float().numpy(),
                                      torch.from_numpy(ours).to(dtype).float().numpy())
        exact = (packed["weight"].double() * _expand(packed["weight_scale"].double(), strategy,
                                                     n, k, extra)).float().numpy()
        np.testing.assert_array_equal(ours, exact)
    layer = interop.to_compressed_tensors(qw, scale_dtype=np.float32)
    back = dequantize(torch.from_numpy(layer.tensors["weight"].view(np.uint8)).view(
                          torch.float8_e4m3fn),
                      torch.from_numpy(layer.tensors["weight_scale"]),
                      args=_args(**{key: v for key, v in layer.config.items()
                                    if key not in ("observer", "observer_kwargs")}))
    np.testing.assert_array_equal(back.numpy(), ours)


def _expand(scale, strategy, n, k, extra):
    if strategy == "tensor":
        return scale.reshape(1, 1).expand(n, k)
    if strategy == "channel":
        return scale.expand(n, k)
    if strategy == "group":
        return scale.repeat_interleave(extra["group_size"], dim=1)
    rows, cols = extra["block_structure"]
    return scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]


@pytest.mark.torch
@pytest.mark.parametrize("n,k", [(64, 128), (40, 256)])
def test_ct_library_nvfp4(n, k, torch):
    """NVFP4 as llm-compressor makes it (global = 448*6/amax, e4m3 block scales), packed by
    their compressor; ours equals their float32 dequantize bit for bit and their bf16
    decompression rounded once; our export is their compressor's output and they read it."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    config = dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                  group_size=16, scale_dtype=torch.float8_e4m3fn)
    scheme = _scheme(**config)
    w = torch.randn(n, k) * 0.05
    global_scale = torch.tensor([448.0 * 6.0], dtype=torch.float32) / w.abs().max()
    amax = w.reshape(n, k // 16, 16).abs().amax(-1)
    block = (amax / 6.0 * global_scale).to(torch.float8_e4m3fn).float()
    packed = BaseCompressor.load_from_registry("nvfp4-pack-quantized").compress(
        {"weight": w, "weight_scale": block, "weight_global_scale": global_scale}, scheme)
    assert packed["weight_packed"].dtype == torch.uint8
    assert packed["weight_scale"].dtype == torch.float8_e4m3fn
    qw = interop.from_compressed_tensors(packed, compression_format="nvfp4-pack-quantized",
                                         num_bits=4, group_size=16, strategy="tensor_group")
    ours = _dequantized(qw)
    x_q = unpack_fp4_from_uint8(packed["weight_packed"], n, k, dtype=torch.float32)
    theirs = dequantize(x_q, packed["weight_scale"].float(), args=scheme.weights,
                        global_scale=global_scale, dtype=torch.float32)
    np.testing.assert_array_equal(theirs.numpy().view(np.uint32), ours.view(np.uint32))
    decompressed = BaseCompressor.load_from_registry("nvfp4-pack-quantized").decompress(
        dict(packed), scheme)["weight"]
    np.testing.assert_array_equal(decompressed.float().numpy(),
                                  torch.from_numpy(ours).to(torch.bfloat16).float().numpy())
    layer = interop.to_compressed_tensors(qw)
    assert layer.compression_format == "nvfp4-pack-quantized"
    np.testing.assert_array_equal(layer.tensors["weight_packed"],
                                  packed["weight_packed"].numpy())
    state = {"weight_packed": torch.from_numpy(layer.tensors["weight_packed"]),
             "weight_scale": torch.from_numpy(layer.tensors["weight_scale"].view(np.uint8)).view(
                 torch.float8_e4m3fn),
             "weight_global_scale": torch.from_numpy(layer.tensors["weight_global_scale"])}
    again = BaseCompressor.load_from_registry("nvfp4-pack-quantized").decompress(
        state, _scheme(**{key: v for key, v in layer.config.items()
                          if key not in ("observer", "observer_kwargs")}))["weight"]
    np.testing.assert_array_equal(again.float().numpy(), decompressed.float().numpy())


@pytest.mark.torch
def test_ct_library_mxfp4_and_mxfp8(torch):
    """MXFP4: their compressor packs and writes E8M0 exponents (their decompressor is not
    implemented); ours equals their dequantize of their unpacked codes and decoded scales.
    MXFP8: their compressor and decompressor."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    n, k = 48, 128
    w = torch.randn(n, k) * 0.05
    amax = w.reshape(n, k // 32, 32).abs().amax(-1)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    config = dict(num_bits=4, type="float", symmetric=True, strategy="group", group_size=32,
                  scale_dtype=torch.uint8)
    scheme = _scheme(**config)
    packed = BaseCompressor.load_from_registry("mxfp4-pack-quantized").compress(
        {"weight": w, "weight_scale": scale}, scheme)
    assert packed["weight_scale"].dtype == torch.uint8
    qw = interop.from_compressed_tensors(packed, compression_format="mxfp4-pack-quantized",
                                         num_bits=4, group_size=32, strategy="group")
    x_q = unpack_fp4_from_uint8(packed["weight_packed"], n, k, dtype=torch.float32)
    theirs = dequantize(x_q, decompress_mx_scale(packed["weight_scale"]).float(),
                        args=scheme.weights, dtype=torch.float32)
    np.testing.assert_array_equal(theirs.numpy().view(np.uint32), _dequantized(qw).view(np.uint32))
    layer = interop.to_compressed_tensors(qw)
    assert layer.compression_format == "mxfp4-pack-quantized"
    for name in ("weight_packed", "weight_scale"):
        np.testing.assert_array_equal(layer.tensors[name], packed[name].numpy())

    config8 = dict(num_bits=8, type="float", symmetric=True, strategy="group", group_size=32,
                   scale_dtype=torch.uint8)
    scheme8 = _scheme(**config8)
    scale8 = torch.exp2(torch.floor(torch.log2(amax)) - 8)
    packed8 = BaseCompressor.load_from_registry("mxfp8-quantized").compress(
        {"weight": w, "weight_scale": scale8}, scheme8)
    qw8 = interop.from_compressed_tensors(packed8, compression_format="mxfp8-quantized",
                                          num_bits=8, group_size=32, strategy="group")
    theirs8 = BaseCompressor.load_from_registry("mxfp8-quantized").decompress(
        dict(packed8), scheme8)["weight"]
    assert theirs8.dtype == torch.bfloat16  # fp8 x power of two: exact in bf16 too
    np.testing.assert_array_equal(theirs8.float().numpy(), _dequantized(qw8))


# ------------------------------------------------------------- whole models (torch_bridge)

def _tiny_llama(torch, seed):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _linears(torch, model):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"]


def _logits_close(torch, loaded, source):
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        out, ref = loaded(ids).logits, source(ids).logits
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()


@pytest.mark.torch
def test_load_quantized_native_fp8_model(tmp_path, torch):
    """A DeepSeek-style fp8 checkpoint of a tiny Llama (64 x 64 blocks) swaps every
    Linear for an fp8 layer with fp8 activations; each imported weight is
    `weight_dequant` bit for bit and the logits stay close."""
    import torch_bridge
    from safetensors.numpy import save_file
    from xla_qops import checkpoint
    source = _tiny_llama(torch, 3)
    tensors = {name: p.numpy() for name, p in source.state_dict().items()}
    expected = {}
    for name, m in _linears(torch, source):
        w = m.weight.detach().numpy()
        n, k = w.shape
        padded = np.pad(np.abs(w), ((0, -n % 64), (0, 0)))  # k_proj: out = 32
        s = (padded.reshape(-1, 64, k // 64, 64).max(axis=(1, 3)) / 448).astype(np.float32)
        q = (w / np.repeat(np.repeat(s, 64, 0), 64, 1)[:n]).astype(FP8)
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = q, s
        expected[name] = _deepseek_weight_dequant(q, s, block=64)
    _save(tmp_path, tensors, {"quant_method": "fp8", "activation_scheme": "dynamic",
                              "fmt": "e4m3", "weight_block_size": [64, 64]})
    model = _tiny_llama(torch, 5)
    report = torch_bridge.load_quantized(model, tmp_path)
    assert "swapped 14 linear layers (14 w8a8-fp8)" in str(report)
    _logits_close(torch, model, source)
    loaded = checkpoint.load_quantized(tmp_path)
    assert sorted(loaded.weights) == sorted(expected)
    for name, qw in loaded.weights.items():
        _assert_bits(qw, expected[name])


@pytest.mark.torch
def test_load_quantized_exported_compressed_tensors_model(tmp_path, torch):
    """Our export (fp8 attention with FP8_DYNAMIC activations, MXFP4 MLP weight-only),
    under two config groups, loads back into a model."""
    import torch_bridge
    source = _tiny_llama(torch, 3)
    tensors = {name: p.numpy() for name, p in source.state_dict().items()}
    groups = {}
    for name, m in _linears(torch, source):
        fmt = "mxfp4" if ".mlp." in name else "fp8"
        qw = xla_qops.quantize_weight(m.weight.detach().numpy(), format=fmt)
        layer = interop.to_compressed_tensors(qw)
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{part}": a for part, a in layer.tensors.items()})
        groups[fmt] = layer.config_group(quantize_activation=fmt == "fp8",
                                         targets=[f"re:.*{'mlp' if fmt == 'mxfp4' else 'self_attn'}.*"])
    _save(tmp_path, tensors, {"quant_method": "compressed-tensors", "format": "mixed-precision",
                              "config_groups": groups})
    model = _tiny_llama(torch, 5)
    report = torch_bridge.load_quantized(model, tmp_path)
    assert "(6 w4a16-fp4, 8 w8a8-fp8)" in str(report)
    _logits_close(torch, model, source)


@pytest.mark.torch
@pytest.mark.parametrize("n,k", [(64, 128), (48, 256)])
def test_nvfp4_divisor_form_is_what_compressed_tensors_writes(n, k, torch):
    """quantize_float(..., nvfp4_divisor=True), exported, holds the tensors that
    compressed-tensors' own NVFP4 path makes of the same weight (its generate_gparam and
    calculate_qparams, then its compressor): the same packed codes and e4m3 block scales,
    byte for byte, and a global scale that reproduces every block scale (the exporter finds
    one from the scales alone: it may be a float32 neighbour of theirs, as any g with
    float32(s / g) equal for every block is), so their dequantization of both is one
    float32 weight, bit for bit."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    from xla_qops.quantize import quantize_float
    config = dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                  group_size=16, scale_dtype=torch.float8_e4m3fn)
    w = torch.randn(n, k) * torch.exp(torch.randn(n, 1))
    global_scale = generate_gparam(w.min(), w.max())
    groups = w.reshape(n, k // 16, 16)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), _args(**config),
                                 global_scale=global_scale)
    theirs = BaseCompressor.load_from_registry("nvfp4-pack-quantized").compress(
        {"weight": w, "weight_scale": scale, "weight_global_scale": global_scale},
        _scheme(**config))
    ours = interop.to_compressed_tensors(
        quantize_float(w.numpy(), "nvfp4", 16, nvfp4_divisor=True)).tensors
    np.testing.assert_array_equal(ours["weight_packed"], theirs["weight_packed"].numpy())
    np.testing.assert_array_equal(ours["weight_scale"].view(np.uint8),
                                  theirs["weight_scale"].view(torch.uint8).numpy())
    np.testing.assert_allclose(ours["weight_global_scale"],
                               theirs["weight_global_scale"].numpy(), rtol=2 ** -21)
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    codes = unpack_fp4_from_uint8(theirs["weight_packed"], n, k, dtype=torch.float32)

    def theirs_of(tensors):
        return dequantize(codes, torch.as_tensor(np.asarray(tensors["weight_scale"]).view(
            np.uint8)).view(torch.float8_e4m3fn).float(), args=_args(**config),
            global_scale=torch.as_tensor(np.asarray(tensors["weight_global_scale"])),
            dtype=torch.float32).numpy()
    np.testing.assert_array_equal(theirs_of(ours).view(np.uint32),
                                  theirs_of({k_: v.numpy() if k_ != "weight_scale" else
                                             v.view(torch.uint8).numpy()
                                             for k_, v in theirs.items()}).view(np.uint32))
