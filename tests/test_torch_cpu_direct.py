"""Torch CPU tensors straight into the C++ kernels (torch_bridge._cpu_ops).

* bit-identity with the JAX custom_call path (same kernels) over every
  scheme x activation dtype x odd shapes;
* the module's prepared weight: made once per load, never per call, kept
  through state_dict round trips, .to(), deepcopy and pickling, rebuilt after
  in-place edits;
* inputs as users pass them (strided views, zero tokens, NaN/inf rows), the
  same errors as the generic op, threads and concurrency;
* the drop-in gaps of issue G section 4 (inputs torch_xla's module and op
  take), each against the float64 reference and torch_xla's own CPU formula.
"""

import copy
import dataclasses
import functools
import io
import pickle
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cases
import numpy_reference as ref
import torch_bridge
import xla_qops
from cases import Scheme
from torch_bridge import _cpu_ops
from torch_bridge import _jax_interop as interop
from torch_bridge.linear import XlaQuantizedLinear

from conftest import import_error, torch_ops_expected

# Skipped only where the build does not make the operator (not x86-64); there
# a missing or unimportable _torch_ops fails every test here, and
# test_torch_operator_loads says why.
pytestmark = pytest.mark.skipif(not torch_ops_expected() and not _cpu_ops.available(),
                                reason="torch_bridge._torch_ops is not built on this platform")

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def to_numpy(t):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(jnp.bfloat16)
    return t.numpy()


def torch_weight(qw):
    as_torch = lambda a: None if a is None else torch.from_numpy(np.array(a))
    return as_torch(qw.w), as_torch(qw.scale), as_torch(qw.zero_point)


def rand_x(shape, dtype="bfloat16", seed=1):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(TORCH_DTYPES[dtype])


def op(x, w, s, z, scheme, **kw):
    return torch.ops.xla.quantized_matmul(x, w, s, z, block_size=scheme.block_size,
                                          int4_weight=scheme.bits == 4,
                                          quantize_activation=scheme.quantize_activation, **kw)


@functools.cache
def _jitted_custom_call(block_size, int4_weight, quantize_activation):
    return jax.jit(lambda x, w, s, z: xla_qops.quantized_matmul(
        x, w, s, z, block_size, int4_weight, quantize_activation, impl="custom_call"))


def jax_custom_call(x, w, s, z, scheme):
    """The same product through JAX: the FFI target of impl="custom_call"."""
    f = _jitted_custom_call(scheme.block_size, scheme.bits == 4, scheme.quantize_activation)
    return interop.to_torch(f(interop.to_jax(x), interop.to_jax(w), interop.to_jax(s),
                              None if z is None else interop.to_jax(z)))


def reference_check(y, x, w, s, z, scheme):
    ref.assert_close(to_numpy(y), to_numpy(x), to_numpy(w), to_numpy(s),
                     None if z is None else to_numpy(z), scheme.block_size,
                     scheme.quantize_activation)


def test_torch_operator_loads():
    error = import_error("torch_bridge._torch_ops")
    assert error is None, f"torch_bridge._torch_ops does not import: {error!r}"
    assert _cpu_ops.available()
    assert hasattr(torch.ops.xla_qops_cpu, "quantized_matmul")


# ---------------------------------------------------------------------------
# Bit-identity with the JAX custom_call path

# in = 96 with blocks of 32 (even) and in = 66 with blocks of 33 / per-channel
# (odd pairs: unpacked int4 runs as int8); out = 37 (not a multiple of 64).
SHAPES = [(96, 32), (66, -1), (99, 33)]
BIT_CASES = [Scheme(bits, block, sym, packed, qa)
             for k, block in SHAPES for bits in (8, 4) for sym in (True, False)
             for packed in ((True, False) if bits == 4 and (block if block != -1 else k) % 2 == 0
                            else (False,))
             for qa in (False, True)]
BIT_CASES = [(k, c) for k, block in SHAPES for c in BIT_CASES if c.block_size == block]


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("k,scheme", BIT_CASES, ids=lambda v: getattr(v, "id", str(v)))
def test_bit_identical_to_jax_custom_call(k, scheme, x_dtype):
    qw = cases.make_weight(np.random.default_rng(0), 37, k, scheme)
    w, s, z = torch_weight(qw)
    for rows in (1, 3, 17):
        x = rand_x((rows, k), x_dtype, seed=rows)
        y = op(x, w, s, z, scheme)
        assert torch.equal(y, jax_custom_call(x, w, s, z, scheme)), rows
        reference_check(y, x, w, s, z, scheme)


