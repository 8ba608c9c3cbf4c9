"""XlaQuantizedLinear (layouts, load_quantized_weight, from_float, state_dict,
.to(device)), quantize_model and its report, and bad input through the torch
surface. Numerics against tests/numpy_reference.py."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numpy_reference as ref
import torch_bridge
import xla_qops
from torch_bridge import XlaQuantizedLinear

from conftest import HAVE_TORCH_XLA

if HAVE_TORCH_XLA:  # the XLA-device tests (marked torch_xla); the rest run on any torch
    import torch_xla


def to_numpy(t):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(jnp.bfloat16)
    return t.numpy()


def check_module(module, x, y):
    """y == the float64 reference for module's stored (quantized) weight, no bias."""
    zp = None if module.zero_point is None else to_numpy(module.zero_point)
    ref.assert_close(to_numpy(y), to_numpy(x), to_numpy(module.weight),
                     to_numpy(module.weight_scaler), zp, module.block_size,
                     module.quantize_activation)


def float_linear(k=64, n=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias)


def rand_x(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ---------------------------------------------------------------------------
# Construction and layouts

@pytest.mark.parametrize("block,int4,expected_w,expected_s", [
    (-1, False, ((40, 64), torch.int8), (40,)),
    (16, False, ((4, 16, 40), torch.int8), (4, 40)),
    (-1, True, ((40, 32), torch.uint8), (40,)),
    (16, True, ((4, 8, 40), torch.uint8), (4, 40)),
])
def test_constructor_buffers(block, int4, expected_w, expected_s):
    m = XlaQuantizedLinear(64, 40, block_size=block, int4_weight=int4)
    assert (tuple(m.weight.shape), m.weight.dtype) == expected_w
    assert tuple(m.weight_scaler.shape) == expected_s
    # torch_xla's default is asymmetric: a zero_point buffer like the scaler.
    assert tuple(m.zero_point.shape) == expected_s
    assert set(m.state_dict()) == {"weight", "weight_scaler", "zero_point"}
    sym = XlaQuantizedLinear(64, 40, is_symmetric=True, block_size=block, int4_weight=int4,
                             bias=True)
    assert sym.zero_point is None and set(sym.state_dict()) == {"weight", "weight_scaler", "bias"}


def make_quantized(bits, block, symmetric, pack, n=40, k=64, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    qw = xla_qops.quantize_weight(w, bits=bits, block_size=block, symmetric=symmetric, pack=pack)
    t = lambda a: None if a is None else torch.from_numpy(np.array(a))
    return qw, t(qw.w), t(qw.scale), t(qw.zero_point)


@pytest.mark.parametrize("bits,block,symmetric,pack", [
    (8, -1, True, False), (8, 16, False, False), (4, -1, False, False), (4, 16, True, False),
    (4, -1, True, True), (4, 16, False, True)])
def test_load_quantized_weight_layouts(bits, block, symmetric, pack):
    """torch_xla's layouts (unpacked int4 included) are accepted; int4 is stored packed."""
    qw, w, s, z = make_quantized(bits, block, symmetric, pack)
    m = XlaQuantizedLinear(64, 40, is_symmetric=symmetric, block_size=block, int4_weight=bits == 4)
    m.load_quantized_weight(w, s, z)
    if bits == 4:
        axis = 1 if block != -1 else -1
        expected = w.numpy() if pack else ref.pack_int4(w.numpy(), axis)
        assert m.weight.dtype == torch.uint8 and np.array_equal(m.weight.numpy(), expected)
    else:
        assert torch.equal(m.weight, w)
    x = rand_x(3, 64, dtype=torch.bfloat16)
    check_module(m, x, m(x))


def test_load_quantized_weight_from_quantized_weight_object():
    qw, w, s, z = make_quantized(4, 16, False, True)
    m = XlaQuantizedLinear(64, 40, block_size=16, int4_weight=True)
    m.load_quantized_weight(qw)
    assert torch.equal(m.weight, w) and torch.equal(m.weight_scaler, s)
    assert torch.equal(m.zero_point, z)


def test_asymmetric_module_without_zero_point_stores_zeros():
    _, w, s, _ = make_quantized(8, -1, True, False)
    m = XlaQuantizedLinear(64, 40)  # torch_xla default: is_symmetric=False
    m.load_quantized_weight(w, s)
    assert torch.equal(m.zero_point, torch.zeros(40))
    x = rand_x(2, 64)
    check_module(m, x, m(x))


# ---------------------------------------------------------------------------
# from_float

SCHEME_ROWS = [(bits, qa, block, sym) for bits in (8, 4) for qa in (False, True)
               for block, sym in ((-1, True), (16, False))]


@pytest.mark.parametrize("bits,qa,block,symmetric", SCHEME_ROWS)
def test_from_float_every_scheme(bits, qa, block, symmetric):
    linear = float_linear(bias=False)
    m = XlaQuantizedLinear.from_float(linear, bits=bits, block_size=block, symmetric=symmetric,
                                      quantize_activation=qa)
    qw = xla_qops.quantize_weight(linear.weight.detach().numpy(), bits=bits, block_size=block,
                                  symmetric=symmetric, pack=True)
    assert np.array_equal(m.weight.numpy(), np.asarray(qw.w))
    assert np.array_equal(m.weight_scaler.numpy(), np.asarray(qw.scale))
    assert (m.zero_point is None) == symmetric
    assert m.scheme == f"w{bits}a{8 if qa else 16}" and m.block_size == block
    x = rand_x(2, 5, 64)
    y = m(x)
    assert y.shape == (2, 5, 40) and y.dtype == x.dtype
    check_module(m, x, y)


def test_from_float_bias_and_dtype():
    linear = float_linear().to(torch.bfloat16)
    m = XlaQuantizedLinear.from_float(linear, bits=4, block_size=32)
    assert m.bias.dtype == torch.bfloat16 and torch.equal(m.bias, linear.bias)
    assert m.bias.data_ptr() != linear.bias.data_ptr()  # a copy, not shared
    assert m.weight_scaler.dtype == torch.float32  # scales stay float32
    x = rand_x(3, 64, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    no_bias = XlaQuantizedLinear.from_float(float_linear(bias=False).to(torch.bfloat16), bits=4,
                                            block_size=32)
    assert torch.equal(y, no_bias(x) + m.bias)  # same weight (same seed), bias added once


def test_extra_repr():
    m = XlaQuantizedLinear.from_float(float_linear(), bits=4, block_size=16, symmetric=False)
    text = repr(m)
    for part in ("input_dim=64", "output_dim=40", "w4a16", "block_size=16", "asymmetric",
                 "bias=True", "int4 packed"):
        assert part in text, text


# ---------------------------------------------------------------------------
# state_dict

@pytest.mark.parametrize("bits,block,symmetric,bias", [
    (8, -1, True, False), (4, 16, False, True), (4, -1, False, False), (8, 32, True, True)])
def test_state_dict_round_trip_is_exact(bits, block, symmetric, bias):
    m = XlaQuantizedLinear.from_float(float_linear(bias=bias), bits=bits, block_size=block,
                                      symmetric=symmetric)
    m.weight_scaler = m.weight_scaler.to(torch.bfloat16)  # a dtype copy_ would have cast
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scaler"} | ({"zero_point"} if not symmetric else set()) \
        | ({"bias"} if bias else set())
    fresh = XlaQuantizedLinear(64, 40, is_symmetric=symmetric, block_size=block,
                               int4_weight=bits == 4, bias=bias)
    fresh.load_state_dict(sd)
    for name, t in sd.items():
        got = fresh.state_dict()[name]
        assert got.dtype == t.dtype and torch.equal(got, t), name
    x = rand_x(4, 64)
    assert torch.equal(fresh(x), m(x))


@pytest.mark.torch_xla
def test_load_state_dict_of_torch_xla_module_packs_int4():
    from torch_xla.experimental.xla_quantized_matmul import XlaQuantizedLinear as TorchXlaLinear
    _, w, s, z = make_quantized(4, 16, False, pack=False)
    theirs = TorchXlaLinear(64, 40, block_size=16, int4_weight=True)
    theirs.load_quantized_weight(w, s, z)
    ours = XlaQuantizedLinear(64, 40, block_size=16, int4_weight=True)
    ours.load_state_dict(theirs.state_dict())
    assert ours.weight.dtype == torch.uint8
    assert np.array_equal(ours.weight.numpy(), ref.pack_int4(w.numpy(), 1))
    x = rand_x(3, 64)
    check_module(ours, x, ours(x))


def test_load_state_dict_strict_errors():
    m = XlaQuantizedLinear.from_float(float_linear(), bits=8)
    sd = m.state_dict()
    fresh = XlaQuantizedLinear(64, 40, is_symmetric=True, bias=True)
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != "bias"})
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        fresh.load_state_dict({**sd, "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"weight: .*expects shape \[40, 64\], got \[40, 32\]"):
        fresh.load_state_dict({**sd, "weight": sd["weight"][:, :32]})
    result = fresh.load_state_dict({k: v for k, v in sd.items() if k != "bias"}, strict=False)
    assert result.missing_keys == ["bias"]


@pytest.mark.torch_xla
def test_state_dict_in_a_model_and_to_xla():
    """A module-swapped model's state_dict loads into a freshly swapped one that
    already lives on the XLA device; tensors land there, results match."""
    model = torch.nn.Sequential(float_linear(), torch.nn.ReLU(), float_linear(40, 24, seed=1))
    torch_bridge.quantize_model(model, scheme="w4a16", block_size=8)
    skeleton = torch.nn.Sequential(float_linear(seed=5), torch.nn.ReLU(),
                                   float_linear(40, 24, seed=6))
    torch_bridge.quantize_model(skeleton, scheme="w4a16", block_size=8)
    device = torch_xla.device()
    skeleton.to(device).load_state_dict(model.state_dict())
    for name, t in model.state_dict().items():
        got = skeleton.state_dict()[name]
        assert got.device.type == "xla" and got.dtype == t.dtype
        assert torch.equal(got.cpu(), t), name
    x = rand_x(3, 64)
    with torch.no_grad():
        y = (skeleton[0](x.to(device)) - skeleton[0].bias).cpu()
    check_module(model[0], x, y)


@pytest.mark.torch_xla
def test_to_device_and_back():
    m = XlaQuantizedLinear.from_float(float_linear(bias=False), bits=4, block_size=16,
                                      symmetric=False)
    device = torch_xla.device()
    x = rand_x(2, 64, dtype=torch.bfloat16)
    on_xla = m.to(device)
    assert on_xla is m and m.weight.device.type == "xla" and m.weight.dtype == torch.uint8
    check_module(m, x, m(x.to(device)).cpu())
    m.to("cpu")
    assert m.weight.device.type == "cpu"
    check_module(m, x, m(x))


# ---------------------------------------------------------------------------
# Bad input through the torch surface: clear errors naming the argument.

def test_from_float_rejects_non_linear():
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear, got Conv1d"):
        XlaQuantizedLinear.from_float(torch.nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="bits: expected 8 or 4, got 3"):
        XlaQuantizedLinear.from_float(float_linear(), bits=3)
    with pytest.raises(ValueError, match="block_size: expected -1 .* divisor of input_dim=64, got 24"):
        XlaQuantizedLinear.from_float(float_linear(), block_size=24)
    nan = float_linear()
    with torch.no_grad():
        nan.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="linear: expected a finite weight, found 1 NaN"):
        XlaQuantizedLinear.from_float(nan)
    with pytest.raises(ValueError, match="linear: the weight is on the meta device"):
        XlaQuantizedLinear.from_float(torch.nn.Linear(8, 8, device="meta"))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(input_dim=0, output_dim=4), ValueError, "input_dim: expected a positive int, got 0"),
    (dict(input_dim=64, output_dim=4, block_size=48), ValueError,
     "block_size: expected -1 .* divisor of input_dim=64, got 48"),
    (dict(input_dim=64, output_dim=4, impl="tpu"), ValueError, "impl: expected one of"),
])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        XlaQuantizedLinear(**kwargs)


