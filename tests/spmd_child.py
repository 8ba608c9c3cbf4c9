"""Runs the sharded matmuls on 8 virtual CPU devices; tests/test_sharding.py asserts.

JAX fixes its device count when it initialises, and the pytest process has
already done so with one CPU device. So test_sharding.py runs this file in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and
compares what it writes against the float64 reference. This file computes and
records only; it asserts nothing but the device count.

    python tests/spmd_child.py OUT_DIR IMPL [IMPL ...]

writes ``OUT_DIR/<case id>.npz`` per case (inputs, single-device result,
sharded result, gradients) and ``OUT_DIR/hlo.json`` (collectives found in each
compiled HLO).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import xla_qops  # noqa: E402
from xla_qops import sharding  # noqa: E402
from xla_qops.spec import MatmulSpec  # noqa: E402
from cases import Scheme, make_x  # noqa: E402

N_DEVICES = 8
K, N, BLOCK = 128, 48, 32
DTYPES = ("float32", "bfloat16", "float16")
# The eight scheme rows (W8A16, W4A16, W8A8, W4A8; per-channel and blockwise),
# with zero points (the per-channel row split relies on each shard subtracting
# its own sum(x_s) * zero_point) and int4 packed: every impl runs these.
CORE_SCHEMES = [Scheme(bits, block, False, packed, qa)
                for bits, packed in ((8, False), (4, True)) for block in (-1, BLOCK)
                for qa in (False, True)]
# Symmetric and unpacked-int4 forms, for the xla impl only: they change how a
# shard reads its slice, not the split itself.
EXTRA_SCHEMES = [Scheme(8, -1, True, False, True), Scheme(4, BLOCK, True, True, False),
                 Scheme(4, -1, False, False, False), Scheme(4, BLOCK, False, False, True)]
GRAD_SCHEMES = [Scheme(8, -1, False, False, True), Scheme(4, BLOCK, False, True, False)]


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str
    layout: str
    scheme: Scheme
    x_dtype: str
    rows: int  # tokens per batch element; 2 batch elements split over "data"
    mesh: str  # "2x4" (data x model) or "1x8" (model only)
    grad: bool = False

    @property
    def k(self) -> int:
        return 2 * K if self.mesh == "1x8" else K  # 8 shards of 32 features / 1 block

    @property
    def id(self) -> str:
        g = "-grad" if self.grad else ""
        return (f"{self.impl}-{self.layout}-{self.scheme.id}-{self.x_dtype}"
                f"-m{2 * self.rows}-{self.mesh}{g}")


def supported(impl: str, scheme: Scheme, x_dtype: str, k: int = K) -> bool:
    """Whether `impl` runs this scheme for x_dtype and for float32 (row-parallel
    shards run on float32 activations, see xla_qops.sharding)."""
    module = xla_qops.dispatch._module(impl)
    if not module.available():
        return False
    for dtype in {x_dtype, "float32"}:
        spec = MatmulSpec(in_features=k, out_features=N, block_size=scheme.block_size,
                          bits=scheme.bits, packed=scheme.packed,
                          has_zero_point=not scheme.symmetric,
                          quantize_activation=scheme.quantize_activation, x_dtype=dtype)
        if not module.supports(spec, "cpu"):
            return False
    return True


def cases(impls) -> list[Case]:
    """The case list; also imported by test_sharding.py to parametrize."""
    out = []
    for impl in impls:
        schemes = CORE_SCHEMES + (EXTRA_SCHEMES if impl == "xla" else [])
        for i, scheme in enumerate(schemes):
            if not supported(impl, scheme, DTYPES[i % 3]):
                continue
            for layout in sharding.LAYOUTS:
                out.append(Case(impl, layout, scheme, DTYPES[i % 3], 3, "2x4"))
        if impl == "reference":
            continue  # the plain formula: the core rows suffice
        for scheme in (Scheme(8, BLOCK, False, False, False), Scheme(4, BLOCK, True, True, True)):
            # Prefill: 40 tokens per device > B, the xla backend's other blockwise path.
            for layout in sharding.LAYOUTS:
                if supported(impl, scheme, "float32"):
                    out.append(Case(impl, layout, scheme, "float32", 40, "2x4"))
        for scheme in (Scheme(4, -1, False, True, True), Scheme(4, BLOCK, False, True, False)):
            # 8-way model split: one block per shard.
            for layout in sharding.LAYOUTS:
                if supported(impl, scheme, "bfloat16", 2 * K):
                    out.append(Case(impl, layout, scheme, "bfloat16", 3, "1x8"))
        for scheme in GRAD_SCHEMES:
            for layout in sharding.LAYOUTS:
                if supported(impl, scheme, "float32"):
                    out.append(Case(impl, layout, scheme, "float32", 3, "2x4", grad=True))
    return out


COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(\S+)\s+(all-gather|all-reduce|"
                        r"all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", re.M)


def collectives(hlo: str) -> list[list[str]]:
    """[[op, result shape], ...] for every collective in compiled HLO text."""
    return [[op, shape] for shape, op in COLLECTIVE.findall(hlo)]


def make_mesh(name: str):
    if name == "2x4":
        return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    return jax.make_mesh((1, 8), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize(w, scheme: Scheme):
    # One compile per scheme and shape instead of one per eager op.
    return xla_qops.quantize_weight(w, bits=scheme.bits, block_size=scheme.block_size,
                                    symmetric=scheme.symmetric, pack=scheme.packed)


def make_weight(rng, n, k, scheme: Scheme):
    """cases.make_weight, quantized under jit."""
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    if not scheme.symmetric:
        w = w + rng.uniform(-0.05, 0.05, (n, 1)).astype(np.float32)  # offset channels
    return _quantize(w, scheme)


@functools.lru_cache(maxsize=None)
def inputs(scheme: Scheme, k: int, rows: int, x_dtype: str):
    """(qw, x, c), shared by the layouts and impls of one scheme (saves compiles)."""
    rng = np.random.default_rng(zlib.crc32(f"{scheme.id}-{k}-{rows}-{x_dtype}".encode()))
    qw = make_weight(rng, N, k, scheme)
    x = make_x(rng, (2, rows, k), x_dtype)
    c = jnp.asarray(rng.standard_normal((2, rows, N)), jnp.float32)
    return qw, x, c


@functools.lru_cache(maxsize=None)
def single_device(impl: str, scheme: Scheme, k: int, rows: int, x_dtype: str, grad: bool,
                  per_batch: bool = False):
    """The unsharded result (or d/dx sum(y * c)) on device 0, as float32 numpy.

    per_batch: one call per batch element, so that each call has the rows one
    device of a batch-split mesh holds. XLA:CPU's dot (YNNPACK, from JAX 0.8 on)
    and the C++ kernels pick their loop form by the row count, so a row's
    result may depend on how many rows are multiplied with it.
    """
    qw, x, c = inputs(scheme, k, rows, x_dtype)

    def f(x, qw):
        return xla_qops.quantized_matmul(x, qw, quantize_activation=scheme.quantize_activation,
                                         impl=impl)
    if grad:
        f = jax.grad(lambda x, qw, f=f: jnp.sum(f(x, qw) * c))
    f = jax.jit(f)
    if per_batch:
        return np.concatenate([np.asarray(f(x[b:b + 1], qw)) for b in range(x.shape[0])]
                              ).astype(np.float32)
    return np.asarray(f(x, qw)).astype(np.float32)


def run_case(case: Case, out_dir: str, hlo_report: dict) -> None:
    scheme = case.scheme
    qw, x, c = inputs(scheme, case.k, case.rows, case.x_dtype)
    mesh = make_mesh(case.mesh)
    batch = "data" if case.mesh == "2x4" else None

    def sharded(x, qw):
        return sharding.sharded_quantized_matmul(
            x, qw, mesh, case.layout, axis_name="model", batch_axis=batch,
            quantize_activation=scheme.quantize_activation, impl=case.impl)

    qw_s = sharding.shard_quantized_weight(qw, mesh, case.layout, "model")
    x_spec = P(batch, None, "model" if case.layout == "row" else None)
    x_s = jax.device_put(x, NamedSharding(mesh, x_spec))
    record = dict(x=np.asarray(x).astype(np.float32), w=np.asarray(qw.w),
                  scale=np.asarray(qw.scale),
                  shard_shapes=np.array([s.data.shape for s in qw_s.w.addressable_shards]))
    if qw.zero_point is not None:
        record["zero_point"] = np.asarray(qw.zero_point)
    single = single_device(case.impl, scheme, case.k, case.rows, case.x_dtype, case.grad)
    if case.grad:
        record["c"] = np.asarray(c)
        g = jax.jit(jax.grad(lambda x, qw: jnp.sum(sharded(x, qw) * c)))
        record["dx_sharded"] = np.asarray(g(x_s, qw_s))
        record["dx_single"] = single
    else:
        jitted = jax.jit(sharded)
        compiled = jitted.lower(x_s, qw_s).compile()
        hlo_report[case.id] = collectives(compiled.as_text())
        y = compiled(x_s, qw_s)
        record["y_sharded"] = np.asarray(y).astype(np.float32)
        record["y_spec"] = np.array(str(y.sharding.spec))
        record["y_single"] = single
        # The rows each device holds: all of them on the 1x8 mesh, one batch
        # element on the 2x4 mesh.
        record["y_single_rows"] = (single if batch is None else single_device(
            case.impl, scheme, case.k, case.rows, case.x_dtype, False, per_batch=True))
    np.savez(os.path.join(out_dir, case.id + ".npz"), **record)


def run_gspmd(out_dir: str, hlo_report: dict) -> None:
    """Plain jax.jit of the op (impl="xla") on weights placed by shard_quantized_weight.

    Also a control: the same with the weight constrained to be replicated,
    which must show an all-gather (so that the absence above means something).
    """
    mesh = make_mesh("2x4")
    for i, scheme in enumerate(CORE_SCHEMES):
        for layout in sharding.LAYOUTS:
            rng = np.random.default_rng(100 + i)
            qw = make_weight(rng, N, K, scheme)
            x = make_x(rng, (2, 3, K), "float32")
            qw_s = sharding.shard_quantized_weight(qw, mesh, layout, "model")
            x_s = jax.device_put(x, NamedSharding(
                mesh, P("data", None, "model" if layout == "row" else None)))
            f = jax.jit(lambda x, qw, qa=scheme.quantize_activation: xla_qops.quantized_matmul(
                x, qw, quantize_activation=qa, impl="xla"))
            cid = f"gspmd-{layout}-{scheme.id}"
            compiled = f.lower(x_s, qw_s).compile()
            hlo_report[cid] = collectives(compiled.as_text())
            record = dict(x=np.asarray(x), w=np.asarray(qw.w), scale=np.asarray(qw.scale),
                          zero_point=np.asarray(qw.zero_point),
                          y_sharded=np.asarray(compiled(x_s, qw_s)))
            np.savez(os.path.join(out_dir, cid + ".npz"), **record)
    # Plain jax.jit of a kernel impl: GSPMD cannot split an opaque kernel call,
    # so it gathers the weight (why sharded_quantized_matmul uses shard_map).
    if xla_qops.dispatch._module("custom_call").available():
        for layout in sharding.LAYOUTS:
            qw_s = sharding.shard_quantized_weight(qw, mesh, layout, "model")
            x_s = jax.device_put(x, NamedSharding(
                mesh, P("data", None, "model" if layout == "row" else None)))
            f = jax.jit(lambda x, qw: xla_qops.quantized_matmul(x, qw, impl="custom_call"))
            hlo_report[f"plain-jit-custom_call-{layout}"] = collectives(
                f.lower(x_s, qw_s).compile().as_text())
    replicated = NamedSharding(mesh, P())
    g = jax.jit(lambda x, qw: xla_qops.quantized_matmul(
        x, dataclasses.replace(qw, w=jax.lax.with_sharding_constraint(qw.w, replicated)),
        impl="xla"))
    hlo_report["control-gathered-weight"] = collectives(g.lower(x_s, qw_s).compile().as_text())


def run_docs_example(out_dir: str) -> None:
    """Runs docs/scaling.md's JAX block as written; saves what it computed."""
    text = open(os.path.join(os.path.dirname(HERE), "docs", "scaling.md")).read()
    ns = {}
    exec(compile(re.findall(r"```python\n(.*?)```", text, re.S)[0], "scaling.md", "exec"), ns)
    record = {name: np.asarray(ns[name]).astype(np.float32) for name in ("x", "h", "g", "y")}
    for name in ("up", "down"):
        qw = ns[name]
        record.update({f"{name}_w": np.asarray(qw.w), f"{name}_scale": np.asarray(qw.scale),
                       f"{name}_zero_point": np.asarray(qw.zero_point)})
    record["h_spec"] = np.array(str(ns["h"].sharding.spec))
    np.savez(os.path.join(out_dir, "docs-scaling.npz"), **record)


def main(argv) -> None:
    assert jax.device_count() == N_DEVICES, (
        f"expected {N_DEVICES} devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}), "
        f"got {jax.devices()}")
    out_dir, impls = argv[1], argv[2:]
    hlo_report = {}
    for case in cases(impls):
        t0 = time.perf_counter()
        run_case(case, out_dir, hlo_report)
        print(f"{case.id}: {time.perf_counter() - t0:.2f}s", flush=True)
    run_gspmd(out_dir, hlo_report)
    run_docs_example(out_dir)
    with open(os.path.join(out_dir, "hlo.json"), "w") as f:
        json.dump(hlo_report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv)
