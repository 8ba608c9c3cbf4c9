"""Tensor-parallel `quantized_matmul` on a `jax.sharding.Mesh` (docs/scaling.md).

Two layouts, named after how the weight ``W [out, in]`` is split over the
devices of one mesh axis (the "model" axis, size n):

``"column"`` (split along ``out``): every device holds out/n output channels
  with all input features. ``x`` is whole along ``in``; ``y`` comes out split
  along ``out``. No communication.

  * per-channel: ``w`` [out, in] (packed [out, in/2]) P(axis, None);
    ``scale``/``zero_point`` [out] P(axis).
  * blockwise: ``w`` [in/B, B, out] (packed [in/B, B/2, out])
    P(None, None, axis); ``scale``/``zero_point`` [in/B, out] P(None, axis).

``"row"`` (split along ``in``): every device holds in/n input features of
  every output channel; ``x`` is split along its last axis the same way. Each
  device computes a partial product and one all-reduce (``psum``) over the
  axis sums them; ``y`` is whole along ``out``.

  * per-channel: ``w`` P(None, axis); ``scale``/``zero_point`` replicated.
    Each shard's partial ``(x_s @ q_s.T) * scale - sum(x_s) * zero_point``
    sums over the shards to the full result, so the scales need no split.
  * blockwise: ``w`` P(axis, None, None), ``scale``/``zero_point``
    P(axis, None): each device holds whole blocks with their scales.

Constraints (checked by `check_layout`, ValueError otherwise): column needs
``out % n == 0``. Row per-channel needs ``in % n == 0``, and for packed int4
or fp4 an even ``in / n`` (two weights share a byte along ``in``, so a shard
boundary must fall on an even input feature). Row blockwise needs
``(in / B) % n == 0`` (shards hold whole blocks; packing pairs stay inside a
block). The rule is `xla_qops.partitioning.split_problem`, the same one the
op's own partitioning under plain `jax.jit` follows.

Activation quantization (A8, int8 or fp8): a blockwise token scale covers one
block, which lives on one device, so blockwise A8 is local and gives the same
values as on one device. A per-channel token scale covers all of ``in``,
which a row split spreads over n devices: the row layout takes the maximum of
|x| over the shards (``lax.pmax``, one small all-reduce of [tokens] floats)
and every shard quantizes with that global scale (`xla_qops.activation`, the
same int8 or e4m3fn values as on one device, per ``activation_format``). The
shard then multiplies the dequantized activation ``x_q * x_scale`` in
float32; gradients pass straight through, as in the op.

Numerics: column-parallel runs the single-device computation on a subset of
the output channels. Row-parallel keeps each partial in float32 (``x`` is
upcast first, exactly), sums the partials with ``psum`` and rounds once to
``x``'s dtype: the summation order differs from one device, so results agree
within the float32 accumulation bound, not bit for bit.

`sharded_quantized_matmul` runs every backend inside `jax.shard_map`: the
split is written out, and the per-shard computation of a row layer is
`xla_qops.partitioning.row_parallel`, the same one the op's own partitioning
rule uses. Meshes with Auto or Explicit axes both work (`jax.make_mesh` makes
Explicit ones from JAX 0.8 on; inputs are then resharded on entry explicitly).
Without this helper, plain ``jax.jit`` of `quantized_matmul` on weights placed
by `shard_quantized_weight` splits the same way (`xla_qops.partitioning`).

Common layouts (Megatron): attention q/k/v and MLP gate/up projections are
column-parallel, attention output and MLP down projections row-parallel
(`layout_for`). A column layer's output, split along its features, is exactly
the input a row layer wants, so each column -> row pair costs one
all-reduce. `shard_quantized_weights` places a whole
``{module path: QuantizedWeight}`` dict that way.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from xla_qops import dispatch, partitioning
from xla_qops.api import quantized_matmul
from xla_qops.quantize import QuantizedWeight
from xla_qops.spec import check_args

LAYOUTS = ("column", "row")

# Last component of a parameter's module path -> layout. Llama/Mistral/Qwen
# names and BERT names (attention.self.{query,key,value},
# attention.output.dense, intermediate.dense, output.dense).
PROJECTION_LAYOUTS = {
    "q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row",
    "gate_proj": "column", "up_proj": "column", "down_proj": "row",
    "query": "column", "key": "column", "value": "column",
    "intermediate.dense": "column", "output.dense": "row",
}


def layout_for(name: str) -> str:
    """The tensor-parallel layout of a projection, from its module path.

    ``"model.layers.0.self_attn.q_proj"`` -> ``"column"``,
    ``"encoder.layer.3.output.dense"`` -> ``"row"``.

    Raises:
      ValueError: the name ends in none of `PROJECTION_LAYOUTS`.
    """
    parts = name.split(".")
    for n in (2, 1):  # longest match first: "output.dense" before "dense"
        key = ".".join(parts[-n:])
        if key in PROJECTION_LAYOUTS:
            return PROJECTION_LAYOUTS[key]
    raise ValueError(f"name: expected a module path ending in one of "
                     f"{sorted(PROJECTION_LAYOUTS)}, got {name!r}")


def check_layout(qw, mesh, layout: str, axis_name: str) -> None:
    """Checks that `qw` can be split with `layout` over mesh axis `axis_name`.

    `mesh` may be a `jax.sharding.Mesh` or `AbstractMesh` (only its axis
    names and sizes are read).

    Raises:
      TypeError: `qw` is not a `QuantizedWeight`.
      ValueError: unknown layout or axis, or a dimension the split does not divide.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a xla_qops.QuantizedWeight, got {type(qw).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'column' or 'row', got {layout!r}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: expected one of the mesh axes {tuple(mesh.axis_names)}, "
                         f"got {axis_name!r}")
    n = mesh.shape[axis_name]
    problem = partitioning.split_problem(qw, layout, n,
                                         f"over the {n} devices of mesh axis {axis_name!r}")
    if problem is not None:
        raise ValueError(f"qw: {problem}")


