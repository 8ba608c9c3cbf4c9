"""Float element formats (API.md section 7) through the PyTorch face: the op's
`formats` overload (weight_format / activation_format after torch_xla's
arguments) on CPU tensors, XLA tensors and under torch.compile; fp8 weights as
torch.float8_e4m3fn, fp4 as uint8 packed codes or torch.float4_e2m1fn_x2;
autograd; XlaQuantizedLinear holding fp8/fp4 weights; quantize_model's float
schemes; state_dict, safetensors (save_torch / load_torch) and load_quantized
round trips; the CLI's float schemes; bad input.

Numerics are checked against tests/numpy_reference.py's float64 statement of
section 7 (e4m3fn / e2m1 decoded from their bit fields, the fp8 activation
rule) with its derived bound (`tolerance`: half an ulp of the output
dtype plus float32 accumulation of the products; fp8 x fp8 and bf16 x fp8
products are exact in float32).
"""

import copy
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import numpy_reference as ref
import torch_bridge
import xla_qops
from torch_bridge import op as bridge_op
from torch_bridge.checkpoint import load_torch, save_torch

from conftest import HAVE_TORCH_XLA

if HAVE_TORCH_XLA:  # the XLA-device tests (marked torch_xla); the rest run on any torch
    import torch_xla

    # Start the XLA runtime at collection, before any backward pass in this
    # process (see tests/test_torch_op.py: torch's autograd engine sizes its
    # per-device queues on the first backward).
    torch_xla.device()

needs_torch_xla = pytest.mark.torch_xla

K, N = 128, 48
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FLOAT4_X2 = getattr(torch, "float4_e2m1fn_x2", None)


# ---------------------------------------------------------------------- helpers

def to_numpy(t):
    """torch -> numpy with the dtype kept (bfloat16 and float8_e4m3fn via ml_dtypes)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if FLOAT4_X2 is not None and t.dtype == FLOAT4_X2:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def weight_tensor(a) -> torch.Tensor:
    """A QuantizedWeight's `w` as a torch tensor of the same dtype and bytes."""
    a = np.array(a)
    if a.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(a)


