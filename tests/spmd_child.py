"""Runs the sharded matmuls on 8 virtual CPU devices; tests/test_sharding.py asserts.

JAX fixes its device count when it initialises, and the pytest process has
already done so with one CPU device. So test_sharding.py runs this file in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and
compares what it writes against the float64 reference. This file computes and
records only; it asserts nothing but the device count.

    python tests/spmd_child.py OUT_DIR [--formats] IMPL [IMPL ...]

writes ``OUT_DIR/<case id>.npz`` per case (inputs, single-device result,
sharded result, gradients) and ``OUT_DIR/hlo.json`` (collectives found in each
compiled HLO). Without ``--formats`` it runs the integer scheme rows
(tests/test_sharding.py); with it, the float element formats of API.md
section 7 through the same layouts (tests/test_sharding_formats.py).
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
class FloatScheme:
    """A row with a float element format (API.md section 7), shaped like
    `cases.Scheme` so that the case runners take either.

    format: `quantize_weight`'s format ("fp8", "mxfp4", "nvfp4"), or "int4"
    for int4 weights with fp8 activations (the w4a8-fp8 scheme).
    activation_format: None (A16) or "fp8" (x quantized to e4m3fn per token).
    """

    format: str
    block_size: int
    activation_format: str | None = None

    symmetric = True  # the float formats have no zero point

    @property
    def quantize_activation(self) -> bool:
        return self.activation_format is not None

    @property
    def weight_format(self) -> str:
        return {"fp8": "fp8", "int4": "int4"}.get(self.format, "fp4")

    @property
    def bits(self) -> int:
        return 8 if self.format == "fp8" else 4

    @property
    def packed(self) -> bool:
        return self.bits == 4

    @property
    def id(self) -> str:
        layout = "pc" if self.block_size == -1 else f"g{self.block_size}"
        acts = "a8" if self.quantize_activation else "a16"
        return f"w{self.bits}{acts}-{self.format}-{layout}"


def op_formats(scheme) -> dict:
    """`quantized_matmul`'s activation keywords for a scheme row (an int row
    keeps the default activation format, int8)."""
    fmt = scheme.activation_format if isinstance(scheme, FloatScheme) else None
    return dict(quantize_activation=scheme.quantize_activation, activation_format=fmt)


def reference_formats(scheme) -> dict:
    """tests/numpy_reference's format keywords for a scheme row (None, None for
    an int row: the weight's dtype and int8 activations)."""
    if not isinstance(scheme, FloatScheme):
        return dict(weight_format=None, activation_format=None)
    return dict(weight_format=scheme.weight_format, activation_format=scheme.activation_format)


# The float rows (API.md section 7): fp8 weights per-channel and blockwise,
# A16 and A8 (fp8 activations: the per-channel row split then takes the
# token maxima across shards, as int8 does), MX fp4 (B = 32, power-of-two
# scales), NV fp4 (B = 16) with and without fp8 activations, and int4 with
# fp8 activations per-channel (a packed byte at each shard boundary).
FLOAT_SCHEMES = [FloatScheme("fp8", -1), FloatScheme("fp8", BLOCK),
                 FloatScheme("fp8", -1, "fp8"), FloatScheme("fp8", BLOCK, "fp8"),
                 FloatScheme("mxfp4", BLOCK), FloatScheme("nvfp4", 16),
                 FloatScheme("nvfp4", 16, "fp8"), FloatScheme("int4", -1, "fp8")]
