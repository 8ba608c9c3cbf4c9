"""How a `quantized_matmul` kernel call splits over devices under plain `jax.jit`.

XLA's partitioner (Shardy, or GSPMD on JAX configured for it) cannot look
inside an opaque kernel call -- the FFI custom call on the host CPU, a Pallas
kernel on TPU/GPU -- so without a rule it gathers every operand whole onto
every device, the weight included. `partitioned` wraps the resolved backend
in `jax.experimental.custom_partitioning` with the rule below, so a model
sharded the usual way (`NamedSharding` on its parameters, plain `jax.jit`)
runs each kernel on the slices its device already holds.

Operands as the op sees them: ``x [M, K]`` (rows already flattened), the
weight per-channel ``[N, K]`` (packed ``[N, K/2]``) or blockwise
``[G, B, N]`` (packed ``[G, B/2, N]``, ``G = K/B``), scale and zero point
``[N]`` or ``[G, N]``. Three factors can be split:

* ``m`` (rows): from ``x``'s first dimension. Local, no communication.
* ``n`` (out, column-parallel): from the weight's ``out`` dimension (else the
  scale's). Local, no communication; the result is split along ``out``.
* ``k`` (in, row-parallel): from the weight's ``in`` dimension -- the block
  axis ``G`` for blockwise weights -- else the scale's block axis, else ``x``'s
  last dimension. Each device multiplies its slice in float32 and one
  all-reduce (``psum``) sums the partials; for per-channel A8 the token scale
  is the maximum of |x| over all of ``in``, so it is taken across the shards
  first (``pmax``, one small all-reduce) and every shard quantizes with the
  single-device scale (`row_parallel`, shared with `xla_qops.sharding`).

The weight's own placement wins (moving activations is cheap, moving the
weight is what this module exists to avoid); a mesh axis is used once, by
``n`` first, then ``k``, then ``m``. A split the kernels cannot honour falls
back to replicating that factor -- XLA then reshards the operand, which is
correct and costs communication, never a wrong result:

* a factor whose size the mesh axes do not divide (``N``, ``M``; ``K``, or the
  block count ``G`` for blockwise weights);
* per-channel packed int4 or fp4 with an odd ``K / n`` (a byte would straddle
  two shards);
* a blockwise weight split inside its blocks (its ``B`` dimension), or an
  ``x`` split along ``in`` at a boundary inside a block (``G`` not divisible).

Each shard's call is checked and resolved for its slices with the whole
problem's weight and activation formats (API.md section 7: packed fp4 is
uint8 like packed int4, only the format says which values it holds).

Numerics: an ``m`` or ``n`` split runs the single-device computation on fewer
rows or columns. A ``k`` split sums float32 partials in another order, so it
agrees with one device within the float32 accumulation bound, not bit for bit.

Operands typed with Explicit mesh axes run the op inside
`jax.sharding.auto_axes` (`with_auto_axes`), so one rule serves both axis
types.

Where no partitioning happens -- one device, inside `jax.shard_map` with every
axis manual, or eager calls -- the call is inlined as before and costs nothing.
Serializing with `jax.export` for more than one device is not supported
(custom_partitioning is not a stable custom call); single-device export is.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor, SdyShardingRule,
                                                   custom_partitioning)
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from pallas_kernels import block_sizes, jax_compat
from xla_qops import dispatch
from xla_qops.activation import quantize_activation_as
from xla_qops.spec import MatmulSpec, check_args

# Impls whose backend is an opaque kernel call (dispatch.AUTO_ORDER): these
# get the rule. "xla" and "reference" are plain JAX the partitioner splits itself.
PARTITIONED_IMPLS = ("auto", "custom_call", "pallas")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Mesh axes each factor is split over (empty: not split)."""

    m: tuple[str, ...]
    n: tuple[str, ...]
    k: tuple[str, ...]

    def specs(self, spec: MatmulSpec):
        """(x, w, scale/zero-point, result) `PartitionSpec`s for this plan."""
        m, n, k = (_entry(a) for a in (self.m, self.n, self.k))
        if spec.blockwise:
            return P(m, k), P(k, None, n), P(k, n), P(m, n)
        return P(m, k), P(n, k), P(n), P(m, n)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _axes(spec, dim: int) -> tuple[str, ...]:
    """The mesh axes dimension `dim` of a `PartitionSpec` is split over."""
    if spec is None or dim >= len(spec) or spec[dim] is None:
        return ()
    entry = spec[dim]
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def split_problem(weight, layout: str, n: int, where: str | None = None) -> str | None:
    """Why splitting `weight` over `n` devices would not give each device whole pieces,
    or None when it would: the one rule for this module's `plan` (which then replicates
    instead) and `xla_qops.sharding.check_layout` (which raises it).

    layout "column" splits ``out``: n must divide it. "row" splits ``in``: n must
    divide the block count (blockwise: whole blocks with their scales), else ``in``,
    and leave each shard an even ``in`` when int4 or fp4 is packed (a byte holds
    two input features). `weight`: anything with in_features, out_features,
    block_size, packed and weight_format (a `MatmulSpec`, a `QuantizedWeight`);
    `where`: the devices, as the message names them.
    """
    where = where or f"over {n} devices"
    if layout == "column":
        if weight.out_features % n:
            return (f"column-parallel splits out={weight.out_features} {where}; "
                    f"out must be a multiple of {n}")
        return None
    in_features, block_size = weight.in_features, weight.block_size
    if block_size != -1:
        n_blocks = in_features // block_size
        if n_blocks % n:
            return (f"row-parallel blockwise splits whole blocks {where}; "
                    f"in/B = {in_features}/{block_size} = {n_blocks} "
                    f"blocks must be a multiple of {n}")
    elif in_features % n:
        return (f"row-parallel splits in={in_features} {where}; "
                f"in must be a multiple of {n}")
    elif weight.packed and (in_features // n) % 2:
        codes = "fp4 (e2m1 codes)" if weight.weight_format == "fp4" else "int4"
        return (f"packed {codes} stores two input features per byte, so "
                f"row-parallel shards need an even in/{n}; got "
                f"in={in_features}, {in_features // n} per shard")
    return None


def plan(spec: MatmulSpec, mesh_shape, x_spec, w_spec, scale_spec, rows: int) -> Plan:
    """The split for operands placed as the given `PartitionSpec`s (module docstring).

    Args:
      spec: the single-device problem (`xla_qops.spec.check_args`).
      mesh_shape: ``{axis name: size}``.
      x_spec, w_spec, scale_spec: how ``x [M, K]``, the weight and the scale
        are placed now (None: replicated).
      rows: M.
    """
    def size(axes):
        return math.prod(mesh_shape[a] for a in axes)

    if spec.blockwise:
        n = _axes(w_spec, 2) or _axes(scale_spec, 1)
        k = _axes(w_spec, 0) or _axes(scale_spec, 0) or _axes(x_spec, 1)
    else:
        n = _axes(w_spec, 0) or _axes(scale_spec, 0)
        k = _axes(w_spec, 1) or _axes(x_spec, 1)
    if split_problem(spec, "column", size(n)):
        n = ()
    k = tuple(a for a in k if a not in n)
    if split_problem(spec, "row", size(k)):
        k = ()
    m = tuple(a for a in _axes(x_spec, 0) if a not in n + k)
    if rows % size(m):
        m = ()
    return Plan(m=m, n=n, k=k)


def row_parallel(x, axes, *, blockwise: bool, quantize_activation: bool, matmul,
                 activation_format: str | None = None):
    """One device's share of a product split along ``in`` over mesh `axes`.

    ``matmul(x, quantize_activation=...)`` multiplies the local slices. The
    partial is kept in float32 (``x`` is upcast first, exactly), summed over
    `axes` with ``psum`` and rounded once to ``x``'s dtype. For per-channel
    A8 the token scale spans all of ``in``: ``pmax`` of |x| across the shards
    gives the single-device scale, every shard quantizes with it in
    `activation_format` ("int8" or "fp8"; None: "int8") and multiplies the
    dequantized activation (blockwise A8 scales cover one block, which lives
    on one shard, so those quantize locally).
    """
    x32 = x.astype(jnp.float32)
    if quantize_activation and not blockwise:
        # The scale gets no gradient (straight-through), and pmax has no JVP.
        absmax = lax.pmax(lax.stop_gradient(jnp.max(jnp.abs(x32), axis=-1, keepdims=True)),
                          axes)
        x_q, x_scale = quantize_activation_as(activation_format or "int8", x32, -1,
                                              absmax=absmax)
        x_hat = x_q.astype(jnp.float32) * x_scale
        # Straight-through: the value is exactly x_hat (x32 - x32 == 0), the
        # gradient with respect to x the identity, as in the op itself.
        x_in = lax.stop_gradient(x_hat) + (x32 - lax.stop_gradient(x32))
        y = matmul(x_in, quantize_activation=False)
    else:
        y = matmul(x32, quantize_activation=quantize_activation)
    return lax.psum(y, axes).astype(x.dtype)


def _local_run(impl: str, spec: MatmulSpec):
    """``matmul(x, w, scale, zp, quantize_activation=...)`` on local slices,
    resolved for their (smaller) shapes."""
    def matmul(x, w, scale, zp, *, quantize_activation):
        # The formats travel with the slices: a packed fp4 weight is uint8 like
        # packed int4, and only its weight_format says which values it holds.
        local = check_args(x, w, scale, zp, spec.block_size, spec.weight_format == "int4",
                           quantize_activation, spec.weight_format,
                           spec.activation_format if quantize_activation else None)
        return dispatch.resolve(impl, local)(x, w, scale, zp)
    return matmul


def _mesh_shape(mesh) -> dict:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def _spec_of(sharding):
    return sharding.spec if isinstance(sharding, NamedSharding) else None


def _plan_for(spec, mesh, arg_shapes):
    x, w, scale = arg_shapes[:3]
    return plan(spec, _mesh_shape(mesh), _spec_of(x.sharding), _spec_of(w.sharding),
                _spec_of(scale.sharding), x.shape[0])


def _sharding_rule(spec: MatmulSpec) -> SdyShardingRule:
    """Shardy's rule: which operand dimensions share a factor.

    ``m k, n k, n -> m n`` per-channel, ``m (g b), g b n, g n -> m n``
    blockwise (``x``'s ``in`` is the block count times the block). Packed
    int4 halves the weight's ``in`` (or ``B``) dimension, so ``x``'s ``in`` is
    that factor times ``p = 2``: a compound factor whose major part is split
    first, the same contiguous split of ``in``. A zero point maps as the scale.
    """
    if spec.blockwise:
        inner = "h" if spec.packed else "b"
        x_in = CompoundFactor("g", inner, "p") if spec.packed else CompoundFactor("g", "b")
        w, scale = ArrayMapping("g", inner, "n"), ArrayMapping("g", "n")
    else:
        x_in = CompoundFactor("k", "p") if spec.packed else "k"
        w, scale = ArrayMapping("n", "k"), ArrayMapping("n")
    operands = (ArrayMapping("m", x_in), w, scale) + ((scale,) if spec.has_zero_point else ())
    sizes = {"p": 2} if spec.packed else {}
    return SdyShardingRule(operands, (ArrayMapping("m", "n"),), **sizes)


def partitioned(impl: str, spec: MatmulSpec):
    """``f(x [M, K], w, scale, zero_point) -> [M, N]``: the backend for `impl`
    and `spec` with the partitioning rule (module docstring) and a batching
    rule (vmap over ``x`` folds into the rows; over the weight, each weight
    runs on its own).

    Cached (custom_partitioning keeps the kernel it traced, and retracing it
    for every eager call would cost a compilation each), keyed also on
    `block_sizes.trace_state`, so that tile overrides, a measured table or a
    lowering target set later still reach the kernel.

    Under `jax_compat.lowering_target` (exporting for an abstract TPU or GPU
    from a machine without one) the plain backend is returned: JAX refuses
    custom_partitioning with an abstract mesh, and there is one device.
    """
    if jax_compat.abstract_target() is not None:
        return dispatch.resolve(impl, spec)
    return _partitioned(impl, spec, block_sizes.trace_state())


@functools.lru_cache(maxsize=None)
def _partitioned(impl: str, spec: MatmulSpec, trace_state: tuple):
    del trace_state  # only part of the cache key
    run = dispatch.resolve(impl, spec)
    local = _local_run(impl, spec)

    def forward(x, w, scale, *zp):
        return run(x, w, scale, zp[0] if zp else None)

    kernel = custom_partitioning(forward)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        chosen = _plan_for(spec, mesh, arg_shapes)
        x_spec, w_spec, s_spec, y_spec = chosen.specs(spec)
        arg_shardings = [NamedSharding(mesh, p) for p in (x_spec, w_spec, s_spec)]
        arg_shardings += arg_shardings[2:] * (len(arg_shapes) - 3)

        def lower(x, w, scale, *zp):
            zp = zp[0] if zp else None
            matmul = functools.partial(local, w=w, scale=scale, zp=zp)
            if not chosen.k:
                return matmul(x, quantize_activation=spec.quantize_activation)
            return row_parallel(x, chosen.k, blockwise=spec.blockwise,
                                quantize_activation=spec.quantize_activation,
                                activation_format=spec.activation_format, matmul=matmul)
        return mesh, lower, NamedSharding(mesh, y_spec), tuple(arg_shardings)

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        del result_shape  # GSPMD only; Shardy uses the rule below
        return NamedSharding(mesh, _plan_for(spec, mesh, arg_shapes).specs(spec)[3])

    def propagate_user_sharding(mesh, user_shape):
        del mesh  # GSPMD only: any result sharding the user asks for is fine
        return user_shape.sharding

    kernel.def_partition(partition=partition,
                         infer_sharding_from_operands=infer_sharding_from_operands,
                         propagate_user_sharding=propagate_user_sharding,
                         sharding_rule=_sharding_rule(spec))

    @custom_vmap
    def batched(x, w, scale, *zp):
        return kernel(x, w, scale, *zp)

    @batched.def_vmap
    def _vmap_rule(axis_size, in_batched, x, w, scale, *zp):
        x_batched, *weight_batched = in_batched
        if not any(weight_batched):
            if not x_batched:
                return kernel(x, w, scale, *zp), False
            rows = x.reshape(-1, x.shape[-1])  # [axis, M, K] -> [axis * M, K]
            return kernel(rows, w, scale, *zp).reshape(axis_size, -1, spec.out_features), True
        in_axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(forward, in_axes=in_axes)(x, w, scale, *zp), True

    def call(x, w, scale, zp):
        return batched(x, w, scale) if zp is None else batched(x, w, scale, zp)
    return call


def _explicit_mesh(*arrays):
    """The mesh whose Explicit axes type any of `arrays`, or None."""
    for a in arrays:
        sharding = getattr(jax.typeof(a), "sharding", None) if a is not None else None
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
            return mesh
    return None


def _typed_spec(a):
    sharding = getattr(jax.typeof(a), "sharding", None)
    return getattr(sharding, "spec", None)


def with_auto_axes(matmul, spec: MatmulSpec, x, w, scale, zero_point):
    """`matmul` as it should run on these operands.

    With Explicit mesh axes a sharding is part of an array's type and every op
    must say how its result is placed; an opaque kernel call cannot. So the op
    runs with those axes Auto (`jax.sharding.auto_axes`), placed by the rule
    like any other, and its result gets the sharding `plan` gives: ``x``'s
    leading dimensions keep their axes (less those the weight uses), ``out``
    is split as the weight's ``out`` is. Operands without Explicit axes:
    `matmul` unchanged.
    """
    mesh = _explicit_mesh(x, w, scale, zero_point)
    if mesh is None:
        return matmul
    x_spec = _typed_spec(x)
    lead = [_axes(x_spec, d) for d in range(x.ndim - 1)]
    rows_spec = P(sum(lead, ()) or None, _entry(_axes(x_spec, x.ndim - 1)))
    rows = math.prod(x.shape[:-1])
    chosen = plan(spec, _mesh_shape(mesh), rows_spec, _typed_spec(w), _typed_spec(scale), rows)
    used = chosen.n + chosen.k
    out = P(*(_entry(tuple(a for a in axes if a not in used)) for axes in lead),
            _entry(chosen.n))
    explicit = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                     if kind == AxisType.Explicit)
    return jax.sharding.auto_axes(matmul, axes=explicit,
                                  out_sharding=NamedSharding(mesh, out))