# The float element formats (API.md section 7): fp8 weights as torch.float8_e4m3fn,
# fp4 as packed uint8 codes; fp8 activations with float and int weights.
FORMAT_CASES = [("fp8", -1, False, None), ("fp8", 32, False, None), ("fp4", -1, False, None),
                ("fp4", 32, False, None), ("fp8", 32, True, "fp8"), ("fp4", 16, True, "fp8"),
                ("fp8", -1, True, "int8"), ("int4", 32, True, "fp8"), ("int8", -1, True, "fp8")]


def _format_weight(wf, block_size, qa, rng, n=37, k=96):
    import test_custom_call_formats as formats_tests
    if wf.startswith("fp"):
        return formats_tests.random_float_weight(rng, n, k, wf, block_size)
    return cases.make_weight(rng, n, k, Scheme(int(wf[3:]), block_size, False, True, qa))


def _format_tensors(qw):
    w = torch.from_numpy(np.asarray(qw.w).view(np.uint8).copy())
    if qw.format == "fp8":
        w = w.view(torch.float8_e4m3fn)
    elif qw.format == "int" and qw.bits == 8:
        w = w.view(torch.int8)
    s = torch.from_numpy(np.array(qw.scale))
    z = None if qw.zero_point is None else torch.from_numpy(np.array(qw.zero_point))
    return w, s, z


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("wf, block_size, qa, af", FORMAT_CASES)
def test_float_formats_bit_identical_to_jax_custom_call(wf, block_size, qa, af, x_dtype):
    qw = _format_weight(wf, block_size, qa, np.random.default_rng(0))
    w, s, z = _format_tensors(qw)
    from xla_qops.spec import check_args
    spec = check_args(jnp.zeros((1, 96), jnp.float32), qw.w, qw.scale, qw.zero_point,
                      block_size, qw.int4_weight, qa, weight_format=qw.weight_format,
                      activation_format=af)
    prepared = _cpu_ops.prepare(w, s, z, spec)
    for rows in (1, 3, 17):
        x = rand_x((rows, 96), x_dtype, seed=rows)
        y = _cpu_ops.matmul(x, prepared, qa, af)
        want = xla_qops.quantized_matmul(interop.to_jax(x), qw, quantize_activation=qa,
                                         activation_format=af, impl="custom_call")
        assert torch.equal(y, interop.to_torch(want)), rows


def test_opcheck_direct_operator_float_formats():
    rng = np.random.default_rng(0)
    w, s, _ = _format_tensors(_format_weight("fp8", 32, True, rng, n=40, k=64))
    torch.library.opcheck(torch.ops.xla_qops_cpu.quantized_matmul.default,
                          (rand_x((3, 64)), w.view(torch.uint8), s, None, 32, 8, True, "fp8",
                           "fp8"))
    w, s, _ = _format_tensors(_format_weight("fp4", -1, False, rng, n=40, k=64))
    torch.library.opcheck(torch.ops.xla_qops_cpu.quantized_matmul.default,
                          (rand_x((3, 64)), w, s, None, -1, 4, False, "fp4", "int8"))


def test_direct_route_uses_no_jax(monkeypatch):
    """The op and the module on CPU tensors never enter the DLPack/JAX route."""
    def fail(*args, **kwargs):
        raise AssertionError("the JAX route was taken")
    monkeypatch.setattr(interop, "run_on_cpu", fail)
    monkeypatch.setattr(interop, "to_jax", fail)
    scheme = Scheme(4, 32, False, True, False)
    w, s, z = torch_weight(cases.make_weight(np.random.default_rng(0), 40, 64, scheme))
    x = rand_x((2, 64))
    reference_check(op(x, w, s, z, scheme), x, w, s, z, scheme)
    module = XlaQuantizedLinear(64, 40, is_symmetric=False, block_size=32, int4_weight=True)
    module.load_quantized_weight(w, s, z)
    with torch.no_grad():
        reference_check(module(x), x, w, s, z, scheme)


def test_opcheck_direct_operator():
    scheme = Scheme(4, 32, False, True, True)
    w, s, z = torch_weight(cases.make_weight(np.random.default_rng(0), 40, 64, scheme))
    torch.library.opcheck(torch.ops.xla_qops_cpu.quantized_matmul.default,
                          (rand_x((3, 64)), w, s, z, 32, 4, True))


# ---------------------------------------------------------------------------
# The module's prepared weight

