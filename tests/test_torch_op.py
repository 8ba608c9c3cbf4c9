"""torch.ops.xla.quantized_matmul through torch_bridge: numerics on CPU and XLA
tensors, no host transfer, fake/meta kernel, autograd, validation errors.

Numerics are checked against tests/numpy_reference.py (float64) with its
derived tolerance (half an ulp of the output dtype plus float32 accumulation).
"""


import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numpy_reference as ref
import cases
from cases import Scheme
import torch_bridge  # noqa: F401  (registers the op)

from conftest import HAVE_TORCH_XLA

if HAVE_TORCH_XLA:  # the XLA-tensor tests (marked torch_xla); the rest run on any torch
    import torch_xla
    import torch_xla.debug.metrics as met

    # Start the XLA runtime at collection, before any backward pass in this
    # process: torch's autograd engine sizes its per-device queues on the first
    # backward, and an XLA backward after a CPU one made before the runtime
    # started trips an internal assert (torch_xla behaviour; docs/torch.md).
    torch_xla.device()

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# The scheme description the JAX tests use (bits, block_size, symmetric, packed, A8).
Case = Scheme


CASES = [Case(bits, block, sym, packed, qa)
         for bits in (8, 4) for block in (-1, 32) for sym in (True, False)
         for packed in ((True, False) if bits == 4 else (False,)) for qa in (False, True)]