def make_qw(fmt, block_size=-1, n=N, k=K, seed=0):
    """A QuantizedWeight in `fmt`: "fp8", "mxfp4", "nvfp4" (float grids) or "int8"/"int4"."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    if fmt.startswith("int"):
        return xla_qops.quantize_weight(w, bits=int(fmt[3:]), block_size=block_size)
    return xla_qops.quantize_weight(w, format=fmt, block_size=block_size)


def tensors(qw):
    """(w, scale) torch CPU tensors of `qw`."""
    return weight_tensor(qw.w), torch.from_numpy(np.array(qw.scale))


def make_x(shape, dtype="float32", seed=1):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(TORCH_DTYPES[dtype])


def act_format_of(qw, quantize_activation, activation_format):
    if not quantize_activation:
        return None
    return activation_format or ("fp8" if qw.format != "int" else "int8")


def check(y, x, qw, quantize_activation=False, activation_format=None):
    """y against the float64 statement of section 7, within its derived bound
    (numpy_reference.assert_close: half an ulp of y's dtype plus float32 accumulation)."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qw.out_features)
    af = act_format_of(qw, quantize_activation, activation_format)
    ref.assert_close(to_numpy(y), to_numpy(x), np.asarray(qw.w), np.asarray(qw.scale), None,
                     qw.block_size, af is not None, weight_format=qw.weight_format,
                     activation_format=af)


def op(*args, **kwargs):
    return torch.ops.xla.quantized_matmul(*args, **kwargs)


# (quantize_weight format, block_size, quantize_activation, activation_format)
CASES = [
    ("fp8", -1, False, None), ("fp8", 32, False, None),
    ("mxfp4", 32, False, None), ("nvfp4", 16, False, None),
    ("fp8", -1, True, None), ("fp8", 32, True, None), ("mxfp4", 32, True, None),
    ("nvfp4", 16, True, None),
    ("int4", 32, True, "fp8"), ("int8", -1, True, "fp8"), ("int4", -1, True, "fp8"),
]
IDS = [f"{f}-b{b}-{'a8' if qa else 'a16'}{'-' + af if af else ''}" for f, b, qa, af in CASES]


def format_kwargs(qw, quantize_activation, activation_format):
    """The op's keyword arguments for `qw` (fp8 is inferred from its dtype; fp4 named)."""
    kw = dict(block_size=qw.block_size, int4_weight=qw.bits == 4 and qw.format == "int",
              quantize_activation=quantize_activation)
    if qw.format == "fp4":
        kw["weight_format"] = "fp4"
    if activation_format is not None:
        kw["activation_format"] = activation_format
    return kw


# ------------------------------------------------------------------ the op, CPU

@pytest.mark.parametrize("impl", ["auto", "xla", "reference"])
@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("fmt, block_size, qa, af", CASES, ids=IDS)
def test_cpu_matches_the_float64_statement(fmt, block_size, qa, af, x_dtype, impl):
    qw = make_qw(fmt, block_size)
    w, scale = tensors(qw)
    x = make_x((2, 3, K), x_dtype)
    kw = format_kwargs(qw, qa, af)
    if impl != "auto":
        kw["impl"] = impl
    y = op(x, w, scale, **kw)
    check(y, x, qw, qa, af)


def test_positional_weight_format_is_the_eighth_argument():
    """API.md section 7: the formats follow torch_xla's seven arguments."""
    qw = make_qw("mxfp4", 32)
    w, scale = tensors(qw)
    x = make_x((3, K))
    by_keyword = op(x, w, scale, block_size=32, weight_format="fp4")
    by_position = op(x, w, scale, None, 32, False, False, "fp4")
    overload = torch.ops.xla.quantized_matmul.formats(x, w, scale, None, 32, False, False,
                                                      "fp4", None, "auto")
    assert torch.equal(by_keyword, by_position) and torch.equal(by_keyword, overload)
    a8 = op(x, w, scale, None, 32, False, True, "fp4", "fp8")
    check(a8, x, qw, True, "fp8")


def test_default_and_with_impl_overloads_are_unchanged():
    """torch_xla's default schema has exactly its seven arguments; with_impl keeps
    impl as its eighth; impl= next to the formats is a keyword of `formats`."""
    packet = torch.ops.xla.quantized_matmul
    default = [a.name for a in packet.default._schema.arguments]
    assert default == ["x", "w", "scale", "zero_point", "block_size", "int4_weight",
                       "quantize_activation"]
    assert [a.name for a in packet.with_impl._schema.arguments] == default + ["impl"]
    assert [a.name for a in packet.formats._schema.arguments] == default + [
        "weight_format", "activation_format", "impl"]
    qw = make_qw("fp8", 32)
    w, scale = tensors(qw)
    x = make_x((3, K))
    y = op(x, w, scale, block_size=32, weight_format="fp8", impl="reference")
    check(y, x, qw)
    int8 = make_qw("int8", 32)
    wi, si = tensors(int8)
    assert torch.equal(packet.with_impl(x, wi, si, None, 32, False, False, "xla"),
                       op(x, wi, si, block_size=32, impl="xla"))


@pytest.mark.skipif(FLOAT4_X2 is None, reason="torch without float4_e2m1fn_x2")
def test_float4_x2_tensor_is_the_packed_uint8_form():
    qw = make_qw("nvfp4", 16)
    w, scale = tensors(qw)
    x = make_x((4, K), "bfloat16")
    w4 = w.view(FLOAT4_X2)
    assert w4.shape == w.shape
    as_uint8 = op(x, w, scale, block_size=16, weight_format="fp4")
    assert torch.equal(op(x, w4, scale, block_size=16), as_uint8)  # fp4 by its dtype
    assert torch.equal(op(x, w4, scale, block_size=16, weight_format="fp4"), as_uint8)
    assert torch.equal(op(x, w4, scale, block_size=16, impl="xla"), as_uint8)
    with pytest.raises(TypeError, match=r"w: a torch.float4_e2m1fn_x2 tensor holds e2m1 codes "
                                        r"\(weight_format='fp4'\), got weight_format='int4'"):
        op(x, w4, scale, block_size=16, int4_weight=True, weight_format="int4")


@pytest.mark.parametrize("fmt, block_size", [("fp8", -1), ("nvfp4", 16)])
def test_direct_cpu_route_only_where_the_kernels_support_it(fmt, block_size, monkeypatch):
    """CPU tensors go straight to the C++ kernels exactly when
    custom_call.supports says so; otherwise through JAX, with the same result."""
    from torch_bridge import _cpu_ops
    from xla_qops.backends import custom_call

    qw = make_qw(fmt, block_size)
    w, scale = tensors(qw)
    x = make_x((3, K))
    kw = format_kwargs(qw, False, None)
    spec = bridge_op.check(x, w, scale, None, qw.block_size, kw["int4_weight"], False,
                           weight_format=kw.get("weight_format"))
    calls = []
    real = _cpu_ops.matmul
    monkeypatch.setattr(_cpu_ops, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = op(x, w, scale, **kw)
    assert bool(calls) == (_cpu_ops.available() and custom_call.supports(spec, "cpu"))
    check(y, x, qw)
    calls.clear()
    monkeypatch.setattr(custom_call, "supports", lambda spec, platform: False)
    y_jax = op(x, w, scale, **kw)
    assert not calls
    check(y_jax, x, qw)


def test_fake_kernel_and_meta_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    qw = make_qw("mxfp4", 32)
    w, scale = tensors(qw)
    x = make_x((2, 5, K), "bfloat16")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, w, scale)]
        y = op(*fake, block_size=32, weight_format="fp4", quantize_activation=True)
    assert y.shape == (2, 5, N) and y.dtype == torch.bfloat16
    w8, s8 = tensors(make_qw("fp8"))
    meta = op(x.to("meta"), w8.to("meta"), s8.to("meta"))
    assert meta.shape == (2, 5, N) and meta.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt, block_size", [("fp8", 32), ("nvfp4", 16)])