def module_for(scheme, k=64, n=40, seed=0, scaler_dtype=torch.float32):
    qw = cases.make_weight(np.random.default_rng(seed), n, k, scheme)
    w, s, z = torch_weight(qw)
    m = XlaQuantizedLinear(k, n, is_symmetric=scheme.symmetric, block_size=scheme.block_size,
                           int4_weight=scheme.bits == 4,
                           quantize_activation=scheme.quantize_activation)
    m.load_quantized_weight(w, s.to(scaler_dtype), None if z is None else z.to(scaler_dtype))
    return m


def module_check(m, x, y):
    scheme = Scheme(8 if not m.int4_weight else 4, m.block_size, m.is_symmetric, m.packed,
                    m.quantize_activation)
    reference_check(y, x, m.weight, m.weight_scaler, m.zero_point, scheme)


ASYM4 = Scheme(4, 32, False, True, False)


@pytest.mark.parametrize("scaler_dtype", [torch.float32, torch.bfloat16])
def test_calls_do_not_prepare(scaler_dtype):
    m = module_for(ASYM4, scaler_dtype=scaler_dtype)
    x = rand_x((1, 64))
    before = _cpu_ops.preparations()
    with torch.no_grad():
        ys = [m(x) for _ in range(5)]
    assert _cpu_ops.preparations() == before
    assert all(torch.equal(y, ys[0]) for y in ys)
    module_check(m, x, ys[0])


def test_prepared_weight_aliases_float32_buffers():
    m = module_for(ASYM4)
    assert m._cpu.w is m.weight and m._cpu.scale is m.weight_scaler
    assert m._cpu.zero_point is m.zero_point
    m16 = module_for(ASYM4, scaler_dtype=torch.bfloat16)
    assert m16._cpu.scale.dtype == torch.float32 and m16.weight_scaler.dtype == torch.bfloat16


def _outputs(m, x):
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle", "torch.save", "to"])
def test_prepared_state_survives(how):
    m = module_for(ASYM4, scaler_dtype=torch.bfloat16)
    x = rand_x((3, 64))
    y = _outputs(m, x)
    if how == "state_dict":
        other = XlaQuantizedLinear(64, 40, is_symmetric=False, block_size=32, int4_weight=True)
        other.load_state_dict(m.state_dict())
        assert set(other.state_dict()) == {"weight", "weight_scaler", "zero_point"}
        for key, t in m.state_dict().items():  # API.md layout, dtype kept: exact
            assert torch.equal(other.state_dict()[key], t) and other.state_dict()[key].dtype == t.dtype
    elif how == "deepcopy":
        other = copy.deepcopy(m)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(m))
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    else:  # a dtype cast of the float buffers (bf16 -> f64 -> f32 is exact)
        other = copy.deepcopy(m).to(torch.float64)
        assert other.weight_scaler.dtype == torch.float64
        assert other._cpu.scale.dtype == torch.float32
    assert other._cpu is not None
    before = _cpu_ops.preparations()
    assert torch.equal(_outputs(other, x), y)
    assert _cpu_ops.preparations() == before  # prepared on load, not on the call


def test_in_place_edit_of_a_buffer_is_noticed():
    m = module_for(ASYM4, scaler_dtype=torch.bfloat16)
    x = rand_x((2, 64))
    _outputs(m, x)
    with torch.no_grad():
        m.weight_scaler.mul_(2)
    y = _outputs(m, x)
    module_check(m, x, y)  # against the edited scaler, not the prepared copy


def test_module_every_storage_bit_identical_to_jax():
    for scheme in cases.all_schemes(32):
        m = module_for(scheme)
        x = rand_x((5, 64))
        y = _outputs(m, x)
        expected = jax_custom_call(x, m.weight, m.weight_scaler, m.zero_point,
                                   dataclasses.replace(scheme, packed=m.packed))
        assert torch.equal(y, expected), scheme.id


# ---------------------------------------------------------------------------
# Inputs as users pass them

def test_strided_views_and_zero_tokens():
    m = module_for(ASYM4)
    base = rand_x((4, 6, 128))
    for x in (base[:, :3, ::2], base[:, :, :64].transpose(0, 1), base[1, :, 64:], base[0, 0, :64]):
        assert not x.is_contiguous() or x.dim() == 1
        y = _outputs(m, x)
        assert y.shape == (*x.shape[:-1], 40)
        module_check(m, x, y)
        assert torch.equal(y, _outputs(m, x.contiguous()))
    for shape in ((0, 64), (2, 0, 64)):
        y = _outputs(m, rand_x(shape))
        assert y.shape == (*shape[:-1], 40) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", [ASYM4, Scheme(8, -1, True, False, False),
                                    Scheme(8, -1, True, False, True),
                                    Scheme(4, 32, True, True, True)], ids=lambda s: s.id)