def to_numpy(t):
    """torch -> numpy, bfloat16 as ml_dtypes.bfloat16 (numpy_reference needs the dtype)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(jnp.bfloat16)
    return t.numpy()


def make_weight(case, n=40, k=96, seed=0):
    """(w, scale, zero_point) torch CPU tensors for `case` (API.md layouts)."""
    qw = cases.make_weight(np.random.default_rng(seed), n, k, case)
    as_torch = lambda a: None if a is None else torch.from_numpy(np.array(a))
    return as_torch(qw.w), as_torch(qw.scale), as_torch(qw.zero_point)


def make_x(shape, dtype="bfloat16", seed=1):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(TORCH_DTYPES[dtype])


def op_call(x, w, scale, zero_point, case, **kw):
    return torch.ops.xla.quantized_matmul(
        x, w, scale, zero_point, block_size=case.block_size, int4_weight=case.bits == 4,
        quantize_activation=case.quantize_activation, **kw)


def check(y, x, w, scale, zero_point, case):
    assert y.dtype == x.dtype
    ref.assert_close(to_numpy(y), to_numpy(x), to_numpy(w), to_numpy(scale),
                     None if zero_point is None else to_numpy(zero_point), case.block_size,
                     case.quantize_activation)


def transfers_from_device() -> int:
    data = met.metric_data("TransferFromDeviceTime")
    return 0 if data is None else data[0]


@pytest.fixture(scope="module")
def xla():
    return torch_xla.device()


# ---------------------------------------------------------------------------
# CPU tensors

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cpu_every_scheme(case):
    w, scale, zp = make_weight(case)
    x = make_x((2, 3, 96))
    y = op_call(x, w, scale, zp, case)
    assert y.shape == (2, 3, 40) and y.device.type == "cpu"
    check(y, x, w, scale, zp, case)


@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
@pytest.mark.parametrize("impl", ["xla", "reference", "custom_call"])
@pytest.mark.parametrize("case", [Case(8, -1, True, False, False), Case(4, 32, False, True, True)],
                         ids=lambda c: c.id)
def test_cpu_impl_and_dtype(case, impl, x_dtype):
    """impl= selects the overload with the appended argument and the backend."""
    w, scale, zp = make_weight(case)
    x = make_x((5, 96), x_dtype)
    check(op_call(x, w, scale, zp, case, impl=impl), x, w, scale, zp, case)


def test_cpu_call_copies_no_weight():
    """DLPack aliases torch memory: the JAX view of a module's weight is its
    buffer, even when the loaded tensor came from numpy (unaligned for jaxlib)."""
    from torch_bridge import _jax_interop as interop
    w, scale, _ = make_weight(Case(4, 32, True, True, False))
    w_unaligned = torch.empty(w.numel() + 1, dtype=torch.uint8)[1:].view(w.shape).copy_(w)
    assert w_unaligned.data_ptr() % interop.ALIGNMENT != 0
    module = torch_bridge.XlaQuantizedLinear(96, 40, is_symmetric=True, block_size=32,
                                             int4_weight=True)
    module.load_quantized_weight(w_unaligned, scale)
    assert torch.equal(module.weight, w)
    for t in (module.weight, module.weight_scaler, make_x((3, 96))):
        assert interop.to_jax(t).unsafe_buffer_pointer() == t.data_ptr()


def test_exit_hook_waits_until_jax_lets_go_of_torch_memory():
    """JAX releases an execution's aliased inputs on its own threads, and on
    torch >= 2.10 that release takes the GIL: the exit hook waits until JAX
    holds none of the tensors it no longer needs (else an XLA thread asks for
    the GIL during finalization and the process aborts), and does not wait on
    arrays still alive."""
    import time
    from torch_bridge import _jax_interop as interop
    case = Case(4, 32, True, True, False)
    w, scale, zp = make_weight(case)
    for _ in range(3):
        y = op_call(make_x((3, 96)), w, scale, zp, case, impl="reference")
    del y
    interop._release_aliases_before_exit()
    assert interop._references_from_jax() == 0
    alive = interop.to_jax(w)  # held until `del` (torch >= 2.10 counts it: its own tensor)
    start = time.monotonic()
    interop._wait_for_jax_releases(quiet_s=0.05, limit_s=60.0)
    assert time.monotonic() - start < 10.0  # stopped when the count stayed, not at the limit
    del alive
    assert interop._references_from_jax() == 0


def test_cpu_strided_activation():
    case = Case(8, 32, True, False, False)
    w, scale, zp = make_weight(case)
    x = make_x((96, 6)).T  # non-contiguous [6, 96]
    check(op_call(x, w, scale, zp, case), x, w, scale, zp, case)


def test_cpu_no_rows():
    # custom_call only: xla_qops' "xla" backend cannot reshape an empty x
    # (reported; the bridge passes M=0 through unchanged).
    case = Case(4, 32, True, True, False)
    w, scale, zp = make_weight(case)
    y = op_call(make_x((0, 96)), w, scale, zp, case, impl="custom_call")
    assert y.shape == (0, 40) and y.dtype == torch.bfloat16


@pytest.mark.torch_xla
def test_matches_torch_xla_own_kernel_where_it_has_one():
    """W8A16 per-channel (torch_xla's only fully supported row): same result as
    torch_xla's own CPU implementation, within the reference tolerance."""
    from torch_xla.experimental import xla_quantized_matmul as txq
    case = Case(8, -1, False, False, False)
    w, scale, zp = make_weight(case)
    x = make_x((4, 96), "float32")
    theirs = txq.quantized_matmul(x, w, scale, zp)  # their Python function, not the op
    ours = op_call(x, w, scale, zp, case)
    tol = ref.tolerance(to_numpy(x), to_numpy(w), to_numpy(scale), to_numpy(zp), -1, np.float32)
    assert np.all(np.abs(ours.numpy() - theirs.numpy()) <= 2 * tol)


# ---------------------------------------------------------------------------
# XLA tensors

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.torch_xla
def test_xla_every_scheme_without_host_transfer(case, xla):
    w, scale, zp = make_weight(case)
    x = make_x((2, 3, 96))
    args = [t.to(xla) if t is not None else None for t in (x, w, scale, zp)]
    torch_xla.sync()
    before = transfers_from_device()
    y = op_call(*args, case)
    torch_xla.sync()  # executes the graph
    assert transfers_from_device() == before, "the op moved data from the device to the host"
    assert y.device.type == "xla"
    check(y.cpu(), x, w, scale, zp, case)


@pytest.mark.torch_xla
def test_xla_int4_weight_is_a_graph_parameter_not_a_constant(xla):
    """torch_xla's own int4 path copies the weight to the host and bakes it into
    the graph as a constant; here the packed weight stays a device parameter."""
    case = Case(4, 32, True, True, False)
    w, scale, zp = make_weight(case, n=48, k=256)
    x = make_x((4, 256))
    wx = w.to(xla)
    torch_xla.sync()
    y = op_call(x.to(xla), wx, scale.to(xla), None, case)
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([y])
    shape = "u8[" + ",".join(map(str, w.shape)) + "]"
    lines = [line for line in hlo.splitlines() if shape in line]
    assert any("parameter(" in line for line in lines), hlo
    assert not any("constant(" in line for line in lines), hlo
    assert not any("s4[" in line for line in hlo.splitlines())
    before = transfers_from_device()
    torch_xla.sync()
    assert transfers_from_device() == before
    check(y.cpu(), x, w, scale, None, case)


@pytest.mark.torch_xla
def test_torch_xla_own_int4_path_does_transfer(xla):
    """Control for the metric used above: torch_xla's own int4 kernel (blockwise;
    its per-channel int4 does not compile on the XLA CPU device) reads the
    weight back to the host (w.cpu()), which the metric sees."""
    from torch_xla.experimental import xla_quantized_matmul as txq
    case = Case(4, 32, True, False, False)
    w, scale, _ = make_weight(case, n=16, k=64)
    x, wx, sx = make_x((2, 64), "float32").to(xla), w.to(xla), scale.to(xla)
    torch_xla.sync()
    before = transfers_from_device()
    y = txq.quantized_matmul_xla(x, wx, sx, block_size=32, int4_weight=True)
    torch_xla.sync()
    assert transfers_from_device() > before
    check(y.cpu(), x.cpu(), w, scale, None, case)


@pytest.mark.torch_xla
def test_xla_auto_resolves_to_a_backend_that_runs_in_torch_xla(xla):
    """impl="auto" on the XLA CPU device is "xla" (torch_xla cannot call the host
    C++ custom call); asking for custom_call there is a clear error."""
    case = Case(8, -1, True, False, False)
    w, scale, _ = make_weight(case)
    x = make_x((3, 96))
    args = (x.to(xla), w.to(xla), scale.to(xla), None)
    check(op_call(*args, case).cpu(), x, w, scale, None, case)
    check(op_call(*args, case, impl="reference").cpu(), x, w, scale, None, case)
    with pytest.raises(ValueError, match="impl: 'custom_call' runs on CPU tensors only"):
        op_call(*args, case, impl="custom_call")


# ---------------------------------------------------------------------------
# Fake kernel, opcheck

@pytest.mark.parametrize("x_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("case", [Case(8, -1, True, False, False), Case(4, 32, False, True, True),
                                  Case(4, -1, True, False, False)], ids=lambda c: c.id)
