"""torch_xla SPMD with XlaQuantizedLinear on 8 CPU devices; tests/test_torch_spmd.py asserts.

torch_xla's PJRT CPU client exposes CPU_NUM_DEVICES devices, and SPMD mode
(torch_xla.runtime.use_spmd) must be switched on before any XLA tensor
exists, so this runs in its own process, started with

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=8 XLA_FLAGS="--xla_dump_to=OUT/dump \\
        --xla_dump_hlo_as_text --xla_dump_hlo_module_re=SyncTensorsGraph" \\
        python tests/torch_spmd_child.py OUT

For every scheme row (the int rows, and float element formats: fp8 weights
per-channel and blockwise, with and without fp8 activations, MX and NV fp4)
and both layouts it shards one XlaQuantizedLinear's buffers with xs.mark_sharding (specs from xla_qops.sharding.layout_specs),
runs it, and writes ``OUT/<case>.npz`` (inputs, result, sharding specs) and
``OUT/hlo.json`` (collectives in the partitioned HLO XLA compiled for the
case's graph, read from the dump). It asserts nothing but the device count.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import numpy as np
import torch
import torch_xla
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch_bridge  # noqa: E402
from cases import Scheme  # noqa: E402
from spmd_child import FloatScheme, collectives  # noqa: E402
from xla_qops import sharding  # noqa: E402

K, N, BLOCK = 128, 48, 32
SCHEMES = [Scheme(bits, block, False, bits == 4, qa)
           for bits in (8, 4) for block in (-1, BLOCK) for qa in (False, True)]
# The float rows (API.md section 7); per-channel fp8 activations make the row
# split share each token's maximum across the shards, as int8 does.
FLOAT_SCHEMES = [FloatScheme("fp8", -1, "fp8"), FloatScheme("fp8", BLOCK),
                 FloatScheme("mxfp4", BLOCK), FloatScheme("nvfp4", 16, "fp8")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def case_id(layout: str, scheme: Scheme, dtype: str) -> str:
    return f"{layout}-{scheme.id}-{dtype}"


def cases():
    return [(layout, s, ("float32", "bfloat16")[i % 2])
            for i, s in enumerate(SCHEMES + FLOAT_SCHEMES) for layout in sharding.LAYOUTS]


def compiled_modules(dump: str) -> set[str]:
    return set(glob.glob(os.path.join(dump, "*SyncTensorsGraph*after_optimizations.txt")))


def run_docs_example(out: str) -> None:
    """Runs docs/scaling.md's torch_xla block as written; saves what it computed."""
    text = open(os.path.join(os.path.dirname(HERE), "docs", "scaling.md")).read()
    ns = {}
    exec(compile(re.findall(r"```python\n(.*?)```", text, re.S)[1], "scaling.md", "exec"), ns)
    layer, y = ns["layer"], ns["y"]
    np.savez(os.path.join(out, "docs-scaling-torch.npz"), x=ns["x"].cpu().numpy(),
             y=y.detach().cpu().numpy(), w=layer.weight.cpu().numpy(),
             scale=layer.weight_scaler.cpu().numpy(),
             y_spec=np.array(torch_xla._XLAC._get_xla_sharding_spec(y)))


# The Megatron pair: up (column, W4A16 g32) -> gelu -> down (row, W8A8 pc),
# both asymmetric, the intermediate split along its features in between.
MLP_HIDDEN = 128
MLP_SCHEMES = (Scheme(4, BLOCK, False, True, False), Scheme(8, -1, False, False, True))


def quantized_linear(rng, n, k, scheme, dev):
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(
            rng.standard_normal((n, k)).astype(np.float32) * 0.1
            + rng.uniform(-0.05, 0.05, (n, 1)).astype(np.float32)))
    if isinstance(scheme, FloatScheme):
        return torch_bridge.XlaQuantizedLinear.from_float(
            linear, block_size=scheme.block_size, format=scheme.format,
            quantize_activation=scheme.quantize_activation,
            activation_format=scheme.activation_format).to(dev)
    return torch_bridge.XlaQuantizedLinear.from_float(
        linear, bits=scheme.bits, block_size=scheme.block_size, symmetric=False,
        quantize_activation=scheme.quantize_activation).to(dev)


