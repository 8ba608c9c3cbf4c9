"""Tensor-parallel quantized matmul (xla_qops.sharding) on 8 virtual CPU devices.

The matmuls run in one subprocess (tests/spmd_child.py) started with
XLA_FLAGS=--xla_force_host_platform_device_count=8, because this pytest process
initialised JAX with one device. Every assertion is made here:

* column-parallel equals the single-device result on the same rows bit for
  bit (each device runs the same computation on fewer output channels);
* row-parallel sums float32 partials in a different order, so it is checked
  against the float64 reference with tests/numpy_reference's tolerance, like
  the single-device result;
* the compiled HLO of the sharded op has no all-gather at all (and, with the
  row layout, the all-reduce of the result); a control that replicates the
  weight on purpose shows that the parser does find an all-gather of it;
* gradients with respect to x match c @ W in float64;
* the same under plain jax.jit with NamedSharding inputs (xla_qops.partitioning,
  no shard_map): batch, column and row splits and their 2-D combinations, on
  Auto and Explicit mesh axes, with Shardy and with GSPMD, the Megatron pair,
  and the fallbacks for splits the kernels cannot honour.

Layout checks (no devices needed) run in this process on an AbstractMesh.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import numpy_reference as ref
import spmd_child
from cases import Scheme, make_weight
from conftest import expected_impls
from xla_qops import dispatch, sharding

HERE = os.path.dirname(os.path.abspath(__file__))
# The implementations run sharded: those available here, which must include every
# one this environment is expected to have (test_no_expected_impl_is_left_out).
IMPLS = tuple(name for name in ("xla", "reference", "custom_call", "pallas")
              if dispatch._module(name).available())
CASES = spmd_child.cases(IMPLS)
MATMUL_CASES = [c for c in CASES if not c.grad]
GRAD_CASES = [c for c in CASES if c.grad]


def test_no_expected_impl_is_left_out():
    """An implementation that should exist here (conftest.expected_impls) but is
    not available would drop its sharded cases silently: that is a failure."""
    missing = expected_impls() - set(IMPLS)
    assert not missing, f"expected but not available, so not run sharded: {sorted(missing)}"


@pytest.fixture(scope="module")
def spmd_run(tmp_path_factory):
    """Runs every case on 8 virtual devices once; returns (out_dir, hlo report)."""
    return run_spmd_child(tmp_path_factory.mktemp("spmd"), *IMPLS)


def run_spmd_child(out, *args):
    """tests/spmd_child.py OUT ARGS on 8 virtual CPU devices -> (out, hlo report)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "spmd_child.py"), str(out),
                           *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"spmd_child failed:\n{proc.stderr[-4000:]}"
    with open(out / "hlo.json") as f:
        return out, json.load(f)


def load(out, case_id):
    return dict(np.load(out / f"{case_id}.npz"))


def weight_args(rec):
    return rec["w"], rec["scale"], rec.get("zero_point")


def typed_x(rec, x_dtype):
    # Stored as float32 (exact for bf16/f16); the tolerance needs the real dtype.
    return np.asarray(jnp.asarray(rec["x"], x_dtype))