def test_fake_kernel_shape_and_dtype(case, x_dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode
    w, scale, zp = make_weight(case)
    x = make_x((2, 5, 96), x_dtype)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if t is not None else None for t in (x, w, scale, zp)]
        y = op_call(*fake, case)
    assert y.shape == (2, 5, 40) and y.dtype == TORCH_DTYPES[x_dtype]
    meta = op_call(*[t.to("meta") if t is not None else None for t in (x, w, scale, zp)], case)
    assert meta.shape == (2, 5, 40) and meta.dtype == TORCH_DTYPES[x_dtype]


@pytest.mark.parametrize("overload,extra", [("default", ()), ("with_impl", ("xla",))])
def test_opcheck(overload, extra):
    """torch.library.opcheck: schema, fake kernel, autograd registration and
    AOT dispatch with dynamic shapes."""
    case = Case(4, 32, False, True, False)
    w, scale, zp = make_weight(case)
    x = make_x((2, 3, 96), "float32").requires_grad_()
    op = getattr(torch.ops.xla.quantized_matmul, overload)
    torch.library.opcheck(op, (x, w, scale.requires_grad_(), zp, 32, True, False) + extra)


# ---------------------------------------------------------------------------
# Autograd

def grads_reference(x, w, scale, zp, g, case):
    """float64 (value, bound) pairs for dx, dscale, dzero_point of sum(g * y).

    A8 schemes use the straight-through gradient (activation quantization is
    the identity), like xla_qops. Bounds: float32 accumulation of n terms,
    (n + 2) * 2^-24 times the sum of absolute terms (numpy_reference.tolerance's
    derivation), with n the length of the contraction.
    """
    packed = w.dtype == torch.uint8
    block = case.block_size
    q = ref.dequantize(to_numpy(w), np.ones(scale.shape), None, block, packed)  # [out, in]
    n_out, k = q.shape
    group = k if block == -1 else block
    s = np.asarray(to_numpy(scale), np.float64).reshape(-1, n_out)  # [groups, out]
    z = (np.zeros_like(s) if zp is None
         else np.asarray(to_numpy(zp), np.float64).reshape(-1, n_out))
    s_k, z_k = np.repeat(s, group, axis=0).T, np.repeat(z, group, axis=0).T  # [out, in]
    x2 = to_numpy(x).astype(np.float64).reshape(-1, k)
    g2 = to_numpy(g).astype(np.float64).reshape(-1, n_out)
    m = x2.shape[0]

    def bound(n_terms, abs_sum):
        return (n_terms + 2) * ref.F32_EPS * abs_sum

    dx = g2 @ (s_k * q - z_k)
    dx_tol = bound(n_out, np.abs(g2) @ (np.abs(s_k * q) + np.abs(z_k)))
    xq = (x2[:, :, None] * q.T[None]).reshape(m, -1, group, n_out).sum(2)  # [M, groups, out]
    axq = (np.abs(x2)[:, :, None] * np.abs(q.T)[None]).reshape(m, -1, group, n_out).sum(2)
    xs = x2.reshape(m, -1, group).sum(-1)
    axs = np.abs(x2).reshape(m, -1, group).sum(-1)
    dscale = np.einsum("mn,mbn->bn", g2, xq)
    dscale_tol = bound(m + group, np.einsum("mn,mbn->bn", np.abs(g2), axq))
    dzero = -np.einsum("mn,mb->bn", g2, xs)
    dzero_tol = bound(m + group, np.einsum("mn,mb->bn", np.abs(g2), axs))
    shape = tuple(scale.shape)
    return ((dx.reshape(x.shape), dx_tol.reshape(x.shape)),
            (dscale.reshape(shape), dscale_tol.reshape(shape)),
            (dzero.reshape(shape), dzero_tol.reshape(shape)))