def mark_layout(module, mesh, layout: str) -> None:
    w_spec, s_spec = sharding.layout_specs(module.block_size != -1, layout, "model")
    xs.mark_sharding(module.weight, mesh, tuple(w_spec))
    xs.mark_sharding(module.weight_scaler, mesh, tuple(s_spec))
    if module.zero_point is not None:
        xs.mark_sharding(module.zero_point, mesh, tuple(s_spec))


def buffers(module) -> dict:
    """The module's buffers as numpy: an fp8 weight as its uint8 bit patterns
    (numpy has no float8; tests/numpy_reference decodes the bits), no
    zero_point for the symmetric float formats."""
    w = module.weight.cpu()
    if w.dtype == torch.float8_e4m3fn:
        w = w.view(torch.uint8)
    record = dict(w=w.numpy(), scale=module.weight_scaler.cpu().numpy())
    if module.zero_point is not None:
        record["zero_point"] = module.zero_point.cpu().numpy()
    return record


def run_mlp(out: str, mesh, dev, dump: str, report: dict) -> None:
    """Column then row under SPMD: what the HLO moves, and the results."""
    rng = np.random.default_rng(1234)
    up = quantized_linear(rng, MLP_HIDDEN, K, MLP_SCHEMES[0], dev)
    down = quantized_linear(rng, N, MLP_HIDDEN, MLP_SCHEMES[1], dev)
    mark_layout(up, mesh, "column")
    mark_layout(down, mesh, "row")
    x = torch.from_numpy(rng.standard_normal((6, K)).astype(np.float32))
    x_dev = x.to(dev)
    xs.mark_sharding(x_dev, mesh, ("data", None))
    before = compiled_modules(dump)
    h = up(x_dev)
    g = torch.nn.functional.gelu(h)
    y = down(g)
    torch_xla.sync()
    new = sorted(compiled_modules(dump) - before)
    report["mlp"] = {"modules": [os.path.basename(f) for f in new],
                     "collectives": [c for f in new for c in collectives(open(f).read())]}
    spec = torch_xla._XLAC._get_xla_sharding_spec
    record = dict(x=x.numpy(), h=h.cpu().numpy(), g=g.cpu().numpy(), y=y.cpu().numpy(),
                  h_spec=np.array(spec(h)))
    for name, module in (("up", up), ("down", down)):
        record.update({f"{name}_{k}": v for k, v in buffers(module).items()})
    np.savez(os.path.join(out, "mlp.npz"), **record)


def main(out: str) -> None:
    xr.use_spmd()
    n = xr.global_runtime_device_count()
    assert n == 8, f"expected 8 devices (CPU_NUM_DEVICES=8), got {n}"
    mesh = xs.Mesh(np.arange(n), (2, n // 2), ("data", "model"))
    dev = torch_xla.device()
    dump = os.path.join(out, "dump")
    report = {"devices": n}
    for layout, scheme, dtype in cases():
        cid = case_id(layout, scheme, dtype)
        rng = np.random.default_rng(len(report))
        module = quantized_linear(rng, N, K, scheme, dev)
        mark_layout(module, mesh, layout)
        x = torch.from_numpy(rng.standard_normal((6, K)).astype(np.float32)).to(DTYPES[dtype])
        x_dev = x.to(dev)
        xs.mark_sharding(x_dev, mesh, ("data", "model" if layout == "row" else None))

        before = compiled_modules(dump)
        y = module(x_dev)
        torch_xla.sync()
        new = sorted(compiled_modules(dump) - before)
        report[cid] = {"modules": [os.path.basename(f) for f in new],
                       "collectives": [c for f in new for c in collectives(open(f).read())]}
        spec = torch_xla._XLAC._get_xla_sharding_spec
        np.savez(os.path.join(out, cid + ".npz"),
                 x=x.float().numpy(), y=y.cpu().float().numpy(), **buffers(module),
                 y_spec=np.array(spec(y)), w_spec=np.array(spec(module.weight)))
    run_mlp(out, mesh, dev, dump, report)
    run_docs_example(out)
    with open(os.path.join(out, "hlo.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