def test_opcheck_formats_overload(fmt, block_size):
    """torch.library.opcheck: schema, fake kernel, autograd registration and AOT
    dispatch of the `formats` overload with a float weight."""
    qw = make_qw(fmt, block_size, n=24, k=64)
    w, scale = tensors(qw)
    x = make_x((2, 3, 64)).requires_grad_()
    wf = "fp4" if qw.format == "fp4" else None
    # test_schema multiplies every input tensor to detect mutation, which torch has
    # no CPU kernel for on float8; the other checks run for fp8 (and all for fp4).
    kwargs = {}
    if fmt == "fp8":
        kwargs["test_utils"] = ("test_autograd_registration", "test_faketensor",
                                "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.xla.quantized_matmul.formats,
                          (x, w, scale.requires_grad_(), None, block_size, False, False, wf,
                           None, "auto"), **kwargs)


# --------------------------------------------------------------------- autograd

def grads_reference(x, qw, g):
    """float64 dx and dscale of sum(g * y), y = x @ (scale * value(q)).T (activation
    quantization straight-through, as xla_qops' VJP)."""
    v = ref.dequantize_float(np.asarray(qw.w), np.ones(np.shape(qw.scale)), qw.weight_format,
                             qw.block_size)  # value(q) as [out, in]
    s = np.asarray(qw.scale, np.float64).reshape(-1, qw.out_features)  # [groups, out]
    group = K if qw.block_size == -1 else qw.block_size
    s_k = np.repeat(s, group, axis=0).T  # [out, in]
    x2 = np.asarray(to_numpy(x), np.float64).reshape(-1, K)
    g2 = np.asarray(to_numpy(g), np.float64).reshape(-1, qw.out_features)
    dx = g2 @ (s_k * v)
    per_group = np.stack([g2.T @ x2[:, i * group:(i + 1) * group] for i in range(K // group)])
    dscale = np.stack([(per_group[i] * v[:, i * group:(i + 1) * group]).sum(-1)
                       for i in range(K // group)])  # [groups, out]
    abs_dx = np.abs(g2) @ np.abs(s_k * v)
    abs_ds = np.stack([(np.abs(g2).T @ np.abs(x2[:, i * group:(i + 1) * group])
                        * np.abs(v[:, i * group:(i + 1) * group])).sum(-1)
                       for i in range(K // group)])
    return dx, abs_dx, dscale.reshape(np.shape(qw.scale)), abs_ds.reshape(np.shape(qw.scale))


def _within(got, want, abs_terms, n_terms):
    """float32 accumulation of n terms: (n + 2) * 2^-24 * sum |terms| (numpy_reference's
    worst-case bound), plus the float32 rounding of the result."""
    bound = (n_terms + 2) * 2.0 ** -24 * abs_terms + 2.0 ** -24 * np.abs(want) + 1e-30
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


DEVICES = ["cpu", pytest.param("xla", marks=needs_torch_xla)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt, block_size, qa", [("fp8", -1, False), ("fp8", 32, True),
                                                 ("mxfp4", 32, False), ("nvfp4", 16, True)])
def test_autograd_x_and_scale(fmt, block_size, qa, device):
    dev = torch_xla.device() if device == "xla" else "cpu"
    qw = make_qw(fmt, block_size)
    w, scale = tensors(qw)
    x = make_x((2, 3, K))
    g = make_x((2, 3, N), seed=7)
    xd = x.to(dev).requires_grad_()
    sd = scale.to(dev).requires_grad_()
    y = op(xd, w.to(dev), sd, **format_kwargs(qw, qa, None))
    (y * g.to(dev)).sum().backward()
    dx, abs_dx, ds, abs_ds = grads_reference(x, qw, g)
    _within(xd.grad.cpu().numpy(), dx.reshape(x.shape), abs_dx.reshape(x.shape), N)
    _within(sd.grad.cpu().numpy(), ds, abs_ds, 6 * (K if block_size == -1 else block_size))


# -------------------------------------------------------------- the op, XLA device

@needs_torch_xla
@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("fmt, block_size, qa, af", CASES, ids=IDS)
def test_xla_device_matches_the_float64_statement(fmt, block_size, qa, af, x_dtype):
    xla = torch_xla.device()
    qw = make_qw(fmt, block_size)
    w, scale = tensors(qw)
    x = make_x((3, K), x_dtype)
    y = op(x.to(xla), w.to(xla), scale.to(xla), **format_kwargs(qw, qa, af))
    torch_xla.sync()
    assert y.device.type == "xla"
    check(y.cpu(), x, qw, qa, af)


@needs_torch_xla
@pytest.mark.skipif(FLOAT4_X2 is None, reason="torch without float4_e2m1fn_x2")
def test_xla_device_float4_x2_weight():
    xla = torch_xla.device()
    qw = make_qw("mxfp4", 32)
    w, scale = tensors(qw)
    x = make_x((3, K))
    try:
        w4 = w.view(FLOAT4_X2).to(xla)
    except (RuntimeError, TypeError, KeyError):
        # torch_xla 2.9 cannot hold float4_e2m1fn_x2 tensors ("Type not
        # supported"): the same bytes as uint8 with weight_format="fp4" are the
        # route there (docs/torch.md).
        y = op(x.to(xla), w.to(xla), scale.to(xla), block_size=32, weight_format="fp4")
    else:
        y = op(x.to(xla), w4, scale.to(xla), block_size=32)
    check(y.cpu(), x, qw)


def _model(scheme, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(),
                                torch.nn.Linear(96, 32, bias=False)).to(dtype).eval()
    return torch_bridge.quantize_model(model, scheme=scheme, **kw)


FLOAT_SCHEMES = ["w8a16-fp8", "w8a8-fp8", "w4a16-mxfp4", "w4a16-nvfp4", "w4a8-fp8"]


@needs_torch_xla
@pytest.mark.parametrize("scheme", FLOAT_SCHEMES)
def test_compile_openxla_fullgraph(scheme):
    from torch._dynamo.utils import counters
    xla = torch_xla.device()
    model = _model(scheme, block_size=32 if scheme != "w4a16-nvfp4" else -1)
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
        model_x = model.to(xla)
        eager_xla = model_x(x.to(xla)).cpu()
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model_x, backend="openxla", fullgraph=True)
        first = compiled(x.to(xla)).cpu()
        again = compiled(x.to(xla)).cpu()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(first, eager_xla) and torch.equal(again, eager_xla)
    # The XLA device and the CPU route compute the same products (float32 sums in
    # another order): GELU in between, so a relative closeness.
    torch.testing.assert_close(eager_xla, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", FLOAT_SCHEMES)
def test_compile_cpu_tensors(scheme):
    from torch._dynamo.utils import counters
    model = _model(scheme)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        y = compiled(x)
    assert dict(counters["graph_break"]) == {}
    torch.testing.assert_close(y, expected)


# ----------------------------------------------------------------------- module

def _layer(module):
    """The module's weight as the QuantizedWeight it holds."""
    return xla_qops.QuantizedWeight(
        w=jnp.asarray(to_numpy(module.weight)), scale=jnp.asarray(to_numpy(module.weight_scaler)),
        zero_point=None, bits=4 if module.int4_weight else 8, block_size=module.block_size,
        packed=module.packed, format=module.weight_format if module.float_weight else "int")


@pytest.mark.parametrize("fmt, block_size, dtype", [
    ("fp8", -1, torch.float8_e4m3fn), ("fp8", 32, torch.float8_e4m3fn),
    ("mxfp4", 32, torch.uint8), ("nvfp4", 16, torch.uint8)])
@pytest.mark.parametrize("qa", [False, True])
def test_module_from_quantized_holds_the_format(fmt, block_size, dtype, qa):
    qw = make_qw(fmt, block_size)
    m = torch_bridge.XlaQuantizedLinear.from_quantized(qw, quantize_activation=qa)
    assert m.weight.dtype == dtype and tuple(m.weight.shape) == tuple(qw.w.shape)
    assert m.zero_point is None and m.is_symmetric
    assert m.weight_format == qw.weight_format
    assert m.activation_format == ("fp8" if qa else None)
    assert set(m.state_dict()) == {"weight", "weight_scaler"}
    np.testing.assert_array_equal(to_numpy(m.weight).view(np.uint8),
                                  np.asarray(qw.w).view(np.uint8))
    assert m.scheme == {("fp8", False): "w8a16-fp8", ("fp8", True): "w8a8-fp8",
                        ("fp4", False): "w4a16-fp4", ("fp4", True): "w4a8-fp4"}[
                            (qw.weight_format, qa)]
    x = make_x((2, 4, K), "bfloat16")
    with torch.no_grad():
        y = m(x)
    check(y, x, qw, qa)
    # The same through the op by hand, and with gradients (the JAX route).
    w, scale = tensors(qw)
    assert torch.equal(y, op(x, w, scale, **format_kwargs(qw, qa, None)))
    xg = x.clone().requires_grad_()
    m(xg).float().sum().backward()
    assert xg.grad.shape == x.shape


def test_module_int4_weights_with_fp8_activations():
    qw = make_qw("int4", 32)
    m = torch_bridge.XlaQuantizedLinear.from_quantized(qw, quantize_activation=True,
                                                       activation_format="fp8")
    assert m.scheme == "w4a8-fp8" and m.weight.dtype == torch.uint8
    x = make_x((3, K))
    with torch.no_grad():
        check(m(x), x, qw, True, "fp8")


def test_module_state_dict_round_trip_exact():
    for fmt, block_size in (("fp8", 32), ("nvfp4", 16)):
        src = torch_bridge.XlaQuantizedLinear.from_quantized(make_qw(fmt, block_size),
                                                            quantize_activation=True, bias=None)
        fresh = torch_bridge.XlaQuantizedLinear(
            K, N, block_size=block_size, quantize_activation=True,
            weight_format="fp8" if fmt == "fp8" else "fp4")
        assert fresh.weight.dtype == src.weight.dtype
        fresh.load_state_dict(src.state_dict())
        for name in ("weight", "weight_scaler"):
            a, b = getattr(src, name), getattr(fresh, name)
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype ==
                                                      torch.float8_e4m3fn else a,
                                                      b.view(torch.uint8) if b.dtype ==
                                                      torch.float8_e4m3fn else b)
        x = make_x((3, K))
        with torch.no_grad():
            assert torch.equal(fresh(x), src(x))


def test_module_survives_dtype_casts_and_copies():
    m = torch_bridge.XlaQuantizedLinear.from_quantized(make_qw("fp8", 32), bias=torch.zeros(N))
    before = m.weight.view(torch.uint8).clone()
    m.to(torch.bfloat16)
    assert m.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(m.weight.view(torch.uint8), before)
    m.half()
    assert m.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(m.weight.view(torch.uint8), before)
    clone = copy.deepcopy(m)
    x = make_x((2, K), "float16")
    with torch.no_grad():
        assert torch.equal(clone(x), m(x))


@pytest.mark.skipif(FLOAT4_X2 is None, reason="torch without float4_e2m1fn_x2")
def test_module_loads_float4_x2_as_uint8():
    qw = make_qw("mxfp4", 32)
    w, scale = tensors(qw)
    m = torch_bridge.XlaQuantizedLinear(K, N, block_size=32, weight_format="fp4")
    m.load_quantized_weight(w.view(FLOAT4_X2), scale)
    assert m.weight.dtype == torch.uint8 and torch.equal(m.weight, w)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: torch_bridge.XlaQuantizedLinear(K, N, weight_format="fp8").load_quantized_weight(
        torch.zeros(N, K, dtype=torch.float8_e4m3fn), torch.ones(N), torch.zeros(N)),
     ValueError, r"zero_point: XlaQuantizedLinear\(.*weight_format='fp8'\) holds a float format, "
                 r"which is symmetric"),
    (lambda: torch_bridge.XlaQuantizedLinear(K, N, weight_format="fp8").load_quantized_weight(
        torch.zeros(N, K, dtype=torch.int8), torch.ones(N)),
     TypeError, r"weight: XlaQuantizedLinear\(.*\) expects torch.float8_e4m3fn weights, got "
                r"torch.int8"),
    (lambda: torch_bridge.XlaQuantizedLinear(K, N, weight_format="fp4").load_quantized_weight(
        torch.zeros(N, K, dtype=torch.uint8), torch.ones(N)),
     ValueError, r"weight: XlaQuantizedLinear\(.*\) expects shape \[48, 64\], got \[48, 128\]"),
    (lambda: torch_bridge.XlaQuantizedLinear(K, N, weight_format="e4m3"),
     ValueError, "weight_format: expected None or one of 'int8', 'int4', 'fp8', 'fp4', got 'e4m3'"),
    (lambda: torch_bridge.XlaQuantizedLinear(K, N, weight_format="fp8", int4_weight=True),
     ValueError, "int4_weight: True says 4-bit values, but weight_format='fp8' is 8-bit"),
    (lambda: torch_bridge.XlaQuantizedLinear(K, N, activation_format="fp8"),
     ValueError, "activation_format: applies with quantize_activation=True"),
    (lambda: torch_bridge.XlaQuantizedLinear(63, N, weight_format="fp4"),
     ValueError, "input_dim: fp4 \\(e2m1\\) codes are stored packed two per byte"),
    (lambda: torch_bridge.XlaQuantizedLinear(K, N, weight_format="fp8").load_quantized_weight(
        make_qw("nvfp4", 16)),
     ValueError, "weight: this module holds weight_format='fp8', the QuantizedWeight 'fp4'"),
])
def test_module_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_module_state_dict_with_zero_point_is_refused():
    m = torch_bridge.XlaQuantizedLinear.from_quantized(make_qw("fp8"))
    state = dict(m.state_dict(), zero_point=torch.zeros(N))
    with pytest.raises(RuntimeError, match="zero_point: .* symmetric"):
        m.load_state_dict(state)


# --------------------------------------------------------------- quantize_model

@pytest.mark.parametrize("scheme, weight_format, activation_format, block_size", [
    ("w8a16-fp8", "fp8", None, -1), ("w8a8-fp8", "fp8", "fp8", 32),
    ("w4a16-mxfp4", "fp4", None, 32), ("w4a16-nvfp4", "fp4", None, 16),
    ("w4a8-fp8", "int4", "fp8", 32)])
def test_quantize_model_float_schemes(scheme, weight_format, activation_format, block_size):
    requested = -1 if scheme in ("w4a16-mxfp4", "w4a16-nvfp4") else block_size
    model = _model(scheme, block_size=requested)
    report = torch_bridge.quantization_report(model)
    assert report.scheme == scheme and len(report.swapped) == 2
    assert report.bytes_after < report.bytes_before
    for i in (0, 2):
        m = model[i]
        assert isinstance(m, torch_bridge.XlaQuantizedLinear)
        assert (m.weight_format, m.activation_format, m.block_size) == (
            weight_format, activation_format, block_size)
        assert m.zero_point is None
        assert m.weight.dtype == (torch.float8_e4m3fn if weight_format == "fp8" else torch.uint8)
    # Each layer against the float64 statement, on the inputs it really gets.
    x = make_x((3, 64))
    with torch.no_grad():
        h = model[1](model[0](x))
        first = model[0]
        y0 = first(x) - first.bias
        y2 = model[2](h)
    check_bias_free(y0, x, first)
    check(y2, h, _layer(model[2]), activation_format is not None, activation_format)
    # Layer 0 quantized the way quantize_weight does it.
    qw = _layer(first)
    if weight_format != "int4":
        torch.manual_seed(0)
        float_w = torch.nn.Linear(64, 96).weight.detach().numpy()
        fmt = scheme.split("-")[1]
        again = xla_qops.quantize_weight(float_w, format=fmt, block_size=requested)
        np.testing.assert_array_equal(np.asarray(again.w).view(np.uint8),
                                      np.asarray(qw.w).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(again.scale), np.asarray(qw.scale))


def check_bias_free(y, x, module):
    """y = x @ W^T without the bias, against the statement (the bias add is exact
    enough to remove again only approximately, so compare within float32 rounding)."""
    qw = _layer(module)
    af = module.activation_format
    want = ref.quantized_matmul_formats(np.asarray(to_numpy(x), np.float32), np.asarray(qw.w),
                                        np.asarray(qw.scale), None, qw.block_size,
                                        weight_format=qw.weight_format, activation_format=af)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_quantize_model_state_dict_round_trip_into_a_fresh_model():
    src = _model("w4a16-nvfp4")
    dst = _model("w4a16-nvfp4")  # same architecture, same schemes
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    dst.load_state_dict(src.state_dict())
    for k, v in src.state_dict().items():
        got = dst.state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    x = make_x((2, 64))
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_quantize_model_smoothquant_with_fp8_activations():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 32)).eval()
    calibration = [torch.randn(4, 64) for _ in range(2)]
    torch_bridge.quantize_model(model, scheme="w8a8-fp8", smoothing="smoothquant",
                                calibration=calibration, progress=False)
    m = model[1]
    assert m.weight_format == "fp8" and m.activation_format == "fp8"
    report = torch_bridge.quantization_report(model)
    assert report.swapped[0].weight_error < 0.05


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"scheme": "w8a16-fp4"}, ValueError,
     "scheme: expected one of 'w8a16', 'w4a16', 'w8a8', 'w4a8', got 'w8a16-fp4' \\(or, with "
     "float element formats, one of 'w8a16-fp8', 'w8a8-fp8', 'w4a16-mxfp4', 'w4a16-nvfp4', "
     "'w4a8-fp8'\\)"),
    ({"scheme": "w8a16-fp8", "symmetric": False}, ValueError,
     "symmetric: scheme='w8a16-fp8' has float weights, which are symmetric"),
    ({"scheme": "w4a16-mxfp4", "method": "hqq"}, ValueError,
     "method: scheme='w4a16-mxfp4' rounds to nearest even onto its float grid"),
    ({"scheme": "w4a16-nvfp4", "block_size": 32}, ValueError,
     "block_size: scheme='w4a16-nvfp4' has blocks of 16, got 32 \\(NVFP4\\)"),
    ({"scheme": "w4a16-mxfp4", "block_size": 7}, ValueError,
     "block_size: e2m1 codes are stored in pairs inside a block"),
])
def test_quantize_model_bad_arguments_leave_the_model_alone(kwargs, exc, match):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(exc, match=match):
        torch_bridge.quantize_model(model, **kwargs)
    assert isinstance(model[0], torch.nn.Linear)