# The rows every impl runs (fp8 activations per-channel and blockwise, both
# fp4 kinds); the host kernels run every row. The others change how a shard
# decodes its slice, not the split.
FLOAT_CORE = [FLOAT_SCHEMES[i] for i in (2, 3, 4, 6)]
FLOAT_GRAD_SCHEMES = [FloatScheme("fp8", -1, "fp8"), FloatScheme("nvfp4", 16)]


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
        fmt = reference_formats(scheme)
        spec = MatmulSpec(in_features=k, out_features=N, block_size=scheme.block_size,
                          bits=scheme.bits, packed=scheme.packed,
                          has_zero_point=not scheme.symmetric,
                          quantize_activation=scheme.quantize_activation, x_dtype=dtype,
                          weight_format=fmt["weight_format"] or "",
                          activation_format=fmt["activation_format"])
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
    """cases.make_weight, quantized under jit (the float formats on the host:
    quantize_weight rounds concrete weights onto their grids)."""
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    if isinstance(scheme, FloatScheme) and scheme.format != "int4":
        return xla_qops.quantize_weight(w, format=scheme.format, block_size=scheme.block_size)
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
        return xla_qops.quantized_matmul(x, qw, impl=impl, **op_formats(scheme))
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
            x, qw, mesh, case.layout, axis_name="model", batch_axis=batch, impl=case.impl,
            **op_formats(scheme))

    qw_s = sharding.shard_quantized_weight(qw, mesh, case.layout, "model")
    x_spec = P(batch, None, "model" if case.layout == "row" else None)
    x_s = jax.device_put(x, NamedSharding(mesh, x_spec))
    record = dict(x=np.asarray(x).astype(np.float32), **weight_record(qw),
                  shard_shapes=np.array([s.data.shape for s in qw_s.w.addressable_shards]))
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


# ---- plain jax.jit with NamedSharding inputs (xla_qops.partitioning) ----

# Every scheme row, symmetric and asymmetric, int4 packed.
PLAIN_SCHEMES = [Scheme(bits, block, symmetric, packed, qa)
                 for bits, packed in ((8, False), (4, True)) for block in (-1, BLOCK)
                 for symmetric in (False, True) for qa in (False, True)]
# (x spec, weight layout or None for replicated) on the 2x4 (data x model) mesh.
PLACEMENTS = {
    "batch": (P("data"), None),
    "column": (P(), "column"),
    "row": (P(None, None, "model"), "row"),
    "batch-column": (P("data"), "column"),
    "batch-row": (P("data", None, "model"), "row"),
}
# The kernel impls the rule is for, and xla (the partitioner's own split).
PLAIN_IMPLS = ("auto", "custom_call", "pallas", "xla")


@dataclasses.dataclass(frozen=True)
class PlainCase:
    impl: str
    placement: str
    scheme: Scheme
    x_dtype: str
    explicit: bool = False  # mesh axes of type Explicit instead of Auto
    grad: bool = False
    gspmd: bool = False  # jax_use_shardy_partitioner=False: the GSPMD callbacks

    @property
    def id(self) -> str:
        kind = "explicit" if self.explicit else "auto-axes"
        g = "-grad" if self.grad else ""
        partitioner = "-gspmd" if self.gspmd else ""
        return (f"plain-{kind}-{self.impl}-{self.placement}-{self.scheme.id}-{self.x_dtype}"
                f"{g}{partitioner}")


def plain_cases(impls) -> list[PlainCase]:
    """Every scheme x placement for custom_call (the kernel on this machine);
    the 2-D placements for the other impls; a few on Explicit axes and with
    gradients. Also imported by test_sharding.py."""
    out = []
    for impl in PLAIN_IMPLS:
        if impl != "auto" and impl not in impls:
            continue
        places = PLACEMENTS if impl == "custom_call" else ("batch-column", "batch-row")
        for i, scheme in enumerate(PLAIN_SCHEMES):
            dtype = DTYPES[i % 3]
            if impl != "auto" and not supported(impl, scheme, dtype):
                continue
            out += [PlainCase(impl, place, scheme, dtype) for place in places]
    for impl in ("auto", "xla"):
        for scheme in (PLAIN_SCHEMES[1], PLAIN_SCHEMES[-4]):  # w8a8 pc asym, w4a16 g32 sym
            out += [PlainCase(impl, place, scheme, "float32", explicit=True)
                    for place in ("batch-column", "batch-row")]
    for scheme in GRAD_SCHEMES:
        out += [PlainCase("auto", place, scheme, "float32", grad=True)
                for place in ("batch-column", "batch-row")]
        out += [PlainCase("auto", place, scheme, "float32", gspmd=True)
                for place in ("batch-column", "batch-row")]
    return out


