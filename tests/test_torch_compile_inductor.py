"""torch.compile on CPU tensors with current torch's backends, inductor (the
default) and aot_eager, no torch_xla: `fullgraph=True` (a graph break raises),
one graph (dynamo's counters), no recompile over repeated calls and batch sizes
marked dynamic (`error_on_recompile` raises), results equal to eager.

Covers the op itself (`torch.ops.xla.quantized_matmul`, with inductor fusing an
elementwise epilogue around it) and the modules (`quantize_model` with every
scheme, whose CPU route is the C++ operator `xla_qops_cpu::quantized_matmul`),
and the C++ operator's schema under `torch.library.opcheck` (fresh output, no
aliasing or mutation of its inputs). tests/test_torch_compile.py holds the
openxla (torch_xla) cases.
"""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import numpy_reference as ref
import torch_bridge
from cases import Scheme, make_weight
from torch_bridge import _cpu_ops

BACKENDS = ["aot_eager", "inductor"]
# Batch sizes, marked dynamic: none after the first may recompile. 1 is left
# out: dynamo specializes sizes 0 and 1 whatever is marked dynamic.
BATCHES = (3, 5, 8, 3, 17)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    # torch_xla's import (pinned stack) turns automatic dynamic shapes off
    # process-wide; these tests mark the batch dim dynamic explicitly instead.
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def assert_one_graph_no_breaks():
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def dynamic_batch(x, dim=0):
    """`x` with its batch dim marked dynamic, as every call's input is (torch >= 2.10
    guards on the marking itself: a marked first call and unmarked later ones
    recompile)."""
    torch._dynamo.mark_dynamic(x, dim)
    return x


def to_torch(a):
    return None if a is None else torch.from_numpy(np.array(a))


# The op: W4A16 blockwise asymmetric (packed int4) and W8A8 per-channel, the two
# kernel families, with a fused epilogue for inductor to generate around it.
OP_SCHEMES = [Scheme(4, 32, False, True, False), Scheme(8, -1, True, False, True)]


# Each compile costs seconds: each backend gets one of the schemes.
@pytest.mark.parametrize("backend,scheme", list(zip(BACKENDS, OP_SCHEMES[::-1])),
                         ids=lambda v: getattr(v, "id", v))
def test_op_compiles_whole_and_matches_eager(backend, scheme):
    qw = make_weight(np.random.default_rng(0), 48, 64, scheme)
    w, scale, zp = (to_torch(a) for a in (qw.w, qw.scale, qw.zero_point))

    def f(x):
        y = torch.ops.xla.quantized_matmul(x, w, scale, zp, block_size=scheme.block_size,
                                           int4_weight=scheme.bits == 4,
                                           quantize_activation=scheme.quantize_activation)
        return torch.relu(y) * 2.0, y

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    rng = np.random.default_rng(1)
    for m in BATCHES:
        x = dynamic_batch(torch.from_numpy(rng.standard_normal((m, 64)).astype(np.float32)))
        (activated, y), (activated_eager, y_eager) = compiled(x), f(x)
        # The op is the same C++ kernel in both (an opaque call in the compiled
        # graph), so its output is bit-identical; relu(y) * 2 is exact in float32.
        assert torch.equal(y, y_eager) and torch.equal(activated, activated_eager)
        ref.assert_close(y.numpy(), x.numpy(), w.numpy(), scale.numpy(),
                         None if zp is None else zp.numpy(), scheme.block_size,
                         scheme.quantize_activation)
    assert_one_graph_no_breaks()


def every_scheme_model(dtype):
    """Linear -> GELU -> Linear -> Linear -> Linear, each swapped by quantize_model
    with another scheme (per-channel and blockwise, symmetric and not)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(),
                                torch.nn.Linear(96, 64), torch.nn.Linear(64, 64, bias=False),
                                torch.nn.Linear(64, 32)).to(dtype).eval()
    for name, scheme, kwargs in (("0", "w4a16", dict(block_size=32, symmetric=False)),
                                 ("2", "w8a8", dict(symmetric=False)),
                                 ("3", "w8a16", dict(block_size=32)),
                                 ("4", "w4a8", {})):
        torch_bridge.quantize_model(model, scheme=scheme, filter_fn=lambda n, m: n == name,
                                    **kwargs)
    assert all(isinstance(model[i], torch_bridge.XlaQuantizedLinear) for i in (0, 2, 3, 4))
    return model


@pytest.mark.parametrize("backend,dtype", [("inductor", torch.float32),
                                           ("inductor", torch.bfloat16),
                                           ("aot_eager", torch.bfloat16)], ids=str)
def test_quantized_model_compiles_whole_and_matches_eager(backend, dtype):
    if not _cpu_ops.available():
        pytest.fail("torch_bridge._torch_ops is not built: the modules' CPU route is what "
                    "this test compiles")
    model = every_scheme_model(dtype)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    rng = np.random.default_rng(2)
    with torch.no_grad():
        for m in BATCHES:
            x = torch.from_numpy(rng.standard_normal((2, m, 64)).astype(np.float32)).to(dtype)
            x = dynamic_batch(x, dim=1)
            got, expected = compiled(x), model(x)
            # The quantized matmuls are the same kernels; inductor may fuse the
            # bias adds and GELU between them differently from eager (one
            # rounding of the output dtype per fused op): float32 default
            # closeness, and bfloat16's 2^-8 relative step for bfloat16.
            tolerance = {} if dtype == torch.float32 else dict(rtol=2.0 ** -7, atol=2.0 ** -7)
            torch.testing.assert_close(got, expected, **tolerance)
    assert_one_graph_no_breaks()


def test_autograd_through_inductor_matches_eager():
    """A training step through inductor: AOT autograd traces the backward op
    (xla_qops::quantized_matmul_backward, a JAX VJP) with the fake kernels. One
    layer: each scheme's backward is a JAX compile of its own."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU())
    torch_bridge.quantize_model(model, scheme="w4a16", block_size=32, symmetric=False)
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor
    x = torch.randn(2, 5, 64)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(xe).square().sum().backward()
    compiled(xc).square().sum().backward()
    assert_one_graph_no_breaks()
    # Same kernels forward and backward; float32 default closeness covers the
    # differently fused GELU/bias/square around them.
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("scheme", OP_SCHEMES, ids=lambda s: s.id)
def test_cpu_operator_schema_opcheck(scheme):
    """The C++ operator's schema, fake kernel and AOT dispatch agree with what it
    does: a fresh output, its inputs neither mutated nor aliased."""
    if not _cpu_ops.available():
        pytest.fail("torch_bridge._torch_ops is not built")
    qw = make_weight(np.random.default_rng(3), 40, 64, scheme)
    w, scale, zp = (to_torch(a) for a in (qw.w, qw.scale, qw.zero_point))
    spec = torch_bridge.op.check(torch.zeros(1, 64), w, scale, zp, scheme.block_size,
                                 scheme.bits == 4, scheme.quantize_activation)
    prepared = _cpu_ops.prepare(w, scale, zp, spec)
    x = torch.randn(2, 3, 64)
    torch.library.opcheck(
        torch.ops.xla_qops_cpu.quantized_matmul.default,
        (x, prepared.w, prepared.scale, prepared.zero_point, prepared.block_size,
         prepared.bits, scheme.quantize_activation))