# ---------------------------------------------------------- checkpoints, CLI

def test_save_torch_load_torch_round_trip(tmp_path):
    model = _model("w8a8-fp8", block_size=32)
    torch_bridge.quantize_model(model, scheme="w4a16-nvfp4")  # nothing left: no-op
    path = tmp_path / "model.safetensors"
    save_torch(model, path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    assert header["0.weight"]["dtype"] == "F8_E4M3"
    assert "0.zero_point" not in header
    schemes = json.loads(header["__metadata__"]["xla_qops.schemes"])
    assert schemes["0"]["weight_format"] == "fp8" and schemes["0"]["activation_format"] == "fp8"
    assert schemes["0"]["scheme"] == "w8a8-fp8"
    fresh = _model("w8a8-fp8", block_size=32)
    state, loaded = load_torch(path, fresh)
    assert loaded["0"].weight_format == "fp8" and loaded["2"].scheme == "w8a8-fp8"
    fresh.load_state_dict(state)
    for k, v in model.state_dict().items():
        got = fresh.state_dict()[k]
        assert got.dtype == v.dtype
        assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)) if v.dtype == \
            torch.float8_e4m3fn else torch.equal(got, v)


def test_save_torch_fp4_model_loads_with_xla_qops_checkpoint(tmp_path):
    from xla_qops import checkpoint
    model = _model("w4a16-mxfp4")
    path = tmp_path / "model.safetensors"
    save_torch(model, path)
    loaded = checkpoint.load_quantized(path)
    qw = loaded.weights["0"]
    assert qw.format == "fp4" and qw.block_size == 32 and qw.zero_point is None
    np.testing.assert_array_equal(np.asarray(qw.w), model[0].weight.numpy())
    assert loaded.schemes["0"].scheme == "w4a16-fp4"
    # Rebuilt as a module: the same layer.
    rebuilt = torch_bridge.XlaQuantizedLinear.from_quantized(qw, bias=model[0].bias)
    x = make_x((2, 64))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model[0](x))


