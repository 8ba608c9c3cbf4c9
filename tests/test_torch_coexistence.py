"""Import order: torch_bridge and torch_xla's experimental module, both ways
round, each in a fresh process; afterwards the op runs this project's kernels.

Proof that ours runs, beyond the dispatcher's registration record: schemes
torch_xla's kernels refuse (packed uint8 int4 and blockwise W8A8 assert in
torch_xla) give the float64 reference's result, on CPU and XLA tensors, and
torch_xla's own XlaQuantizedLinear, whose forward calls the op, gains them too.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest


REPO = pathlib.Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np, torch, torch_xla
    import numpy_reference as ref

    dump = torch._C._dispatch_dump("xla::quantized_matmul")
    active = [l for l in dump.splitlines()
              if l.startswith(("XLA:", "CompositeExplicitAutograd[alias]:"))]
    assert len(active) == 2 and all("torch_bridge/op.py" in l for l in active), dump

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))

    def weight(bits, block):  # random ints in API.md's blockwise layout (numpy only)
        lim = 8 if bits == 4 else 128
        q = rng.integers(-lim, lim, (64 // block, block, 24)).astype(np.int8)
        s = rng.uniform(0.01, 0.02, (64 // block, 24)).astype(np.float32)
        z = rng.uniform(-0.01, 0.01, (64 // block, 24)).astype(np.float32)
        return q, s, z

    dev = torch_xla.device()
    for bits, block, qa in [(4, 32, False), (8, 16, True), (4, 16, True)]:
        q, s, z = weight(bits, block)
        w = ref.pack_int4(q, 1) if bits == 4 else q  # int4: packed uint8
        for device in ("cpu", dev):
            args = [torch.from_numpy(a).to(device) for a in (w, s, z)]
            y = torch.ops.xla.quantized_matmul(
                x.to(device), *args, block_size=block, int4_weight=bits == 4,
                quantize_activation=qa)
            ref.assert_close(y.cpu().numpy(), x.numpy(), w, s, z, block, qa)

    # torch_xla's own module, fed its own layout (unpacked int4, blockwise);
    # torch_xla's kernels assert on blockwise + activation quantization.
    from torch_xla.experimental.xla_quantized_matmul import XlaQuantizedLinear
    q, s, _ = weight(4, 32)
    m = XlaQuantizedLinear(64, 24, is_symmetric=True, block_size=32, int4_weight=True,
                           quantize_activation=True)
    m.load_quantized_weight(torch.from_numpy(q), torch.from_numpy(s))
    y = m.to(dev)(x.to(dev))
    ref.assert_close(y.cpu().numpy(), x.numpy(), q, s, None, 32, True)
    print("COEXISTENCE-OK")
""").format(tests=str(REPO / "tests"))

ORDERS = {
    "torch_xla_first": "import torch_xla.experimental.xla_quantized_matmul\nimport torch_bridge\n",
    "torch_bridge_first": "import torch_bridge\nimport torch_xla.experimental.xla_quantized_matmul\n",
}


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PJRT_DEVICE="CPU",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.torch_xla
def test_import_order(order):
    result = run_python(ORDERS[order] + CHECK)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "COEXISTENCE-OK" in result.stdout


def test_without_torch_xla_the_op_is_defined_here():
    """torch_xla missing (import blocked): torch_bridge defines the op with
    torch_xla's schema itself; CPU tensors, the impl overload and autograd work."""
    code = textwrap.dedent("""
        import sys
        sys.modules["torch_xla"] = None  # `import torch_xla` now raises ImportError
        sys.path.insert(0, {tests!r})
        import numpy as np, torch
        import torch_bridge, numpy_reference as ref
        assert not torch_bridge.op.HAS_TORCH_XLA
        schema = str(torch.ops.xla.quantized_matmul.default._schema)
        assert schema == "xla::" + torch_bridge.op.SCHEMA, schema
        rng = np.random.default_rng(0)
        q = rng.integers(-8, 8, (2, 16, 8)).astype(np.int8)  # blockwise int4, B=16
        w = torch.from_numpy(ref.pack_int4(q, 1))
        s = torch.from_numpy(rng.uniform(0.01, 0.02, (2, 8)).astype(np.float32))
        x = torch.randn(2, 32, requires_grad=True)
        for kw in ({{}}, {{"impl": "reference"}}):
            y = torch.ops.xla.quantized_matmul(x, w, s, None, 16, True, **kw)
            ref.assert_close(y.detach().numpy(), x.detach().numpy(), w.numpy(), s.numpy(),
                             None, 16)
        y.sum().backward()
        w_deq = ref.dequantize(w.numpy(), s.numpy(), None, 16, True)  # [8, 32] float64
        # dx = ones @ w_deq, float32 sums of 8 terms: (8 + 2) * 2^-24 * sum |w|.
        err = np.abs(x.grad.numpy() - w_deq.sum(0))
        assert np.all(err <= 10 * 2.0 ** -24 * np.abs(w_deq).sum(0)), err.max()
        print("NO-TORCH-XLA-OK")
    """).format(tests=str(REPO / "tests"))
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "NO-TORCH-XLA-OK" in result.stdout