def assert_within(actual, expected_and_bound, what):
    expected, bound = expected_and_bound
    err = np.abs(np.asarray(actual, np.float64) - expected)
    assert np.all(err <= bound), f"{what}: max |err| {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("xla", marks=pytest.mark.torch_xla)])
@pytest.mark.parametrize("case", [Case(8, -1, False, False, False), Case(4, 32, False, True, False),
                                  Case(4, 32, True, False, True)], ids=lambda c: c.id)
def test_autograd_matches_float_reference(case, device):
    w, scale, zp = make_weight(case, n=24, k=64)
    x = make_x((2, 3, 64), "float32")
    g = make_x((2, 3, 24), "float32", seed=7)
    dev = torch_xla.device() if device == "xla" else "cpu"
    xd = x.to(dev).requires_grad_()
    sd = scale.to(dev).requires_grad_()
    zd = None if zp is None else zp.to(dev).requires_grad_()
    y = op_call(xd, w.to(dev), sd, zd, case)
    (y * g.to(dev)).sum().backward()
    dx, dscale, dzero = grads_reference(x, w, scale, zp, g, case)
    assert_within(xd.grad.cpu().numpy(), dx, "dx")
    assert_within(sd.grad.cpu().numpy(), dscale, "dscale")
    if zd is not None:
        assert_within(zd.grad.cpu().numpy(), dzero, "dzero_point")


def test_autograd_bf16_activation_gradient_dtype():
    case = Case(8, -1, True, False, False)
    w, scale, _ = make_weight(case)
    x = make_x((3, 96)).requires_grad_()
    op_call(x, w, scale, None, case).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    (dx, tol), _, _ = grads_reference(x, w, scale, None, torch.ones(3, 40), case)
    # plus the final rounding of dx to bfloat16
    assert_within(x.grad.float().numpy(), (dx, tol + 2.0 ** -8 * np.abs(dx)), "dx")


# ---------------------------------------------------------------------------
# Bad input: errors come from xla_qops.spec (or the device check), in eager and fake.

BAD = [
    ("x float64", lambda x, w, s: (x.double(), w, s, {}), TypeError, "x: expected dtype"),
    ("w float", lambda x, w, s: (x, w.float(), s, {}), TypeError, "w: expected int8"),
    ("scale int", lambda x, w, s: (x, w, s.to(torch.int32), {}), TypeError, "scale: expected a floating"),
    ("scale shape", lambda x, w, s: (x, w, s[:-1], {}), ValueError, r"scale: expected shape \[40\]"),
    ("w shape", lambda x, w, s: (x[..., :64], w, s, {}), ValueError, r"w: expected shape \[40, 64\]"),
    ("block", lambda x, w, s: (x, w, s, {"block_size": 7}), ValueError, "block_size: expected a divisor"),
    ("impl", lambda x, w, s: (x, w, s, {"impl": "cuda"}), ValueError, "impl: expected one of"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_clear_error(name, make, exc, match):
    w, scale, _ = make_weight(Case(8, -1, True, False, False))
    x, w, scale, kw = make(make_x((3, 96)), w, scale)
    with pytest.raises(exc, match=match):
        torch.ops.xla.quantized_matmul(x, w, scale, **kw)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(exc, match=match):
        torch.ops.xla.quantized_matmul(*(mode.from_tensor(t) for t in (x, w, scale)), **kw)


@pytest.mark.torch_xla
def test_mixed_devices_error(xla):
    w, scale, _ = make_weight(Case(8, -1, True, False, False))
    with pytest.raises(ValueError, match="w: expected a tensor on xla"):
        torch.ops.xla.quantized_matmul(make_x((3, 96)).to(xla), w, scale.to(xla))