def test_load_quantized_native_fp8_checkpoint(tmp_path):
    """A native fp8 checkpoint (quant_method "fp8", 128 x 128 block scales) swapped into
    a float model: the layer holds the checkpoint's float8_e4m3fn bytes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    out_f, in_f = 96, 256
    w8 = np.clip(rng.standard_normal((out_f, in_f)) * 100, -448, 448).astype(
        ml_dtypes.float8_e4m3fn)
    scale_inv = rng.uniform(1e-3, 2e-3, (1, 2)).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    save_file({"0.weight": w8, "0.weight_scale_inv": scale_inv, "0.bias": bias},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128],
        "activation_scheme": "dynamic"}}))
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f))
    report = torch_bridge.load_quantized(model, str(tmp_path))
    m = model[0]
    assert isinstance(m, torch_bridge.XlaQuantizedLinear)
    assert m.weight_format == "fp8" and m.weight.dtype == torch.float8_e4m3fn
    assert m.block_size == 128 and m.zero_point is None
    np.testing.assert_array_equal(m.weight.view(torch.uint8).numpy().reshape(2, 128, out_f),
                                  w8.view(np.uint8).T.reshape(2, 128, out_f))
    # Each 128 x 128 block's scale repeated over its output rows (blockwise B = 128).
    np.testing.assert_array_equal(m.weight_scaler.numpy(), np.broadcast_to(scale_inv.T, (2, out_f)))
    assert report.swapped["0"] == m.scheme
    assert m.scheme in ("w8a16-fp8", "w8a8-fp8")
    x = make_x((2, in_f))
    with torch.no_grad():
        y = m(x)
    want = ref.quantized_matmul_formats(
        x.numpy(), np.asarray(_layer(m).w), m.weight_scaler.numpy(), None, 128,
        weight_format="fp8", activation_format=m.activation_format)
    np.testing.assert_allclose(y.numpy(), want + bias, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("scheme, fmt", [("w8a16-fp8", "fp8"), ("w4a16-nvfp4", "fp4"),
                                         ("w4a8-fp8", "int4"), ("w4a16-mxfp4", "fp4")])
def test_cli_quantize_float_schemes(tmp_path, scheme, fmt, capsys):
    from safetensors.numpy import save_file
    from xla_qops import checkpoint
    from xla_qops_app.cli import main

    rng = np.random.default_rng(0)
    src = tmp_path / "model.safetensors"
    w = rng.standard_normal((48, 64)).astype(np.float32)
    save_file({"layer.weight": w, "layer.bias": np.zeros(48, np.float32),
               "norm.weight": np.ones(64, np.float32)}, str(src))
    out = tmp_path / "q.safetensors"
    assert main(["quantize", str(src), str(out), "--scheme", scheme, "--no-progress"]) == 0
    loaded = checkpoint.load_quantized(out)
    qw = loaded.weights["layer"]
    s = loaded.schemes["layer"]
    assert qw.weight_format == fmt and s.weight_format == fmt
    assert s.activation_format == ("fp8" if scheme in ("w8a8-fp8", "w4a8-fp8") else None)
    if fmt != "int4":
        expected = xla_qops.quantize_weight(w, format=scheme.split("-")[1],
                                            block_size={"w4a16-nvfp4": 16,
                                                        "w4a16-mxfp4": 32}.get(scheme, -1))
        np.testing.assert_array_equal(np.asarray(qw.w).view(np.uint8),
                                      np.asarray(expected.w).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(qw.scale), np.asarray(expected.scale))
    # The file loads into a module-swapped torch model.
    model = torch.nn.Sequential()
    model.add_module("layer", torch.nn.Linear(64, 48))
    torch_bridge.quantize_model(model, scheme=scheme)  # the CLI's block sizes
    state, _ = load_torch(out, None)
    state.pop("norm.weight")
    model.load_state_dict(state)
    assert model.layer.weight_format == fmt


@pytest.mark.parametrize("args, match", [
    (["--scheme", "w8a16-fp8", "--asymmetric"], "asymmetric: scheme w8a16-fp8 has float weights"),
    (["--scheme", "w4a16-nvfp4", "--block-size", "32"],
     "block-size: scheme w4a16-nvfp4 has blocks of 16"),
    (["--scheme", "w4a8-fp8", "--format", "compressed-tensors"],
     "format: compressed-tensors output is written for the int schemes"),
])
def test_cli_quantize_float_scheme_errors(tmp_path, args, match):
    from safetensors.numpy import save_file
    from xla_qops_app.commands.quantize import quantize_file

    src = tmp_path / "model.safetensors"
    save_file({"layer.weight": np.ones((8, 64), np.float32)}, str(src))
    options = dict(scheme=args[1])
    if "--asymmetric" in args:
        options["symmetric"] = False
    if "--block-size" in args:
        options["block_size"] = int(args[args.index("--block-size") + 1])
    if "--format" in args:
        options["format"] = args[args.index("--format") + 1]
    with pytest.raises(ValueError, match=match):
        quantize_file(str(src), str(tmp_path / "out"), progress=False, **options)


# ----------------------------------------------------------------- bad input

FP8_W = torch.ones(N, K, dtype=torch.float8_e4m3fn)
FP4_W = torch.ones(N, K // 2, dtype=torch.uint8)
S = torch.ones(N)
X = torch.ones(2, K, dtype=torch.bfloat16)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((X, FP8_W, S, S), {}, ValueError, "zero_point: the float formats are symmetric"),
    ((X, FP4_W, S, S), {"weight_format": "fp4"}, ValueError,
     "zero_point: the float formats are symmetric"),
    ((X, torch.ones(N, K, dtype=torch.int8), S), {"weight_format": "fp8"}, TypeError,
     "w: weight_format='fp8' is stored as float8_e4m3fn, got int8"),
    ((X, FP8_W, S), {"weight_format": "fp4"}, TypeError,
     r"w: weight_format='fp4' is stored as uint8 .* got float8_e4m3fn"),
    ((X, FP8_W, S), {"weight_format": "e4m3"}, ValueError,
     "weight_format: expected None or one of 'int8', 'int4', 'fp8', 'fp4', got 'e4m3'"),
    ((X, FP8_W, S), {"activation_format": "fp8"}, ValueError,
     "activation_format: applies with quantize_activation=True"),
    ((X, FP8_W, S), {"quantize_activation": True, "activation_format": "int4"}, ValueError,
     "activation_format: expected None or one of 'int8', 'fp8', got 'int4'"),
    ((torch.ones(2, 63), torch.ones(N, 31, dtype=torch.uint8), S), {"weight_format": "fp4"},
     ValueError, r"x: packed fp4 \(e2m1\) weights need an even number of input features"),
    ((X, FP8_W[:, :64], S), {}, ValueError, r"w: expected shape \[48, 128\]"),
    ((X, FP8_W, S), {"weight_format": "fp8", "impl": "magic"}, ValueError, "impl"),
])
def test_bad_input_clear_error_eager_and_fake(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        op(*args, **kwargs)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(exc, match=match):
        op(*(mode.from_tensor(t) for t in args), **kwargs)


@pytest.mark.parametrize("scheme", ["w8a16-fp8", "w4a16-nvfp4", "w8a8-fp8"])
@pytest.mark.torchax
def test_torchax_traces_float_format_modules(scheme):
    """torch_bridge.register_with_torchax covers the `formats` overload: a
    quantized model runs as one jitted JAX function with eager's result."""
    import torchax
    import jax

    torch_bridge.register_with_torchax()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(),
                                torch.nn.Linear(48, 32)).eval()
    torch_bridge.quantize_model(model, scheme=scheme, block_size=16)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    env = torchax.default_env()
    params, func = torchax.extract_jax(model, env)
    got = jax.jit(lambda p, x: func(p, (x,)))(params, env.t2j_copy(x))
    got = torch.from_numpy(np.array(got, np.float32))
    # Both are the same float32 formula (XLA inside one jit vs the eager path):
    # equal within float32 accumulation, far below the formats' quantization.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
