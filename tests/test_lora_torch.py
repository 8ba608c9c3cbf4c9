"""Adapters on a frozen quantized base, torch side (docs/finetuning.md).

The torch half of tests/test_lora.py (whose docstring states the checks):
autograd with respect to the activation for every scheme row and
implementation on CPU tensors and the XLA device, and LoRA training with
torch's Adam. Needs torch (not collected without it) and, for the XLA-device
cases (marked torch_xla), torch_xla (tests/conftest.py).
"""

import contextlib

import numpy as np
import pytest
import torch

import torch_bridge  # noqa: F401  (registers torch.ops.xla.quantized_matmul)
from test_lora import (JAX_IMPLS, K, LOSS_DROP, LR, N, SCHEMES, STEPS, TRAIN_SCHEMES,
                       assert_dx, dequantized, quantize, supported, task)

from conftest import HAVE_TORCH_XLA

pytestmark = pytest.mark.torch

if HAVE_TORCH_XLA:
    import torch_xla

    # The autograd engine sizes its per-device queues at the first backward; if
    # that is a CPU backward before the XLA runtime exists, every later XLA
    # backward in the process fails an INTERNAL ASSERT (pytorch/xla#4174, open).
    # Initialising the device at collection avoids it for the whole session.
    torch_xla.device()

# The torch backward is the JAX VJP behind the bridge (DLPack on CPU,
# call_jax on XLA; tests/test_lora.py), so: every scheme with impl="auto" on both devices, and
# every other impl with two schemes (A16 blockwise, A8 per-channel) to cover
# the impl argument's path. custom_call runs on CPU tensors only (torch_xla's
# CPU client lacks its FFI target); "auto" means "xla" on the XLA device.
IMPL_SCHEMES = [SCHEMES[6], SCHEMES[1]]  # w4a16-g32, w8a8-pc
TORCH_CASES = ([(dev, "auto", s) for dev in ("cpu", "xla") for s in SCHEMES]
               + [("cpu", impl, s) for impl in JAX_IMPLS for s in IMPL_SCHEMES
                  if supported(impl, s)]
               + [("xla", impl, s) for impl in JAX_IMPLS if impl not in ("custom_call", "xla")
                  for s in IMPL_SCHEMES if supported(impl, s)])


def device(name):
    return torch_xla.device() if name == "xla" else torch.device("cpu")


def to_torch(a):
    return None if a is None else torch.from_numpy(np.array(a))


def on_device(cases):
    """`cases` ((dev, ...) tuples) as pytest params, the XLA-device ones marked torch_xla."""
    return [pytest.param(*c, id="-".join(getattr(v, "id", v) for v in c),
                         marks=[pytest.mark.torch_xla] if c[0] == "xla" else [])
            for c in cases]


@pytest.mark.parametrize("dev,impl,scheme", on_device(TORCH_CASES))
def test_torch_autograd_with_respect_to_x(dev, impl, scheme):
    rng = np.random.default_rng(0)
    qw = quantize(rng, N, K, scheme, 0.1)
    x = torch.from_numpy(rng.standard_normal((5, K)).astype(np.float32))
    c = rng.standard_normal((5, N))
    d = device(dev)
    xd = x.to(d).requires_grad_()
    y = torch.ops.xla.quantized_matmul(
        xd, to_torch(qw.w).to(d), to_torch(qw.scale).to(d),
        None if qw.zero_point is None else to_torch(qw.zero_point).to(d),
        block_size=scheme.block_size, int4_weight=scheme.bits == 4,
        quantize_activation=scheme.quantize_activation, impl=impl)
    (y * torch.from_numpy(c.astype(np.float32)).to(d)).sum().backward()
    assert_dx(xd.grad.cpu().numpy(), c, dequantized(qw.w, qw.scale, qw.zero_point, scheme))


class LoRALinear(torch.nn.Module):
    """A frozen quantized linear plus a trainable low-rank update x @ A.T @ B.T."""

    def __init__(self, base, a):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = torch.nn.Parameter(torch.from_numpy(a))
        self.b = torch.nn.Parameter(torch.zeros(base.output_dim, a.shape[0]))

    def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.b.T


def quantized_linear(qw, bias, scheme, d):
    m = torch_bridge.XlaQuantizedLinear(qw.in_features, qw.out_features,
                                        is_symmetric=scheme.symmetric,
                                        block_size=scheme.block_size, int4_weight=scheme.bits == 4,
                                        quantize_activation=scheme.quantize_activation, bias=True)
    m.load_quantized_weight(qw)
    with torch.no_grad():
        m.bias.copy_(torch.from_numpy(bias))  # frozen too: it must not move either
    return m.to(d)


@contextlib.contextmanager
def single_torch_thread_on_cpu(dev):
    """On CPU tensors, torch ops and the JAX calls of the bridge alternate. With
    more than one torch thread, OpenMP workers spin after each torch op and
    starve XLA's CPU threads: on this 2-core machine 60 steps took ~15 s with
    2 torch threads and ~0.15 s with 1 (or with OMP_WAIT_POLICY=PASSIVE)."""
    before = torch.get_num_threads()
    if dev == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dev,scheme", on_device([("cpu", TRAIN_SCHEMES[3]),
                                                  ("xla", TRAIN_SCHEMES[1])]))
def test_torch_lora_learns_on_frozen_quantized_base(dev, scheme):
    qw1, qw2, biases, x, y, a1, a2 = task(scheme, seed=1)
    d = device(dev)
    l1 = LoRALinear(quantized_linear(qw1, biases[0], scheme, d), a1).to(d)
    l2 = LoRALinear(quantized_linear(qw2, biases[1], scheme, d), a2).to(d)
    frozen = {f"{i}.{k}": v.detach().cpu().clone()
              for i, l in enumerate((l1, l2)) for k, v in l.base.state_dict().items()}
    params = [p for l in (l1, l2) for p in l.parameters() if p.requires_grad]
    assert len(params) == 4  # a and b of each layer; nothing of the base
    opt = torch.optim.Adam(params, lr=LR)
    xt, yt = torch.from_numpy(x).to(d), torch.from_numpy(y).to(d)
    losses = []
    with single_torch_thread_on_cpu(dev):
        for _ in range(STEPS):
            opt.zero_grad()
            loss = torch.mean((l2(torch.tanh(l1(xt))) - yt) ** 2)
            loss.backward()
            opt.step()
            if dev == "xla":
                torch_xla.sync()
            losses.append(loss.detach())
    losses = np.array([float(v) for v in losses])
    assert np.isfinite(losses).all()
    assert losses[-1] * LOSS_DROP <= losses[0], (losses[0], losses[-1])
    for i, l in enumerate((l1, l2)):
        for k, v in l.base.state_dict().items():
            before, after = frozen[f"{i}.{k}"], v.detach().cpu()
            assert before.dtype == after.dtype and torch.equal(before, after), f"{i}.{k}"