def expected_shard_shape(case):
    k = case.k
    s = case.scheme
    bs = s.block_size
    n_model = 4 if case.mesh == "2x4" else 8
    k_stored = k // 2 if s.packed else k
    if s.block_size == -1:
        full = [spmd_child.N, k_stored]
        axis = 0 if case.layout == "column" else 1
    else:
        full = [k // bs, bs // 2 if s.packed else bs, spmd_child.N]
        axis = 2 if case.layout == "column" else 0
    full[axis] //= n_model
    return full


@pytest.mark.parametrize("case", MATMUL_CASES, ids=lambda c: c.id)
def test_sharded_matches_single_device(spmd_run, case):
    out, _ = spmd_run
    check_sharded_matmul(load(out, case.id), case)


def assert_close_to_reference(y, rec, case):
    """`y` against the float64 reference of the case's inputs (any format)."""
    ref.assert_close(y, typed_x(rec, case.x_dtype), *weight_args(rec), case.scheme.block_size,
                     case.scheme.quantize_activation,
                     **spmd_child.reference_formats(case.scheme))


def check_sharded_matmul(rec, case):
    """A shard_map case: shard shapes, the float64 reference, bit-exactness of
    column splits and where the result lives."""
    # Each of the 8 devices holds a 1/n slice along the layout's axis.
    assert rec["shard_shapes"].shape[0] == 8
    assert all(list(s) == expected_shard_shape(case) for s in rec["shard_shapes"])
    assert_close_to_reference(rec["y_sharded"], rec, case)
    if case.layout == "column":
        # Bit for bit against one device multiplying the same rows (a batch
        # axis gives each device one batch element): the result of a row may
        # depend on how many rows are multiplied together (the C++ kernels and
        # XLA:CPU's dot pick their loop form by the row count), never on how
        # many output channels.
        np.testing.assert_array_equal(rec["y_sharded"], rec["y_single_rows"])
    if case.layout == "column":
        assert str(rec["y_spec"]).endswith("'model')")  # y stays split along out
    else:
        assert_close_to_reference(rec["y_single"], rec, case)
        assert "model" not in str(rec["y_spec"])  # y is whole after the all-reduce


@pytest.mark.parametrize("case", MATMUL_CASES, ids=lambda c: c.id)
def test_sharded_hlo_has_no_all_gather(spmd_run, case):
    _, hlo = spmd_run
    check_sharded_hlo(hlo[case.id], case)


def check_sharded_hlo(ops, case):
    assert not [o for o in ops if o[0] == "all-gather"], ops
    if case.layout == "column":
        assert ops == []  # no communication at all
    else:
        assert_row_reductions(ops, case.scheme)


def assert_row_reductions(ops, scheme):
    """A row split's collectives: the all-reduce of the float32 partial sums
    [.., out], plus one of the token maxima for per-channel A8; nothing else."""
    assert set(op for op, _ in ops) == {"all-reduce"}, ops
    reduces = [shape for _, shape in ops]
    assert any(s.startswith("f32[") and f",{spmd_child.N}]" in s for s in reduces), ops
    global_absmax = scheme.quantize_activation and scheme.block_size == -1
    assert len(reduces) == (2 if global_absmax else 1), ops


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_sharded_gradient_with_respect_to_x(spmd_run, case):
    out, _ = spmd_run
    rec = load(out, case.id)
    for name in ("dx_single", "dx_sharded"):
        assert_gradient_is_c_times_w(rec, case.scheme, name)


def assert_gradient_is_c_times_w(rec, scheme, name):
    """d/dx sum(y * c) = c @ W (activation quantization is straight-through)."""
    w, scale, zp = weight_args(rec)
    weight_format = spmd_child.reference_formats(scheme)["weight_format"]
    w64 = ref.dequantize_any(w, scale, zp, scheme.block_size, weight_format)
    c = rec["c"].reshape(-1, spmd_child.N).astype(np.float64)
    dx_ref = (c @ w64).reshape(rec["x"].shape)
    bound = ((w64.shape[1] + spmd_child.N) * 2.0 ** -24
             * (np.abs(c) @ np.abs(w64)).reshape(dx_ref.shape))
    err = np.abs(rec[name] - dx_ref)
    assert np.all(err <= 4 * bound + 2.0 ** -24 * np.abs(dx_ref)), (name, err.max())


# ---- plain jax.jit with NamedSharding inputs (xla_qops.partitioning) ----

PLAIN_CASES = spmd_child.plain_cases(IMPLS)
PLAIN_MATMUL = [c for c in PLAIN_CASES if not c.grad]
PLAIN_GRAD = [c for c in PLAIN_CASES if c.grad]


def full_shape_gathers(ops, *arrays):
    """The all-gathers whose result is one of `arrays` whole (same dims)."""
    shapes = {tuple(a.shape) for a in arrays if a is not None}
    return [shape for op, shape in ops if op == "all-gather" and dims(shape) in shapes]


def dims(shape: str) -> tuple:
    inside = shape.split("[", 1)[1].split("]", 1)[0]
    return tuple(int(d) for d in inside.split(",") if d)


@pytest.mark.parametrize("case", PLAIN_MATMUL, ids=lambda c: c.id)
def test_plain_jit_matches_single_device(spmd_run, case):
    """quantized_matmul under plain jax.jit on sharded operands: an m or n
    split (batch, column) is bit for bit one device on the same rows; a k
    split (row) sums float32 partials in another order, so it is checked
    against the float64 reference with the single-device tolerance."""
    out, _ = spmd_run
    check_plain_matmul(load(out, case.id), case)


def check_plain_matmul(rec, case):
    assert_close_to_reference(rec["y_sharded"], rec, case)
    spec = str(rec["y_spec"])
    if case.placement.endswith("row"):
        assert "model" not in spec  # whole along out after the all-reduce
    else:
        np.testing.assert_array_equal(rec["y_sharded"], rec["y_single_rows"])
    if case.placement.endswith("column"):
        assert spec.endswith("'model')"), spec  # y stays split along out
    if case.placement.startswith("batch"):
        assert spec.startswith("('data'"), spec  # and along the batch


@pytest.mark.parametrize("case", PLAIN_MATMUL, ids=lambda c: c.id)
def test_plain_jit_hlo_gathers_no_weight(spmd_run, case):
    """No all-gather in the compiled HLO: the kernels run on the slices each
    device holds. Batch and column splits need no communication at all; a row
    split one all-reduce of the float32 partials (and, for per-channel A8,
    one of the token maxima). The xla impl is split by XLA itself, which may
    choose other collectives, but never gathers the weight, scale or zero point."""
    out, hlo = spmd_run
    check_plain_hlo(hlo[case.id], out, case)


def check_plain_hlo(ops, out, case):
    if case.impl == "xla":
        rec = load(out, case.id)
        assert not full_shape_gathers(ops, rec["w"], rec["scale"], rec.get("zero_point")), ops
        return
    assert not [o for o in ops if o[0] == "all-gather"], ops
    if not case.placement.endswith("row"):
        assert ops == [], ops
        return
    assert_row_reductions(ops, case.scheme)


@pytest.mark.parametrize("case", PLAIN_GRAD, ids=lambda c: c.id)
def test_plain_jit_gradient_with_respect_to_x(spmd_run, case):
    out, _ = spmd_run
    rec = load(out, case.id)
    assert_gradient_is_c_times_w(rec, case.scheme, "dx_sharded")


@pytest.mark.parametrize("impl, explicit", [(impl, explicit) for impl, explicit in spmd_child.MLP_CASES
                                            if impl == "auto" or impl in IMPLS])
def test_plain_jit_megatron_mlp(spmd_run, impl, explicit):
    """up (column) -> gelu -> down (row, W8A8) under plain jit: the
    intermediate stays split along its features, the only communication is
    the row layer's all-reduces, and both layers match the float64 reference."""
    out, hlo = spmd_run
    cid = f"mlp-{'explicit' if explicit else 'auto-axes'}-{impl}"
    rec = load(out, cid)
    assert str(rec["h_spec"]) == str(("data", None, "model"))
    up, down = spmd_child.MLP_SCHEMES
    ref.assert_close(rec["h"], rec["x"], rec["up_w"], rec["up_scale"], rec["up_zero_point"],
                     up.block_size)
    ref.assert_close(rec["y"], rec["g"], rec["down_w"], rec["down_scale"],
                     rec["down_zero_point"], down.block_size, True)
    ops = hlo[cid]
    assert set(op for op, _ in ops) == {"all-reduce"}, ops
    if impl != "xla":  # the token maxima and the partial products
        assert sorted(s.split("{")[0] for _, s in ops) == ["f32[3,1]", f"f32[3,{spmd_child.N}]"]


@pytest.mark.skipif("custom_call" not in set(IMPLS) | expected_impls(),
                    reason="custom_call backend not built on this platform")
@pytest.mark.parametrize("name", spmd_child.FALLBACKS)
def test_plain_jit_fallback_reshards_and_stays_exact(spmd_run, name):
    """Splits the rule cannot honour (a packed byte or a block cut by a shard
    boundary, blocks the shards do not divide) are resharded by XLA -- an
    all-gather of the split operand -- and the result is still right."""
    out, hlo = spmd_run
    check_fallback(out, hlo, name, spmd_child.FALLBACKS[name])


def check_fallback(out, hlo, name, fallback):
    rec = load(out, f"fallback-{name}")
    scheme, k, _, _ = fallback
    ref.assert_close(rec["y_sharded"], rec["x"], *weight_args(rec), scheme.block_size,
                     scheme.quantize_activation, **spmd_child.reference_formats(scheme))
    gathered = [dims(s) for op, s in hlo[f"fallback-{name}"] if op == "all-gather"]
    # The weight whole, or else x's rows.
    whole = tuple(rec["w"].shape) if name == "inside-blocks" else (6, k)
    assert whole in gathered, hlo[f"fallback-{name}"]


@pytest.mark.parametrize("impl", [i for i in ("custom_call", "xla") if i in IMPLS])
def test_weight_all_gather_is_detected_when_forced(spmd_run, impl):
    """Control for the HLO tests: replicating the weight inside the jit shows
    up as an all-gather of the stored (packed uint8) weight."""
    _, hlo = spmd_run
    gathers = [shape for op, shape in hlo[f"control-gathered-weight-{impl}"]
               if op == "all-gather"]
    full = (spmd_child.K // spmd_child.BLOCK, spmd_child.BLOCK // 2, spmd_child.N)
    assert full in [dims(s) for s in gathers], gathers


def test_scaling_doc_example(spmd_run):
    """docs/scaling.md's column -> gelu -> row MLP, run as written on 8 devices."""
    out, _ = spmd_run
    rec = load(out, "docs-scaling")
    args = {name: (rec[f"{name}_w"], rec[f"{name}_scale"], rec[f"{name}_zero_point"], 64)
            for name in ("up", "down")}
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16))
    assert rec["h"].shape == (4, 16, 512) and rec["y"].shape == (4, 16, 256)
    assert str(rec["h_spec"]) == str(P("data", None, "model"))
    ref.assert_close(rec["h"], bf16(rec["x"]), *args["up"])
    ref.assert_close(rec["y"], bf16(rec["g"]), *args["down"])