def float_cases(impls) -> list[Case]:
    """The float rows through `sharding.sharded_quantized_matmul`'s column and
    row layouts on the 2x4 mesh (every row on the host kernels, the core rows
    on every impl), an fp4 weight split 8 ways (one block per shard), and
    gradients (per-channel fp8 activations, straight-through the row split's
    shared token maxima, on every impl; NV fp4 on the host kernels). Also
    imported by tests/test_sharding_formats.py."""
    out = []
    for impl in impls:
        full = impl == "custom_call"
        for i, scheme in enumerate(FLOAT_SCHEMES):
            if (full or scheme in FLOAT_CORE) and supported(impl, scheme, DTYPES[i % 3]):
                out += [Case(impl, layout, scheme, DTYPES[i % 3], 3, "2x4")
                        for layout in sharding.LAYOUTS]
        mx = FloatScheme("mxfp4", BLOCK)
        if full and supported(impl, mx, "bfloat16", 2 * K):
            out += [Case(impl, layout, mx, "bfloat16", 3, "1x8") for layout in sharding.LAYOUTS]
        for scheme in FLOAT_GRAD_SCHEMES if full else FLOAT_GRAD_SCHEMES[:1]:
            if supported(impl, scheme, "float32"):
                out += [Case(impl, layout, scheme, "float32", 3, "2x4", grad=True)
                        for layout in sharding.LAYOUTS]
    return out


def float_plain_cases(impls) -> list[PlainCase]:
    """The float rows under plain jax.jit on sharded operands: on the host
    kernels the core rows with the weight replicated (x split over the
    batch), column and row, the other rows row-split; Pallas the core rows
    column and row; xla (split by XLA itself) NV fp4 with fp8 activations;
    gradients and Explicit axes through "auto". Also imported by
    tests/test_sharding_formats.py."""
    places = ("batch", "batch-column", "batch-row")
    out = []
    for i, scheme in enumerate(FLOAT_SCHEMES):
        dtype = DTYPES[i % 3]
        if "custom_call" in impls and supported("custom_call", scheme, dtype):
            out += [PlainCase("custom_call", place, scheme, dtype)
                    for place in (places if scheme in FLOAT_CORE else places[2:])]
        if scheme in FLOAT_CORE and "pallas" in impls and supported("pallas", scheme, dtype):
            out += [PlainCase("pallas", place, scheme, dtype) for place in places[1:]]
    if "xla" in impls:
        out += [PlainCase("xla", place, FLOAT_SCHEMES[6], "bfloat16") for place in places[1:]]
    pc_fp8_acts, nvfp4 = FLOAT_GRAD_SCHEMES
    out += [PlainCase("auto", "batch-row", pc_fp8_acts, "float32", grad=True),
            PlainCase("auto", "batch-column", nvfp4, "float32", grad=True),
            PlainCase("auto", "batch-row", pc_fp8_acts, "float32", explicit=True)]
    return out


def make_mesh_typed(explicit: bool):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)


def place(mesh, qw, layout):
    if layout is None:
        return jax.device_put(qw, NamedSharding(mesh, P()))
    return sharding.shard_quantized_weight(qw, mesh, layout, "model")


def weight_record(qw) -> dict:
    """w, scale (and zero_point) as numpy; an fp8 weight as its uint8 bit
    patterns (np.load cannot read ml_dtypes' float8 back; numpy_reference
    decodes the bits)."""
    w = np.asarray(qw.w)
    if w.dtype == jnp.float8_e4m3fn:
        w = w.view(np.uint8)
    record = dict(w=w, scale=np.asarray(qw.scale))
    if qw.zero_point is not None:
        record["zero_point"] = np.asarray(qw.zero_point)
    return record


def run_plain_case(case: PlainCase, out_dir: str, hlo_report: dict) -> None:
    scheme = case.scheme
    qw, x, c = inputs(scheme, K, 3, case.x_dtype)
    mesh = make_mesh_typed(case.explicit)
    x_spec, layout = PLACEMENTS[case.placement]
    qw_s, x_s = place(mesh, qw, layout), jax.device_put(x, NamedSharding(mesh, x_spec))

    def f(x, qw):
        return xla_qops.quantized_matmul(x, qw, impl=case.impl, **op_formats(scheme))
    record = dict(x=np.asarray(x).astype(np.float32), **weight_record(qw))
    shardy = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", not case.gspmd)
    try:
        run_plain(case, f, x_s, qw_s, c, record, hlo_report)
    finally:
        jax.config.update("jax_use_shardy_partitioner", shardy)
    np.savez(os.path.join(out_dir, case.id + ".npz"), **record)


