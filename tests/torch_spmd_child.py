"""torch_xla SPMD with XlaQuantizedLinear on 8 CPU devices; tests/test_torch_spmd.py asserts.

torch_xla's PJRT CPU client exposes CPU_NUM_DEVICES devices, and SPMD mode
(torch_xla.runtime.use_spmd) must be switched on before any XLA tensor
exists, so this runs in its own process, started with

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=8 XLA_FLAGS="--xla_dump_to=OUT/dump \\
        --xla_dump_hlo_as_text --xla_dump_hlo_module_re=SyncTensorsGraph" \\
        python tests/torch_spmd_child.py OUT

For every scheme row and both layouts it shards one XlaQuantizedLinear's
buffers with xs.mark_sharding (specs from xla_qops.sharding.layout_specs),
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
from spmd_child import collectives  # noqa: E402
from xla_qops import sharding  # noqa: E402

K, N, BLOCK = 128, 48, 32
SCHEMES = [Scheme(bits, block, False, bits == 4, qa)
           for bits in (8, 4) for block in (-1, BLOCK) for qa in (False, True)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def case_id(layout: str, scheme: Scheme, dtype: str) -> str:
    return f"{layout}-{scheme.id}-{dtype}"


def cases():
    return [(layout, s, ("float32", "bfloat16")[i % 2])
            for i, s in enumerate(SCHEMES) for layout in sharding.LAYOUTS]


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
        linear = torch.nn.Linear(K, N, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(
                rng.standard_normal((N, K)).astype(np.float32) * 0.1
                + rng.uniform(-0.05, 0.05, (N, 1)).astype(np.float32)))
        module = torch_bridge.XlaQuantizedLinear.from_float(
            linear, bits=scheme.bits, block_size=scheme.block_size, symmetric=False,
            quantize_activation=scheme.quantize_activation).to(dev)
        w_spec, s_spec = sharding.layout_specs(scheme.block_size != -1, layout, "model")
        xs.mark_sharding(module.weight, mesh, tuple(w_spec))
        xs.mark_sharding(module.weight_scaler, mesh, tuple(s_spec))
        xs.mark_sharding(module.zero_point, mesh, tuple(s_spec))
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
                 x=x.float().numpy(), y=y.cpu().float().numpy(),
                 w=module.weight.cpu().numpy(), scale=module.weight_scaler.cpu().numpy(),
                 zero_point=module.zero_point.cpu().numpy(),
                 y_spec=np.array(spec(y)), w_spec=np.array(spec(module.weight)))
    run_docs_example(out)
    with open(os.path.join(out, "hlo.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