# ---- layout helpers and checks (this process, no devices needed) ----

MESH = AbstractMesh((2, 4), ("data", "model"))


def test_layout_for_common_projections():
    for name in ("model.layers.0.self_attn.q_proj", "layers.1.self_attn.k_proj", "v_proj",
                 "mlp.gate_proj", "mlp.up_proj", "encoder.layer.0.attention.self.query",
                 "encoder.layer.0.intermediate.dense"):
        assert sharding.layout_for(name) == "column", name
    for name in ("model.layers.0.self_attn.o_proj", "mlp.down_proj",
                 "encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"):
        assert sharding.layout_for(name) == "row", name
    with pytest.raises(ValueError, match="name: expected a module path ending in one of"):
        sharding.layout_for("lm_head")


def test_shard_quantized_weights_by_module_path():
    """On a 1-device mesh (this process): the layout comes from the name."""
    rng = np.random.default_rng(3)
    mesh = jax.make_mesh((1,), ("model",))
    named = {
        "layers.0.self_attn.q_proj": make_weight(rng, 8, 64, Scheme(4, 32, False, True, False)),
        "layers.0.mlp.down_proj": make_weight(rng, 8, 64, Scheme(8, -1, False, False, False)),
    }
    placed = sharding.shard_quantized_weights(named, mesh)
    q, down = placed["layers.0.self_attn.q_proj"], placed["layers.0.mlp.down_proj"]
    assert q.w.sharding.spec == P(None, None, "model")  # column, blockwise
    assert down.w.sharding.spec == P(None, "model")  # row, per-channel
    assert down.scale.sharding.spec == P(None)
    np.testing.assert_array_equal(np.asarray(q.w), np.asarray(named["layers.0.self_attn.q_proj"].w))
    with pytest.raises(ValueError, match="name: expected a module path"):
        sharding.shard_quantized_weights({"lm_head": named["layers.0.mlp.down_proj"]}, mesh)