def _loaders():
    _, w8, s, z = make_quantized(8, -1, False, False)
    _, w4b, s4b, _ = make_quantized(4, 16, True, False)
    return [
        ("weight shape", dict(), (w8[:, :32], s, z), ValueError,
         r"weight: XlaQuantizedLinear\(input_dim=64, output_dim=40, block_size=-1, "
         r"int4_weight=False\) expects shape \[40, 64\], got \[40, 32\]"),
        ("weight dtype", dict(), (w8.float(), s, z), TypeError,
         "weight: .* expects int8 weights, got torch.float32"),
        ("scaler shape", dict(), (w8, s[:20], z), ValueError,
         r"weight_scaler: .* expects shape \[40\] \[out\], got \[20\]"),
        ("scaler dtype", dict(), (w8, s.to(torch.int32), z), TypeError,
         "weight_scaler: expected a floating dtype .* got torch.int32"),
        ("zero_point shape", dict(), (w8, s, z[None]), ValueError,
         r"zero_point: .* expects shape \[40\] \[out\], got \[1, 40\]"),
        ("weight not tensor", dict(), (w8.numpy(), s, z), TypeError,
         "weight: expected a torch.Tensor, got ndarray"),
        ("missing scaler", dict(), (w8,), TypeError, "weight_scaler: required"),
        ("int4 out of range", dict(block_size=16, int4_weight=True, is_symmetric=True),
         (w4b * 2, s4b), ValueError, r"weight: int4 values stored as int8 must lie in \[-8, 7\]"),
        ("int4 wrong dtype", dict(block_size=16, int4_weight=True, is_symmetric=True),
         (w4b.to(torch.int16), s4b), TypeError,
         r"weight: .* expects packed int4 as uint8 \[4, 8, 40\] or unpacked int4 as int8 "
         r"\[4, 16, 40\], got torch.int16"),
        ("int4 packed shape", dict(block_size=16, int4_weight=True, is_symmetric=True),
         (torch.zeros(4, 16, 40, dtype=torch.uint8), s4b), ValueError,
         r"weight: .* expects uint8 weights of shape \[4, 8, 40\], got \[4, 16, 40\]"),
        ("int8 module given blockwise", dict(), (w4b, s4b), ValueError,
         r"weight: .* expects shape \[40, 64\], got \[4, 16, 40\]"),
    ]


