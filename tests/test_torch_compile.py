"""torch.compile over quantized models: no graph breaks, eager-equal results,
no recompiles for repeated shapes (dynamo's counters and torch_xla's metrics),
no specialization on the batch size."""

import pytest
import torch
from torch._dynamo.utils import counters

import numpy_reference as ref
import torch_bridge
from conftest import HAVE_TORCH_XLA

if HAVE_TORCH_XLA:  # the openxla tests (marked torch_xla); the rest run on any torch
    import torch_xla
    import torch_xla.debug.metrics as met

    # Start the XLA runtime at collection, before any backward pass in this
    # process: torch's autograd engine sizes its per-device queues on the first
    # backward, and an XLA backward after a CPU one made before the runtime
    # started trips an internal assert (torch_xla behaviour; docs/torch.md).
    torch_xla.device()


def small_model(dtype=torch.float32):
    """Linear -> GELU -> Linear -> Linear, quantized with three different schemes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(),
                                torch.nn.Linear(96, 48), torch.nn.Linear(48, 32, bias=False))
    model = model.to(dtype).eval()
    torch_bridge.quantize_model(model, scheme="w4a16", block_size=32,
                                filter_fn=lambda name, m: name == "0")
    torch_bridge.quantize_model(model, scheme="w8a8", symmetric=False,
                                filter_fn=lambda name, m: name == "2")
    torch_bridge.quantize_model(model, scheme="w4a8", block_size=16)
    assert all(isinstance(model[i], torch_bridge.XlaQuantizedLinear) for i in (0, 2, 3))
    return model


def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()


def assert_one_graph_no_breaks():
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_cpu_tensors(backend):
    model = small_model()
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
        fresh_dynamo()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        results = [compiled(x) for _ in range(3)]
    assert_one_graph_no_breaks()
    for y in results:
        # The op is the same kernel; only the surrounding GELU/bias may be fused
        # differently (inductor), hence float32's default closeness.
        torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_does_not_specialize_on_batch_size(dynamic):
    """The op reads no batch dim, so dynamic shapes work: with dynamic=True one
    graph serves every batch size; with automatic dynamic shapes (dynamic=None;
    torch_xla's import turns it off process-wide, so it is patched on here) the
    first shape gets a static graph and the second a dynamic one, then no more."""
    model = small_model()
    fresh_dynamo()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=True):
        compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=dynamic)
        with torch.no_grad():
            for m in (3, 5, 7, 11, 2):
                x = torch.randn(m, 64)
                torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == (1 if dynamic else 2)


def test_compile_leading_dims_and_autograd():
    """3-D activations and a backward pass through the compiled op (AOT autograd
    traces xla_qops::quantized_matmul_backward)."""
    model = small_model()
    x = torch.randn(2, 3, 64)
    fresh_dynamo()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(xe).square().sum().backward()
    compiled(xc).square().sum().backward()
    assert_one_graph_no_breaks()
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.torch_xla
def test_compile_openxla_xla_tensors():
    """openxla: one dynamo graph, eager-equal, and repeated calls reuse both the
    dynamo graph and torch_xla's compiled executable (no new XLA compile)."""
    device = torch_xla.device()
    model = small_model(torch.bfloat16).to(device)
    x = torch.randn(4, 64, dtype=torch.bfloat16).to(device)
    with torch.no_grad():
        expected = model(x).cpu()
        fresh_dynamo()
        compiled = torch.compile(model, backend="openxla", fullgraph=True)
        first = compiled(x).cpu()
        compiles = met.counter_value("UncachedCompile") or 0
        again = [compiled(x).cpu() for _ in range(3)]
    assert_one_graph_no_breaks()
    assert (met.counter_value("UncachedCompile") or 0) == compiles
    for y in [first] + again:
        assert torch.equal(y, expected)


@pytest.mark.torch_xla
def test_compile_openxla_module_with_explicit_impl():
    """The with_impl overload (impl= kwarg) compiles without a break too."""
    device = torch_xla.device()
    linear = torch.nn.Linear(64, 32, bias=False)
    q = torch_bridge.XlaQuantizedLinear.from_float(linear, bits=4, block_size=32, impl="reference")
    x = torch.randn(3, 64)
    with torch.no_grad():
        fresh_dynamo()
        y = torch.compile(q.to(device), backend="openxla", fullgraph=True)(x.to(device)).cpu()
    assert_one_graph_no_breaks()
    ref.assert_close(y.numpy(), x.numpy(), q.weight.cpu().numpy(), q.weight_scaler.cpu().numpy(),
                     None, 32)