def test_weight_partition_specs():
    rng = np.random.default_rng(0)
    pc = make_weight(rng, 8, 64, Scheme(4, -1, False, True, False))
    bw = make_weight(rng, 8, 64, Scheme(8, 32, True, False, False))
    col, row = (sharding.weight_partition_specs(pc, lay, "m") for lay in sharding.LAYOUTS)
    assert (col.w, col.scale, col.zero_point) == (P("m", None), P("m"), P("m"))
    assert (row.w, row.scale, row.zero_point) == (P(None, "m"), P(None), P(None))
    col, row = (sharding.weight_partition_specs(bw, lay, "m") for lay in sharding.LAYOUTS)
    assert (col.w, col.scale, col.zero_point) == (P(None, None, "m"), P(None, "m"), None)
    assert (row.w, row.scale, row.zero_point) == (P("m", None, None), P("m", None), None)


@pytest.mark.parametrize("n, k, scheme, layout, match", [
    (10, 64, Scheme(8, -1, True, False, False), "column",
     r"column-parallel splits out=10 over the 4 devices of mesh axis 'model'"),
    (8, 34, Scheme(8, -1, True, False, False), "row",
     r"in=34 over the 4 devices.*in must be a multiple of 4"),
    # 20 input features: 5 per shard, so a packed byte would straddle two shards.
    (8, 20, Scheme(4, -1, True, True, False), "row",
     r"packed int4 stores two input features per byte.*in=20, 5 per shard"),
    (8, 96, Scheme(4, 32, True, True, False), "row",
     r"whole blocks.*in/B = 96/32 = 3 blocks must be a multiple of 4"),
])
def test_layout_that_does_not_divide_is_refused(n, k, scheme, layout, match):
    qw = make_weight(np.random.default_rng(1), n, k, scheme)
    with pytest.raises(ValueError, match=match):
        sharding.check_layout(qw, MESH, layout, "model")
    x = jnp.zeros((2, k), jnp.float32)
    with pytest.raises(ValueError, match=match):
        sharding.sharded_quantized_matmul(x, qw, MESH, layout)