def run_plain(case: PlainCase, f, x_s, qw_s, c, record: dict, hlo_report: dict) -> None:
    if case.grad:
        record["c"] = np.asarray(c)
        g = jax.jit(jax.grad(lambda x, qw: jnp.sum(f(x, qw) * c)))
        record["dx_sharded"] = np.asarray(g(x_s, qw_s))
    else:
        compiled = jax.jit(f).lower(x_s, qw_s).compile()
        hlo_report[case.id] = collectives(compiled.as_text())
        y = compiled(x_s, qw_s)
        record["y_sharded"] = np.asarray(y).astype(np.float32)
        record["y_spec"] = np.array(str(tuple(y.sharding.spec)))
        # One device on the rows each device holds: one batch element when x
        # is split over "data", all of them otherwise.
        record["y_single_rows"] = single_device(case.impl, case.scheme, K, 3, case.x_dtype,
                                                False,
                                                per_batch=case.placement.startswith("batch"))


# The Megatron pair: up (column, W4A16 g32 asym) -> gelu -> down (row, W8A8 pc
# asym), the intermediate split along its features between the two.
MLP_HIDDEN = 128
MLP_SCHEMES = (Scheme(4, BLOCK, False, True, False), Scheme(8, -1, False, False, True))


def run_plain_mlp(impl: str, explicit: bool, out_dir: str, hlo_report: dict) -> None:
    rng = np.random.default_rng(zlib.crc32(f"mlp-{impl}".encode()))
    up = make_weight(rng, MLP_HIDDEN, K, MLP_SCHEMES[0])
    down = make_weight(rng, N, MLP_HIDDEN, MLP_SCHEMES[1])
    x = make_x(rng, (2, 3, K), "float32")
    mesh = make_mesh_typed(explicit)
    up_s, down_s = place(mesh, up, "column"), place(mesh, down, "row")
    x_s = jax.device_put(x, NamedSharding(mesh, P("data")))

    def mlp(x, up, down):
        h = xla_qops.quantized_matmul(x, up, impl=impl)
        g = jax.nn.gelu(h)
        return h, g, xla_qops.quantized_matmul(g, down, quantize_activation=True, impl=impl)
    compiled = jax.jit(mlp).lower(x_s, up_s, down_s).compile()
    cid = f"mlp-{'explicit' if explicit else 'auto-axes'}-{impl}"
    hlo_report[cid] = collectives(compiled.as_text())
    h, g, y = compiled(x_s, up_s, down_s)
    record = dict(x=np.asarray(x), h=np.asarray(h), g=np.asarray(g), y=np.asarray(y),
                  h_spec=np.array(str(tuple(h.sharding.spec))))
    for name, qw in (("up", up), ("down", down)):
        record.update({f"{name}_{k}": v for k, v in weight_record(qw).items()})
    np.savez(os.path.join(out_dir, cid + ".npz"), **record)


# Placements the rule cannot honour, on the 2x4 mesh with custom_call: each is
# resharded (the documented fallback) and must still be right.
#   id: (scheme, in_features, x spec, weight spec or None for replicated)
FALLBACKS = {
    # x split along in at 5 features per shard: a packed byte holds 2.
    "packed-byte-split": (Scheme(4, -1, False, True, False), 20, P(None, None, "model"), None),
    # the blockwise weight split inside its blocks (its B dimension).
    "inside-blocks": (Scheme(8, BLOCK, False, False, False), K, P(), P(None, "model", None)),
    # 3 blocks over 4 shards of x's in.
    "blocks-not-divisible": (Scheme(4, BLOCK, True, True, True), 96, P(None, None, "model"),
                             None),
}
# The float formats' fallback: 3 MX fp4 blocks (fp8 activations) over 4 shards
# of x's in.
FLOAT_FALLBACKS = {
    "fp4-blocks-not-divisible": (FloatScheme("mxfp4", BLOCK, "fp8"), 96,
                                 P(None, None, "model"), None),
}