def test_nan_and_inf_stay_in_their_rows(scheme):
    m = module_for(scheme)
    x = rand_x((4, 64))
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y = _outputs(m, x)
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).all()
    clean = [0, 3]
    assert torch.isfinite(y[clean]).all()
    module_check(m, x[clean], y[clean])
    torch.testing.assert_close(y, jax_custom_call(x, m.weight, m.weight_scaler, m.zero_point,
                                                  scheme), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("x,exc,match", [
    (rand_x((2, 63)), ValueError, r"block_size: expected a divisor of in=63"),
    (rand_x((2, 96)), ValueError, r"w: expected shape \[3, 16, 40\]"),
    (rand_x((2, 64), "float32").double(), TypeError, "x: expected dtype bfloat16, float16 or float32"),
    (torch.zeros(2, 64, dtype=torch.int32), TypeError, "x: expected dtype bfloat16"),
])
def test_bad_x_gives_the_ops_error(x, exc, match):
    m = module_for(ASYM4)
    for _ in range(2):  # also once its signature was seen
        with pytest.raises(exc, match=match), torch.no_grad():
            m(x)
        with pytest.raises(exc, match=match):
            op(x, m.weight, m.weight_scaler, m.zero_point, ASYM4)


def test_thread_count_and_concurrency_bit_identical():
    m = module_for(Scheme(4, 32, False, True, False), k=512, n=300)
    xs = [rand_x((rows, 512), seed=rows) for rows in (1, 4, 40)]
    expected = [_outputs(m, x) for x in xs]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert all(torch.equal(_outputs(m, x), e) for x, e in zip(xs, expected))
    finally:
        torch.set_num_threads(threads)
    results, errors = {}, []

    def work(i):
        try:
            results[i] = [_outputs(m, xs[j % 3]) for j in range(i, i + 20)]
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    pool = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    for i, ys in results.items():
        assert all(torch.equal(y, expected[j % 3]) for j, y in zip(range(i, i + 20), ys))


def test_autograd_through_the_module_on_cpu():
    m = module_for(ASYM4)
    x = rand_x((3, 64), "float32").requires_grad_()
    y = m(x)
    y.sum().backward()
    wf = ref.dequantize(to_numpy(m.weight), to_numpy(m.weight_scaler), to_numpy(m.zero_point),
                        32, True)
    np.testing.assert_allclose(x.grad.numpy(), np.ones((3, 40)) @ wf, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(m(x.detach()), y.detach())  # direct route == autograd route


# ---------------------------------------------------------------------------
# Drop-in: what torch_xla's module and op take

def torch_xla_formula():
    """torch_xla's CPU (CompositeExplicitAutograd) formula; for tests marked torch_xla."""
    from torch_xla.experimental import xla_quantized_matmul as txq
    return txq.quantized_matmul


@pytest.mark.parametrize("k,block", [(5, -1), (63, 21), (9, 3)])
@pytest.mark.torch_xla
def test_odd_int4_input_features_are_stored_unpacked(k, block):
    rng = np.random.default_rng(3)
    q = rng.integers(-8, 8, (40, k) if block == -1 else (k // block, block, 40)).astype(np.int8)
    s = rng.uniform(0.01, 0.02, 40 if block == -1 else (k // block, 40)).astype(np.float32)
    z = rng.uniform(-0.01, 0.01, s.shape).astype(np.float32)
    m = XlaQuantizedLinear(k, 40, block_size=block, int4_weight=True)  # torch_xla's defaults
    m.load_quantized_weight(torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(z))
    assert m.weight.dtype == torch.int8 and not m.packed and "int4 unpacked" in repr(m)
    x = rand_x((3, k), "float32")
    y = _outputs(m, x)
    module_check(m, x, y)
    theirs = torch_xla_formula()(x, torch.from_numpy(q), torch.from_numpy(s),
                                 torch.from_numpy(z), block, True, False)
    np.testing.assert_allclose(y.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="odd .* cannot pair up"):
        m.load_quantized_weight(torch.zeros(1, dtype=torch.uint8), torch.from_numpy(s))
    other = XlaQuantizedLinear(k, 40, block_size=block, int4_weight=True)
    other.load_state_dict(m.state_dict())
    assert torch.equal(_outputs(other, x), y)


def test_quantize_model_swaps_odd_int4_layers():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    torch_bridge.quantize_model(model, scheme="w4a16", symmetric=False)
    assert all(isinstance(model[i], XlaQuantizedLinear) for i in (0, 2))
    assert not torch_bridge.quantization_report(model).skipped
    x = rand_x((2, 5), "float32")
    assert _outputs(model, x).shape == (2, 3)


@pytest.mark.parametrize("scheme", [Scheme(8, -1, False, False, False),
                                    Scheme(4, -1, False, False, False),
                                    Scheme(8, -1, False, False, True),
                                    Scheme(4, -1, False, False, True)], ids=lambda s: s.id)
@pytest.mark.parametrize("n", [37, 40])
@pytest.mark.torch_xla
def test_torch_xla_inputs_per_channel(scheme, n):
    """float32 x, float32 and bfloat16 scalers, zero points on per-channel int4,
    activation quantization, odd out: what torch_xla's per-channel op takes."""
    rng = np.random.default_rng(4)
    lim = 8 if scheme.bits == 4 else 128
    q = torch.from_numpy(rng.integers(-lim, lim, (n, 64)).astype(np.int8))
    s = torch.from_numpy(rng.uniform(0.01, 0.02, n).astype(np.float32))
    z = torch.from_numpy(rng.uniform(-0.01, 0.01, n).astype(np.float32))
    for scaler_dtype in (torch.float32, torch.bfloat16):
        m = XlaQuantizedLinear(64, n, int4_weight=scheme.bits == 4,
                               quantize_activation=scheme.quantize_activation)
        m.load_quantized_weight(q, s.to(scaler_dtype), z.to(scaler_dtype))
        x = rand_x((3, 64), "float32")
        y = _outputs(m, x)
        module_check(m, x, y)
        s32, z32 = s.to(scaler_dtype).float(), z.to(scaler_dtype).float()
        theirs = torch_xla_formula()(x, q, s32, z32, -1, scheme.bits == 4,
                                     scheme.quantize_activation)
        # Both within the reference's bound of the exact product, so within the
        # sum of the two bounds of each other. torch_xla quantizes activations
        # as round(x / x_scale), an ulp or two from API.md's x * (127 / absmax):
        # an activation on a .5 tie may round the other way there, one x_scale
        # step allowed for each (activation_ties; none elsewhere).
        tol = ref.tolerance(x.numpy(), q.numpy(), s32.numpy(), z32.numpy(), -1, np.float32,
                            scheme.quantize_activation, activation_ties=True)
        assert np.all(np.abs(y.numpy() - theirs.numpy()) <= 2 * tol)


@pytest.mark.torch_xla
def test_zero_point_on_a_symmetric_module_is_used():
    """torch_xla's module stores and uses a zero point given to a symmetric module."""
    rng = np.random.default_rng(5)
    q = torch.from_numpy(rng.integers(-128, 128, (40, 64)).astype(np.int8))
    s = torch.from_numpy(rng.uniform(0.01, 0.02, 40).astype(np.float32))
    z = torch.from_numpy(rng.uniform(-0.5, 0.5, 40).astype(np.float32))
    m = XlaQuantizedLinear(64, 40, is_symmetric=True)
    m.load_quantized_weight(q, s, z)
    assert m.zero_point is not None and "zero_point" in m.state_dict()
    x = rand_x((3, 64), "float32")
    y = _outputs(m, x)
    module_check(m, x, y)
    theirs = torch_xla_formula()(x, q, s, z, -1, False, False)
    np.testing.assert_allclose(y.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-5)
    fresh = XlaQuantizedLinear(64, 40, is_symmetric=True)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(_outputs(fresh, x), y)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [-1, 16])
def test_activation_quantization_with_every_layout(bits, block):
    """torch_xla refuses quantize_activation with blockwise weights; ours runs it."""
    scheme = Scheme(bits, block, False, bits == 4, True)
    m = module_for(scheme)
    x = rand_x((3, 64), "float32")
    module_check(m, x, _outputs(m, x))


def test_compiled_module_calls_the_direct_operator():
    """Under torch.compile (no grad) the graph holds the prepared weight and the
    direct operator; a bad x raises the op's error from its fake kernel."""
    m = module_for(ASYM4)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    x = rand_x((3, 64))
    with torch.no_grad():
        assert torch.equal(compiled(x), _outputs(m, x))
        targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
        assert "xla_qops_cpu.quantized_matmul.default" in targets
        assert not any("xla.quantized_matmul" in t for t in targets)
        with pytest.raises(Exception, match=r"w: expected shape \[3, 16, 40\]"):
            compiled(rand_x((3, 96)))