def test_bad_arguments_name_the_argument():
    qw = make_weight(np.random.default_rng(2), 8, 64, Scheme(8, -1, True, False, False))
    x = jnp.zeros((3, 64), jnp.float32)
    with pytest.raises(ValueError, match="layout: expected 'column' or 'row', got 'diagonal'"):
        sharding.check_layout(qw, MESH, "diagonal", "model")
    with pytest.raises(ValueError, match=r"axis_name: expected one of the mesh axes"):
        sharding.check_layout(qw, MESH, "column", "tensor")
    with pytest.raises(TypeError, match="qw: expected a xla_qops.QuantizedWeight, got tuple"):
        sharding.check_layout((qw.w, qw.scale), MESH, "column", "model")
    with pytest.raises(ValueError, match=r"x: batch_axis 'data' splits x.shape\[0\] over 2"):
        sharding.sharded_quantized_matmul(x, qw, MESH, "column", batch_axis="data")
    with pytest.raises(ValueError, match="batch_axis: expected None or a mesh axis other"):
        sharding.sharded_quantized_matmul(x[:2], qw, MESH, "column", batch_axis="model")
    with pytest.raises(ValueError, match=r"w: expected shape \[8, 32\]"):  # the op's own check
        sharding.sharded_quantized_matmul(x[:, :32], qw, MESH, "column")
    with pytest.raises(ValueError, match="impl: expected one of"):
        sharding.sharded_quantized_matmul(x, qw, MESH, "column", impl="cuda")