def layout_specs(blockwise: bool, layout: str, axis_name: str):
    """(weight spec, scale/zero-point spec) for `layout`, as `PartitionSpec`s.

    Both have one entry per dimension, so ``tuple(spec)`` is also the
    partition spec torch_xla's ``xs.mark_sharding`` takes (docs/scaling.md).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'column' or 'row', got {layout!r}")
    a = axis_name
    if layout == "column":
        return (P(None, None, a), P(None, a)) if blockwise else (P(a, None), P(a))
    return (P(a, None, None), P(a, None)) if blockwise else (P(None, a), P(None))


def weight_partition_specs(qw: QuantizedWeight, layout: str, axis_name: str):
    """`qw` with each array replaced by its `PartitionSpec` (module docstring table).

    The result has `qw`'s pytree structure, so it can be passed as
    ``in_specs`` to `jax.shard_map` or mapped to `NamedSharding`s.
    """
    w, s = layout_specs(qw.blockwise, layout, axis_name)
    return dataclasses.replace(qw, w=w, scale=s,
                               zero_point=None if qw.zero_point is None else s)


def shard_quantized_weight(qw: QuantizedWeight, mesh, layout: str,
                           axis_name: str = "model") -> QuantizedWeight:
    """Places `qw` on `mesh`, split for `layout` ("column" or "row") over `axis_name`.

    Returns the same `QuantizedWeight` with `jax.Array`s sharded as in the
    module docstring (each device receives only its slice).
    """
    check_layout(qw, mesh, layout, axis_name)
    specs = weight_partition_specs(qw, layout, axis_name)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    return jax.device_put(qw, shardings)


def shard_quantized_weights(named, mesh, axis_name: str = "model") -> dict:
    """Places every weight of ``{module path: QuantizedWeight}`` with `layout_for(path)`.

    ``{"layers.0.self_attn.q_proj": qw, "layers.0.mlp.down_proj": qw2, ...}``
    -> the same dict with q/k/v/gate/up column-parallel and o/down
    row-parallel. Raises ValueError (from `layout_for`) for a path with no
    known layout, so nothing is silently left replicated.
    """
    return {name: shard_quantized_weight(qw, mesh, layout_for(name), axis_name)
            for name, qw in named.items()}


def sharded_quantized_matmul(x, qw: QuantizedWeight, mesh, layout: str, *,
                             axis_name: str = "model", batch_axis: str | None = None,
                             quantize_activation: bool = False,
                             activation_format: str | None = None, impl: str = "auto"):
    """`quantized_matmul(x, qw)` split over `mesh` with `layout` ("column" or "row").

    Args:
      x: ``[..., in]`` activations. Column: whole along ``in``. Row: split
        along ``in`` over `axis_name` (a column layer's output already is).
        If `batch_axis` is given, ``x.shape[0]`` is split over it.
      qw: the weight, ideally already placed by `shard_quantized_weight`
        with the same layout (otherwise it is resharded on entry).
      mesh: a `jax.sharding.Mesh` containing `axis_name` (and `batch_axis`).
      layout: "column" (split ``out``) or "row" (split ``in``, one psum).
      axis_name: the mesh axis the weight is split over.
      batch_axis: optional mesh axis for the leading dim of ``x`` (data parallel).
      quantize_activation, activation_format, impl: as in
        `xla_qops.quantized_matmul` (the weight format is `qw`'s); every impl
        runs per shard inside `jax.shard_map`.

    Returns:
      ``[..., out]`` in ``x``'s dtype. Column: split along ``out`` over
      `axis_name`. Row: replicated over `axis_name`. Leading dim split over
      `batch_axis` if given.
    """
    check_layout(qw, mesh, layout, axis_name)
    dispatch.check_impl(impl)
    spec = check_args(x, qw.w, qw.scale, qw.zero_point, qw.block_size,
                      qw.weight_format == "int4", quantize_activation, qw.weight_format,
                      activation_format)
    if batch_axis is not None:
        if batch_axis not in mesh.axis_names or batch_axis == axis_name:
            raise ValueError(f"batch_axis: expected None or a mesh axis other than "
                             f"{axis_name!r} from {tuple(mesh.axis_names)}, got {batch_axis!r}")
        if x.ndim < 2 or x.shape[0] % mesh.shape[batch_axis]:
            raise ValueError(f"x: batch_axis {batch_axis!r} splits x.shape[0] over "
                             f"{mesh.shape[batch_axis]} devices; expected rank >= 2 with a "
                             f"multiple of {mesh.shape[batch_axis]}, got shape {tuple(x.shape)}")
    middle = (None,) * (x.ndim - 2)
    lead = (batch_axis,) + middle if x.ndim >= 2 else ()
    if layout == "column":
        x_spec, y_spec = P(*lead, None), P(*lead, axis_name)
        body = _column_body(spec, impl)
    else:
        x_spec, y_spec = P(*lead, axis_name), P(*lead, None)
        body = _row_body(spec, impl, axis_name)
    w_specs = weight_partition_specs(qw, layout, axis_name)
    x, qw = _resharded_for(mesh, (x, x_spec), (qw, w_specs))
    # check_vma=False: kernel primitives (pallas_call, FFI calls) carry no
    # varying-manual-axes rule. Gradients are checked against one device in
    # tests/test_sharding.py.
    run = jax.shard_map(body, mesh=mesh, in_specs=(x_spec, w_specs), out_specs=y_spec,
                        check_vma=False)
    return run(x, qw)


def _resharded_for(mesh, *pairs):
    """Each (tree, specs) pair placed as `jax.shard_map` expects it on `mesh`.

    With Auto mesh axes shard_map moves a differently placed input itself.
    With Explicit axes (the default of `jax.make_mesh` from JAX 0.8 on) an
    input's sharding is part of its type and shard_map refuses a mismatch, so
    inputs are resharded here (a no-op when they are already in place).
    """
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return tuple(tree for tree, _ in pairs)
    return tuple(jax.tree.map(lambda a, spec: jax.sharding.reshard(a, NamedSharding(mesh, spec)),
                              tree, specs) for tree, specs in pairs)


def _column_body(spec, impl):
    def body(x, qw):
        return quantized_matmul(x, qw, quantize_activation=spec.quantize_activation,
                                activation_format=spec.activation_format, impl=impl)
    return body


def _row_body(spec, impl, axis_name):
    def body(x, qw):
        lead, k = x.shape[:-1], x.shape[-1]

        def matmul(x, *, quantize_activation):
            return quantized_matmul(
                x, qw, quantize_activation=quantize_activation, impl=impl,
                activation_format=spec.activation_format if quantize_activation else None)
        y = partitioning.row_parallel(x.reshape(-1, k), axis_name, blockwise=qw.blockwise,
                                      quantize_activation=spec.quantize_activation,
                                      activation_format=spec.activation_format, matmul=matmul)
        return y.reshape(*lead, -1)
    return body
