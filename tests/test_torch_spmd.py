"""torch_xla SPMD (xs.mark_sharding) with XlaQuantizedLinear on 8 CPU devices.

torch_xla's PJRT CPU client does allow several devices: CPU_NUM_DEVICES=8
gives 8 (XLA_FLAGS=--xla_force_host_platform_device_count does not; see
docs/scaling.md). SPMD mode must be on before any XLA tensor exists, so the
runs happen in a subprocess (tests/torch_spmd_child.py); the assertions are here:

* the result of a column- or row-sharded layer matches the float64 reference
  within tests/numpy_reference's tolerance, for every int scheme row and the
  float element formats (fp8 per-channel and blockwise, fp8 activations, MX
  and NV fp4);
* the buffers really are sharded, and the result is split along `out`
  (column) or whole along `out` after the reduction (row);
* the partitioned HLO that XLA compiled for the layer has no all-gather of the
  weight (GSPMD partitions the plain-HLO xla backend that torch_bridge embeds
  on XLA tensors); row-parallel has the all-reduce of the result.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from spmd_child import reference_formats

pytest.importorskip("torch_xla")
import torch_spmd_child as child  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = child.cases()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_spmd")
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="8")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={out / 'dump'}"
                        " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=SyncTensorsGraph")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "torch_spmd_child.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torch_spmd_child failed:\n{proc.stderr[-4000:]}"
    with open(out / "hlo.json") as f:
        return out, json.load(f)


def test_torch_xla_cpu_client_has_eight_spmd_devices(run):
    _, report = run
    assert report["devices"] == 8


@pytest.mark.parametrize("layout,scheme,dtype", CASES,
                         ids=[child.case_id(*c) for c in CASES])
def test_sharded_quantized_linear_matches_reference(run, layout, scheme, dtype):
    out, _ = run
    rec = dict(np.load(out / f"{child.case_id(layout, scheme, dtype)}.npz"))
    x = np.asarray(jnp.asarray(rec["x"], dtype))  # stored as float32, exact
    ref.assert_close(rec["y"], x, rec["w"], rec["scale"], rec.get("zero_point"),
                     scheme.block_size, scheme.quantize_activation, **reference_formats(scheme))
    assert str(rec["w_spec"]).startswith("{devices=["), rec["w_spec"]  # not replicated
    # data x model mesh (2, 4): column -> y tiled [2, 4]; row -> [2, 1] and
    # replicated over the model axis.
    expected = "{devices=[2,4]" if layout == "column" else "{devices=[2,1,4]"
    assert str(rec["y_spec"]).startswith(expected), rec["y_spec"]


@pytest.mark.parametrize("layout,scheme,dtype", CASES,
                         ids=[child.case_id(*c) for c in CASES])
def test_partitioned_hlo_does_not_gather_the_weight(run, layout, scheme, dtype):
    """Per-channel int4 row splits may move activations (strided even/odd
    slices across shards); no all-gather may be as large as the weight."""
    _, report = run
    entry = report[child.case_id(layout, scheme, dtype)]
    assert len(entry["modules"]) == 1, entry  # the layer's graph was compiled and read
    ops = entry["collectives"]
    weight_elements = child.N * child.K // (2 if scheme.bits == 4 else 1)
    gathers = [shape for op, shape in ops if op == "all-gather"]
    assert all(elements(s) < weight_elements for s in gathers), gathers
    if layout == "column":
        assert ops == [], ops
    else:
        assert any(is_result_all_reduce(op, shape) for op, shape in ops), ops


def is_result_all_reduce(op: str, shape: str) -> bool:
    """The row layout's all-reduce of the float32 partial results: 3 rows (6
    split over data) by out, in either order -- XLA computes some products
    transposed (the blockwise float rows: f32[48,3])."""
    return op == "all-reduce" and sorted(dims(shape)) == sorted((3, child.N))


def dims(shape: str) -> tuple:
    inside = shape.split("[", 1)[1].split("]", 1)[0]
    return tuple(int(d) for d in inside.split(",") if d)


def elements(shape: str) -> int:
    return int(np.prod(dims(shape)))


def test_megatron_mlp_keeps_the_intermediate_sharded(run):
    """up (column) -> gelu -> down (row, W8A8) with xs.mark_sharding: the
    intermediate stays split over data x model, nothing as large as a weight
    is gathered, the row layer all-reduces its [6, 48] result, and both
    layers match the float64 reference."""
    out, report = run
    rec = dict(np.load(out / "mlp.npz"))
    assert str(rec["h_spec"]).startswith("{devices=[2,4]"), rec["h_spec"]
    up, down = child.MLP_SCHEMES
    ref.assert_close(rec["h"], rec["x"], rec["up_w"], rec["up_scale"], rec["up_zero_point"],
                     up.block_size)
    ref.assert_close(rec["y"], rec["g"], rec["down_w"], rec["down_scale"], rec["down_zero_point"],
                     down.block_size, True)
    entry = report["mlp"]
    assert len(entry["modules"]) == 1, entry
    ops = entry["collectives"]
    smallest_weight = min(rec["up_w"].size, rec["down_w"].size)
    gathers = [shape for op, shape in ops if op == "all-gather"]
    assert all(elements(s) < smallest_weight for s in gathers), gathers
    assert any(op == "all-reduce" and f",{child.N}]" in shape for op, shape in ops), ops


def test_scaling_doc_torch_example(run):
    """docs/scaling.md's torch_xla block, run as written on 8 devices."""
    out, _ = run
    rec = dict(np.load(out / "docs-scaling-torch.npz"))
    assert rec["y"].shape == (6, 48)
    assert str(rec["y_spec"]).startswith("{devices=[2,4]"), rec["y_spec"]
    ref.assert_close(rec["y"], rec["x"], rec["w"], rec["scale"], None, 32)
