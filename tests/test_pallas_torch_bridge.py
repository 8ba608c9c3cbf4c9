"""The Pallas kernels through the torch bridge: torch.ops.xla.quantized_matmul(...,
impl="pallas") on torch_xla's CPU device (PJRT_DEVICE=CPU), where call_jax embeds
the TPU kernel body in interpret mode into the torch_xla graph, and on CPU
tensors. Checked against the float64 numpy reference.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numpy_reference as ref
from cases import Scheme, make_weight

import torch_bridge  # noqa: F401  (registers the op)
from conftest import HAVE_TORCH_XLA

if HAVE_TORCH_XLA:  # the XLA-device tests (marked torch_xla); CPU tensors need only torch
    import torch_xla

CORE = [Scheme(8, -1, False, False, False), Scheme(4, 128, False, True, False),
        Scheme(8, -1, True, False, True), Scheme(4, 64, False, True, True)]
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def to_numpy(t):
    t = t.detach().cpu()
    return t.float().numpy().astype(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def make_case(scheme, m, k, n, x_dtype, seed=0):
    rng = np.random.default_rng(seed)
    qw = make_weight(rng, n, k, scheme)
    as_torch = lambda a: None if a is None else torch.from_numpy(np.array(a))
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(TORCH_DTYPES[x_dtype])
    return x, as_torch(qw.w), as_torch(qw.scale), as_torch(qw.zero_point)


def check(y, x, w, scale, zp, scheme):
    assert y.dtype == x.dtype
    ref.assert_close(to_numpy(y), to_numpy(x), to_numpy(w), to_numpy(scale),
                     None if zp is None else to_numpy(zp), scheme.block_size,
                     scheme.quantize_activation)


def op(x, w, scale, zp, scheme):
    return torch.ops.xla.quantized_matmul(x, w, scale, zp, block_size=scheme.block_size,
                                          int4_weight=scheme.bits == 4,
                                          quantize_activation=scheme.quantize_activation,
                                          impl="pallas")


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scheme", CORE, ids=lambda s: s.id)
@pytest.mark.torch_xla
def test_xla_device_impl_pallas(scheme, x_dtype):
    x, w, scale, zp = make_case(scheme, m=6, k=512, n=256, x_dtype=x_dtype)
    dev = torch_xla.device()
    y = op(x.to(dev), w.to(dev), scale.to(dev), None if zp is None else zp.to(dev), scheme)
    assert y.device.type == "xla" and y.shape == (6, 256)
    # The graph holds the interpreted TPU kernel (its grid loop, ops whose
    # source metadata is the kernel file), not the fused XLA formula.
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([y])
    assert "pallas_kernels/tpu/quantized_matmul.py" in hlo and "while" in hlo
    check(y.cpu(), x, w, scale, zp, scheme)


@pytest.mark.parametrize("scheme", CORE[:2], ids=lambda s: s.id)
def test_cpu_tensors_impl_pallas(scheme):
    x, w, scale, zp = make_case(scheme, m=3, k=256, n=128, x_dtype="bfloat16", seed=1)
    y = op(x, w, scale, zp, scheme)
    assert y.device.type == "cpu"
    check(y, x, w, scale, zp, scheme)


@pytest.mark.torch_xla
def test_quantized_linear_impl_pallas_on_xla_device():
    scheme = Scheme(4, 128, True, True, False)
    linear = torch.nn.Linear(256, 128, bias=False)
    module = torch_bridge.XlaQuantizedLinear.from_float(linear, bits=4, block_size=128,
                                                        impl="pallas")
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(0))
    dev = torch_xla.device()
    y = module.to(dev)(x.to(dev))
    assert y.shape == (2, 3, 128)
    check(y.cpu().reshape(6, 128), x.reshape(6, 256), module.weight.cpu(),
          module.weight_scaler.cpu(), None, scheme)