def run_fallbacks(out_dir: str, hlo_report: dict, fallbacks=None) -> None:
    mesh = make_mesh_typed(False)
    for name, (scheme, k, x_spec, w_spec) in (fallbacks or FALLBACKS).items():
        qw, x, _ = inputs(scheme, k, 3, "float32")
        w_sharding = NamedSharding(mesh, w_spec if w_spec is not None else P())
        qw_s = dataclasses.replace(qw, w=jax.device_put(qw.w, w_sharding))
        x_s = jax.device_put(x, NamedSharding(mesh, x_spec))
        f = jax.jit(lambda x, qw, scheme=scheme: xla_qops.quantized_matmul(
            x, qw, impl="custom_call", **op_formats(scheme)))
        compiled = f.lower(x_s, qw_s).compile()
        hlo_report[f"fallback-{name}"] = collectives(compiled.as_text())
        record = dict(x=np.asarray(x), y_sharded=np.asarray(compiled(x_s, qw_s)),
                      **weight_record(qw))
        np.savez(os.path.join(out_dir, f"fallback-{name}.npz"), **record)


def run_controls(hlo_report: dict) -> None:
    """The weight forced to be replicated inside the jit: the HLO parser must
    then find its all-gather (so that its absence elsewhere means something)."""
    mesh = make_mesh_typed(False)
    scheme = CORE_SCHEMES[-1]  # w4a8 blockwise packed asym: u8[in/B, B/2, out]
    qw, x, _ = inputs(scheme, K, 3, "float32")
    qw_s = place(mesh, qw, "column")
    x_s = jax.device_put(x, NamedSharding(mesh, P("data")))
    replicated = NamedSharding(mesh, P())
    for impl in ("custom_call", "xla"):
        if not xla_qops.dispatch._module(impl).available():
            continue
        g = jax.jit(lambda x, qw, impl=impl: xla_qops.quantized_matmul(
            x, dataclasses.replace(qw, w=jax.lax.with_sharding_constraint(qw.w, replicated)),
            quantize_activation=True, impl=impl))
        hlo_report[f"control-gathered-weight-{impl}"] = collectives(
            g.lower(x_s, qw_s).compile().as_text())


def run_plain_jit(out_dir: str, hlo_report: dict, impls) -> None:
    run_timed(run_plain_case, plain_cases(impls), out_dir, hlo_report)
    for impl, explicit in MLP_CASES:
        if impl == "auto" or impl in impls:
            run_plain_mlp(impl, explicit, out_dir, hlo_report)
    if "custom_call" in impls:
        run_fallbacks(out_dir, hlo_report)
    run_controls(hlo_report)


MLP_CASES = [(impl, False) for impl in PLAIN_IMPLS] + [("auto", True)]


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


def run_timed(run, cases, out_dir: str, hlo_report: dict) -> None:
    for case in cases:
        t0 = time.perf_counter()
        run(case, out_dir, hlo_report)
        print(f"{case.id}: {time.perf_counter() - t0:.2f}s", flush=True)


def run_formats(out_dir: str, hlo_report: dict, impls) -> None:
    """The float element formats (--formats): shard_map layouts, plain jit, fallback."""
    run_timed(run_case, float_cases(impls), out_dir, hlo_report)
    run_timed(run_plain_case, float_plain_cases(impls), out_dir, hlo_report)
    if "custom_call" in impls:
        run_fallbacks(out_dir, hlo_report, FLOAT_FALLBACKS)


def main(argv) -> None:
    assert jax.device_count() == N_DEVICES, (
        f"expected {N_DEVICES} devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}), "
        f"got {jax.devices()}")
    out_dir, impls = argv[1], [a for a in argv[2:] if a != "--formats"]
    hlo_report = {}
    if "--formats" in argv[2:]:
        run_formats(out_dir, hlo_report, impls)
    else:
        run_timed(run_case, cases(impls), out_dir, hlo_report)
        run_plain_jit(out_dir, hlo_report, impls)
        run_docs_example(out_dir)
    with open(os.path.join(out_dir, "hlo.json"), "w") as f:
        json.dump(hlo_report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv)