LOAD_ERRORS = ["weight shape", "weight dtype", "scaler shape", "scaler dtype", "zero_point shape",
               "weight not tensor", "missing scaler",
               "int4 out of range", "int4 wrong dtype", "int4 packed shape",
               "int8 module given blockwise"]


@pytest.mark.parametrize("case", LOAD_ERRORS)
def test_load_quantized_weight_errors(case):
    name, config, args, exc, match = {c[0]: c for c in _loaders()}[case]
    m = XlaQuantizedLinear(64, 40, **config)
    with pytest.raises(exc, match=match):
        m.load_quantized_weight(*args)


def test_load_error_leaves_module_unchanged():
    m = XlaQuantizedLinear.from_float(float_linear(), bits=8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError):
        m.load_quantized_weight(m.weight[:, :32], m.weight_scaler)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------
# quantize_model

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 96)
        self.odd = torch.nn.Linear(30, 64)  # 30 % 32 != 0: skipped when blockwise
        self.attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        self.head = torch.nn.Linear(96, 16, bias=False)
        self.shared = self.head  # the same module under two names

    def forward(self, x, x30):
        h = torch.relu(self.up(x + self.odd(x30)))
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h) + self.shared(h) + a[..., :16]


def test_quantize_model_swaps_in_place_and_reports():
    torch.manual_seed(0)
    model = Block().eval()
    x, x30 = rand_x(2, 3, 64), rand_x(2, 3, 30, seed=2)
    with torch.no_grad():
        float_out = model(x, x30)
    returned = torch_bridge.quantize_model(model, scheme="w8a16", block_size=32,
                                           filter_fn=lambda name, m: name != "up")
    assert returned is model
    report = torch_bridge.quantization_report(model)
    assert report is torch_bridge.quantization_report()
    assert isinstance(model.head, XlaQuantizedLinear) and model.shared is model.head
    assert type(model.up) is torch.nn.Linear and type(model.odd) is torch.nn.Linear
    assert type(model.attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    assert [s.name for s in report.swapped] == ["head"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {
        "up": "filter_fn returned False",
        "odd": "in_features=30 is not divisible by block_size=32",
        "attn.out_proj": "owned by nn.MultiheadAttention, which reads its .weight directly"}
    head = report.swapped[0]
    assert (head.bytes_before, head.bytes_after) == (96 * 16 * 4, 96 * 16 + 3 * 16 * 4)
    assert report.bytes_before == head.bytes_before and report.bytes_after == head.bytes_after
    assert report.model_bytes_before - report.model_bytes_after == \
        head.bytes_before - head.bytes_after
    text = str(report)
    assert "scheme=w8a16" in text and "odd: in_features=30" in text
    with torch.no_grad():
        out = model(x, x30)
    # W8A16 blockwise on one layer: a small perturbation of the float output.
    assert torch.nn.functional.cosine_similarity(out.flatten(), float_out.flatten(), 0) > 0.9999


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "w8a8", "w4a8"])
def test_quantize_model_schemes(scheme):
    model = torch.nn.Sequential(float_linear(bias=False), torch.nn.ReLU())
    torch_bridge.quantize_model(model, scheme=scheme, block_size=16, symmetric=False)
    m = model[0]
    assert isinstance(m, XlaQuantizedLinear) and m.scheme == scheme
    assert m.weight.dtype == (torch.uint8 if scheme.startswith("w4") else torch.int8)
    x = rand_x(3, 64)
    check_module(m, x, m(x))


