"""The torch_xla quantized-ops doc's examples (seed 002), run verbatim with
`import torch_bridge` in place of `import torch_xla.experimental.xla_quantized_matmul`.

Each block is kept as text and exec'd; where the seed file is present, the
test also checks the text still is the seed's (with that one import line
swapped). The module-swap block has `...` placeholders (`MyModel`,
`quantize`, `process_for_xla`, and the `self` whose method it sits in); they
get small concrete stand-ins, the block itself is unchanged.
"""

import pathlib
import re
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import numpy_reference as ref

pytest.importorskip("torch_xla")

SEED = pathlib.Path("/work/shared/seeds/002_a6fb9c9d9d368438.txt")
ORIGINAL_IMPORT = "import torch_xla.experimental.xla_quantized_matmul"

OP_BLOCK = '''\
import torch
import torch_xla.core.xla_model as xm
import torch_bridge

N_INPUT_FEATURES=10
N_OUTPUT_FEATURES=20
x = torch.randn((3, N_INPUT_FEATURES), dtype=torch.bfloat16)
w_int = torch.randint(-128, 127, (N_OUTPUT_FEATURES, N_INPUT_FEATURES), dtype=torch.int8)
scaler = torch.randn((N_OUTPUT_FEATURES,), dtype=torch.bfloat16)

# Call with torch CPU tensor (For debugging purpose)
matmul_output = torch.ops.xla.quantized_matmul(x, w_int, scaler)

device = xm.xla_device()
x_xla = x.to(device)
w_int_xla = w_int.to(device)
scaler_xla = scaler.to(device)

# Call with XLA Tensor to run on XLA device
matmul_output_xla = torch.ops.xla.quantized_matmul(x_xla, w_int_xla, scaler_xla)

# Use with torch.compile(backend='openxla')
def f(x, w, s):
  return torch.ops.xla.quantized_matmul(x, w, s)

f_dynamo = torch.compile(f, backend="openxla")
dynamo_out_xla = f_dynamo(x_xla, w_int_xla, scaler_xla)
'''

SWAP_BLOCK = '''\
orig_model = MyModel()
# Quantize the model and get quantized weights
q_weights = quantize(orig_model)
# Process the quantized weight to the format that XLA quantized op expects.
q_weights_for_xla = process_for_xla(q_weights)

# Do module swap
q_linear = XlaQuantizedLinear(self.linear.in_features,
                              self.linear.out_features)
q_linear.load_quantized_weight(q_weights_for_xla)
orig_model.linear = q_linear
'''


def seed_blocks():
    return re.findall(r"```Python\n(.*?)```", SEED.read_text(), re.S)


@pytest.mark.skipif(not SEED.exists(), reason="seed file not present on this machine")
def test_blocks_are_the_seed_text():
    blocks = seed_blocks()
    assert OP_BLOCK.replace("import torch_bridge", ORIGINAL_IMPORT) == blocks[0]
    assert SWAP_BLOCK == blocks[2]


def to_numpy(t):
    t = t.detach().cpu()
    return t.float().numpy().astype(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def test_op_block_cpu_xla_and_openxla():
    torch._dynamo.reset()
    counters.clear()
    ns = {}
    exec(compile(OP_BLOCK, "seed-002-op-block", "exec"), ns)
    x, w, s = (to_numpy(ns[k]) for k in ("x", "w_int", "scaler"))
    for name in ("matmul_output", "matmul_output_xla", "dynamo_out_xla"):
        y = ns[name]
        assert y.dtype == torch.bfloat16 and tuple(y.shape) == (3, 20), name
        ref.assert_close(to_numpy(y), x, w, s)
    assert ns["matmul_output_xla"].device.type == "xla"
    assert torch.equal(ns["dynamo_out_xla"].cpu(), ns["matmul_output_xla"].cpu())
    assert dict(counters["graph_break"]) == {}


class MyQLinearForXLABackend(torch.nn.Module):
    """Seed block 2 with its `...` filled in (and the missing super().__init__())."""

    def __init__(self):
        super().__init__()
        self.weight = None
        self.scaler = None

    def load_weight(self, w, scaler):
        # Load quantized Linear weights
        # Customized way to preprocess the weights
        processed_w, processed_scaler = w, scaler
        self.weight = processed_w
        self.scaler = processed_scaler

    def forward(self, x):
        # Do some random stuff with x
        matmul_output = torch.ops.xla.quantized_matmul(x, self.weight, self.scaler)
        # Do some random stuff with matmul_output
        return matmul_output


@pytest.mark.parametrize("device", ["cpu", "xla"])
def test_custom_module_block(device):
    import torch_xla
    dev = torch_xla.device() if device == "xla" else "cpu"
    w = torch.randint(-128, 127, (20, 10), dtype=torch.int8)
    s = torch.rand(20) * 0.01
    module = MyQLinearForXLABackend()
    module.load_weight(w.to(dev), s.to(dev))
    x = torch.randn(3, 10)
    ref.assert_close(module(x.to(dev)).cpu().numpy(), x.numpy(), w.numpy(), s.numpy())


def test_module_swap_block():
    import torch_bridge
    import xla_qops

    class MyModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(64, 32, bias=False)

        def forward(self, x):
            return torch.relu(self.linear(x))

    def quantize(model):  # int8 per-channel, asymmetric (torch_xla's module default)
        return xla_qops.quantize_weight(model.linear.weight.detach().numpy(), symmetric=False)

    def process_for_xla(q_weights):  # already in torch_xla's layout: nothing to do
        return q_weights

    ns = dict(MyModel=MyModel, quantize=quantize, process_for_xla=process_for_xla,
              XlaQuantizedLinear=torch_bridge.XlaQuantizedLinear,
              # the block sits in a method of an object holding the float linear
              self=types.SimpleNamespace(linear=torch.nn.Linear(64, 32)))
    exec(compile(SWAP_BLOCK, "seed-002-module-swap", "exec"), ns)
    model, q = ns["orig_model"], ns["q_weights"]
    assert isinstance(model.linear, torch_bridge.XlaQuantizedLinear)
    x = torch.randn(4, 64)
    y = model.linear(x)
    ref.assert_close(y.detach().numpy(), x.numpy(), np.asarray(q.w), np.asarray(q.scale),
                     np.asarray(q.zero_point))
    assert torch.equal(model(x), torch.relu(y))