def test_quantize_model_odd_features_int4_and_whole_linear():
    model = torch.nn.Sequential(torch.nn.Linear(33, 8, bias=False))
    torch_bridge.quantize_model(model, scheme="w4a16")
    assert not torch_bridge.quantization_report(model).skipped
    m = model[0]  # odd input features: int4 kept unpacked (int8), as torch_xla stores it
    assert isinstance(m, XlaQuantizedLinear) and m.weight.dtype == torch.int8
    x = rand_x(3, 33)
    check_module(m, x, m(x))
    lone = torch.nn.Linear(8, 8)
    torch_bridge.quantize_model(lone)
    assert torch_bridge.quantization_report(lone).skipped[0].reason.startswith(
        "the model itself is an nn.Linear")


def test_quantize_model_errors():
    model = torch.nn.Sequential(float_linear())
    with pytest.raises(ValueError, match="scheme: expected one of 'w8a16', 'w4a16', 'w8a8', "
                                         "'w4a8', got 'int4'"):
        torch_bridge.quantize_model(model, scheme="int4")
    with pytest.raises(TypeError, match="block_size: expected an int, got float"):
        torch_bridge.quantize_model(model, block_size=32.0)
    with pytest.raises(TypeError, match="filter_fn: expected a callable"):
        torch_bridge.quantize_model(model, filter_fn="0")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got dict"):
        torch_bridge.quantize_model({})
    model = torch.nn.Sequential(float_linear(), torch.nn.ReLU(), float_linear(40, 8))
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="model layer '2': linear: expected a finite weight"):
        torch_bridge.quantize_model(model)
    assert type(model[0]) is torch.nn.Linear  # nothing swapped: checks run first
