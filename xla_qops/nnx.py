"""The Flax NNX face (API.md section 8): `QuantizedLinear` and `quantize_model`.

`quantize_model(model, scheme=...)` swaps every `nnx.Linear` -- and every
`nnx.Einsum` / `nnx.LinearGeneral` with one contracting axis, how models
write attention projections -- for a `QuantizedLinear`, in place. The
quantized weight is converted once, at quantization time, from NNX's
``[in, out...]`` kernel into this project's ``[out, in]`` layout (API.md
section 2); a call runs `xla_qops.quantized_matmul` and nothing else.

Schemes, quantizers and argument checks are the core's (`xla_qops.schemes`,
`xla_qops.quantize`), so a scheme means what it means for
`torch_bridge.quantize_model`. So do the methods: every name of
`xla_qops.quantizers.METHODS`, the calibrated ones run in torch_bridge.calibrate's
steps (layers grouped by the array they read, AWQ's input scales folded into
the producing norm / Linear or applied by the layer, groups quantized in run
order on inputs from the groups already quantized, the per-layer held-out
fallback), what each step decides being `xla_qops.quantizers.layerwise`'s,
shared with the torch face. The model runs eagerly over `calibration` (each
item a tuple of positional arguments, or one array).

Sharding: the replaced kernel's partitioning metadata (`nnx.with_partitioning`;
``sharding_names`` up to flax 0.12.3, ``out_sharding`` after) is mapped onto
the quantized arrays' layouts (the kernel's input axis names on `in`, output
axis names on `out`) and the arrays are placed on the kernel's mesh, so a
sharded model stays sharded (no gather at run time).

Speed: under `nnx.jit` every call re-walks the module graph; for a decode
loop, split once and jit a pure function (`nnx.split` + `jax.jit` +
`nnx.merge`), as docs/flax.md shows.

Importing this module imports flax (the ``flax`` extra); ``import xla_qops``
does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

try:
    from flax import nnx, traverse_util
except ImportError as e:  # the optional extra
    raise ImportError("xla_qops.nnx needs flax: pip install 'xla-qops[flax]'") from e

from xla_qops import checkpoint, quantizers
from xla_qops.api import quantized_matmul
from xla_qops.quantize import QuantizedWeight, _check_format, check_method
from xla_qops.quantizers import awq, heldout, layerwise, rotation
from xla_qops.quantizers.float_formats import FloatGrid
from xla_qops.schemes import SCHEMES, Scheme

# The partitioning metadata key of an nnx.Variable: flax <= 0.12.3 writes
# `sharding_names`, later versions `out_sharding` (a PartitionSpec or names).
SHARDING_KEYS = ("out_sharding", "sharding_names")


def _value(variable):
    """A Variable's array (flax >= 0.12.5 deprecates `.value`)."""
    get = getattr(variable, "get_value", None)
    return get() if get is not None else variable.value


# --------------------------------------------------------------------------- the module


class QuantizedLinear(nnx.Module):
    """A linear layer with a quantized weight; `__call__` runs `xla_qops.quantized_matmul`.

    NNX state (`nnx.Param`s): ``weight`` (API.md section 2's ``[out, in]`` /
    ``[in/B, B, out]``, int4 packed), ``scale``, ``zero_point`` (None when
    symmetric), ``bias`` (the float layer's own Param, or None) and
    ``input_scale`` (float32 ``[in]`` multiplying the input before the matmul:
    an AWQ scale `quantize_model` could not fold into the layer's producer, as
    torch_bridge's `XlaQuantizedLinear.input_scale`; None otherwise). Static
    attributes: the weight's `bits`, `block_size`, `packed`, `format`, the
    activation scheme, how the input maps onto ``[..., in]``, and
    ``input_rotation``: None, or the block b of the Hadamard rotation applied
    to the input after ``input_scale`` (`quantize_model`'s
    ``smoothing="hadamard"``: the weight holds W H; x H is computed per call,
    `xla_qops.quantizers.rotation`).

    Build one with `from_quantized` (or let `quantize_model` do it).

    Call: ``x`` of the replaced layer's input shape -> its output shape. The
    matmul runs in `dtype` when set, else in the promotion of ``x``'s dtype
    with `param_dtype` (as `nnx.Linear` does).
    """

    def __init__(self, weight: QuantizedWeight, *, bias=None, quantize_activation: bool = False,
                 activation_format: Optional[str] = None, in_axis: int = -1,
                 out_shape: Optional[tuple] = None, einsum_str: Optional[str] = None,
                 dtype=None, param_dtype=jnp.float32, metadata: Optional[Mapping] = None,
                 input_scale=None, input_rotation: Optional[int] = None):
        """Prefer `from_quantized`; `metadata` maps 'weight' / 'scale' / 'zero_point' /
        'input_scale' to each Param's metadata (sharding)."""
        metadata = metadata or {}
        self.weight = nnx.Param(weight.w, **metadata.get("weight", {}))
        self.scale = nnx.Param(weight.scale, **metadata.get("scale", {}))
        self.zero_point = (None if weight.zero_point is None
                           else nnx.Param(weight.zero_point, **metadata.get("zero_point", {})))
        if bias is not None and not isinstance(bias, nnx.Variable):
            bias = nnx.Param(jnp.asarray(bias))
        self.bias = bias
        self.input_scale = (None if input_scale is None else nnx.Param(
            jnp.asarray(input_scale, jnp.float32), **metadata.get("input_scale", {})))
        self.bits, self.block_size, self.packed = weight.bits, weight.block_size, weight.packed
        self.format = weight.format
        self.quantize_activation = bool(quantize_activation)
        self.activation_format = activation_format if quantize_activation else None
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.in_axis = int(in_axis)
        self.out_shape = tuple(out_shape) if out_shape is not None else (weight.out_features,)
        self.einsum_str = einsum_str
        self.dtype, self.param_dtype = dtype, param_dtype
        self.input_rotation = (None if input_rotation is None
                               else rotation.check_block(input_rotation, weight.in_features))

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, *, bias=None,
                       quantize_activation: bool = False,
                       activation_format: Optional[str] = None,
                       dtype=None, param_dtype=jnp.float32,
                       input_scale=None, input_rotation: Optional[int] = None
                       ) -> "QuantizedLinear":
        """A layer computing ``((x * input_scale) H) @ W.T + bias`` over the last axis of
        ``x`` (nnx.Linear's contract) for a `QuantizedWeight` W; `bias` an array ``[out]``
        or None, `input_scale` an array ``[in]`` or None, `input_rotation` None (no H) or
        the block b of H (a power of two dividing ``in``; W must then hold the rotated
        weight, as `quantize_model` and torch_bridge's checkpoints give it)."""
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"weight: expected an xla_qops.QuantizedWeight, got "
                            f"{type(weight).__name__}")
        if bias is not None and tuple(np.shape(bias)) != (weight.out_features,):
            raise ValueError(f"bias: expected shape ({weight.out_features},) [out], got "
                             f"{tuple(np.shape(bias))}")
        if input_scale is not None and tuple(np.shape(input_scale)) != (weight.in_features,):
            raise ValueError(f"input_scale: expected shape ({weight.in_features},) [in], got "
                             f"{tuple(np.shape(input_scale))}")
        return cls(weight, bias=bias, quantize_activation=quantize_activation,
                   activation_format=activation_format, dtype=dtype, param_dtype=param_dtype,
                   input_scale=input_scale, input_rotation=input_rotation)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The weight as a `QuantizedWeight` (the arrays the state holds, no copy)."""
        return QuantizedWeight(
            w=_value(self.weight), scale=_value(self.scale),
            zero_point=None if self.zero_point is None else _value(self.zero_point),
            bits=self.bits, block_size=self.block_size, packed=self.packed, format=self.format)

    def __call__(self, x):
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype,
                                                                          self.param_dtype)
        x = jnp.asarray(x, dtype)
        if self.einsum_str is not None:
            in_axis, permutation, bias_shape = _einsum_plan(self.einsum_str, x.ndim,
                                                            self.out_shape)
        else:
            in_axis, permutation = self.in_axis % x.ndim, None
            bias_shape = self.out_shape
        if in_axis != x.ndim - 1:
            x = jnp.moveaxis(x, in_axis, -1)
        if self.input_scale is not None:  # in float32, as torch_bridge's layer applies it
            x = (x.astype(jnp.float32) * _value(self.input_scale)).astype(dtype)
        if self.input_rotation is not None:
            x = rotation.rotate_rows(x, self.input_rotation)
        y = quantized_matmul(x, self.quantized_weight,
                             quantize_activation=self.quantize_activation,
                             activation_format=self.activation_format)
        y = y.reshape(*y.shape[:-1], *self.out_shape)
        if permutation is not None:
            y = jnp.transpose(y, permutation)
        if self.bias is not None:
            y = y + jnp.reshape(_value(self.bias), bias_shape).astype(y.dtype)
        return y


# ------------------------------------------------------------- einsum with one contraction


@dataclasses.dataclass(frozen=True)
class _Einsum:
    """An einsum ``lhs,rhs->out`` read as one matmul over the contracted index."""
    lhs: str
    rhs: str
    out: str
    contracted: str  # the one index lhs and rhs share

    @property
    def rhs_free(self) -> str:
        return self.rhs.replace(self.contracted, "")


def _parse_einsum(einsum_str: str) -> _Einsum:
    """Parses ``lhs,rhs->out`` (an ellipsis allowed in lhs and out); ValueError naming
    what makes it more than one matmul over one contracted index."""
    s = einsum_str.replace(" ", "")
    if "->" not in s or s.count(",") != 1:
        raise ValueError(f"einsum_str: expected 'lhs,rhs->out' with two operands, got "
                         f"{einsum_str!r}")
    operands, out = s.split("->")
    lhs, rhs = operands.split(",")
    if "..." in rhs:
        raise ValueError(f"einsum_str: an ellipsis on the kernel side is not one matmul, got "
                         f"{einsum_str!r}")
    letters = lambda t: t.replace("...", "")  # noqa: E731
    lhs_l, out_l = letters(lhs), letters(out)
    for name, t in (("input", lhs_l), ("kernel", rhs), ("output", out_l)):
        if len(set(t)) != len(t):
            raise ValueError(f"einsum_str: a repeated index in the {name} ({einsum_str!r})")
    shared = set(lhs_l) & set(rhs)
    contracted = [c for c in shared if c not in out_l]
    if len(contracted) != 1 or len(shared) != 1:
        raise ValueError(f"einsum_str: expected exactly one index shared by input and kernel "
                         f"and summed over, got {einsum_str!r}")
    if set(out_l) != (set(lhs_l) | set(rhs)) - set(contracted):
        raise ValueError(f"einsum_str: every free index must reach the output, got "
                         f"{einsum_str!r}")
    if ("..." in lhs) != ("..." in out):
        raise ValueError(f"einsum_str: an ellipsis must be in both input and output, got "
                         f"{einsum_str!r}")
    return _Einsum(lhs, rhs, out, contracted[0])


def _expand(term: str, n: int, fill: str) -> str:
    return term.replace("...", fill[:n])


def _einsum_plan(einsum_str: str, x_ndim: int, rhs_free_shape: tuple = ()):
    """(input axis contracted, output permutation, bias broadcast shape) for an input of
    rank `x_ndim`: the matmul's result, ``[lhs free..., rhs free...]``, permuted into
    the einsum's output order (static Python, evaluated once per trace). The bias
    broadcasts as nnx.Einsum's does: the kernel's size on its indices, 1 elsewhere."""
    e = _parse_einsum(einsum_str)
    used = set(e.lhs + e.rhs + e.out)
    fill = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                   if c not in used)
    n_ellipsis = x_ndim - len(e.lhs.replace("...", ""))
    lhs, out = _expand(e.lhs, n_ellipsis, fill), _expand(e.out, n_ellipsis, fill)
    produced = lhs.replace(e.contracted, "") + e.rhs_free
    permutation = tuple(produced.index(c) for c in out)
    sizes = dict(zip(e.rhs_free, rhs_free_shape))
    bias_shape = tuple(sizes.get(c, 1) for c in out)
    return lhs.index(e.contracted), (None if permutation == tuple(range(len(out)))
                                     else permutation), bias_shape


# ---------------------------------------------------------------- the layers it replaces


@dataclasses.dataclass
class _Layer:
    """A replaceable layer: its kernel as ``[out, in]`` and how to rebuild its call."""
    path: str
    module: object
    w: np.ndarray  # float32 [out, in]
    in_axis: int
    out_shape: tuple
    einsum_str: Optional[str]
    in_names: tuple  # the kernel's partitioning names of `in` / `out` (None: not sharded)
    out_names: tuple
    kernel_in_axis: int = 0  # the kernel's contracted axis (an input scale multiplies it)


def _layer(path: str, module) -> tuple[Optional[_Layer], Optional[str]]:
    """(_Layer, None) for a replaceable module, (None, why not) otherwise."""
    kernel = np.asarray(jax.device_get(_value(module.kernel)), np.float32)
    names = _sharding_names(module.kernel, kernel.ndim)
    if isinstance(module, nnx.Linear):
        return _Layer(path, module, kernel.T, -1, (kernel.shape[1],), None,
                      names[0], names[1]), None
    if isinstance(module, nnx.LinearGeneral):
        if len(module.axis) != 1 or len(module.in_features) != 1:
            return None, f"contracts {len(module.axis)} axes (one is one matmul)"
        if module.batch_axis:
            return None, "has batch axes (a batched matmul)"
        out_shape = tuple(module.out_features)
        return _Layer(path, module, kernel.reshape(kernel.shape[0], -1).T, module.axis[0],
                      out_shape, None, names[0], _joined(names[1:])), None
    # nnx.Einsum
    if module.einsum_str is None:
        return None, "has no einsum_str of its own (given per call)"
    try:
        e = _parse_einsum(module.einsum_str)
    except ValueError as err:
        return None, str(err)
    c = e.rhs.index(e.contracted)
    moved = np.moveaxis(kernel, c, 0)
    rest = names[:c] + names[c + 1:]
    return _Layer(path, module, moved.reshape(moved.shape[0], -1).T, -1, moved.shape[1:],
                  module.einsum_str.replace(" ", ""), names[c], _joined(rest), c), None


def _sharding_names(variable, ndim: int) -> tuple:
    """The kernel's per-axis partitioning names (None each where it has none)."""
    metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in SHARDING_KEYS:
        spec = metadata.get(key)
        if spec is not None:
            names = tuple(spec)
            return names + (None,) * (ndim - len(names))
    return (None,) * ndim


def _joined(names: tuple):
    """One partitioning entry for several kernel axes flattened into one (row-major):
    the named axes must lead, else the flat axis has no such layout (None)."""
    named = [n for n in names if n is not None]
    if not named:
        return None
    if any(n is None for n in names[:len(named)]):
        return None
    flat = []
    for n in named:
        flat += list(n) if isinstance(n, tuple) else [n]
    return flat[0] if len(flat) == 1 else tuple(flat)


def _param_metadata(layer: _Layer, qw: QuantizedWeight) -> dict:
    """{'weight' | 'scale' | 'zero_point': Param metadata}: the kernel's metadata with its
    partitioning mapped onto each quantized array's layout."""
    metadata = dict(layer.module.kernel.get_metadata()) if hasattr(
        layer.module.kernel, "get_metadata") else {}
    key = next((k for k in SHARDING_KEYS if metadata.get(k) is not None), None)
    if key is None:
        return {}
    if metadata.get("mesh") is None:
        sharding = getattr(_value(layer.module.kernel), "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            metadata["mesh"] = sharding.mesh  # place the new arrays where the kernel was
    i, o = layer.in_names, layer.out_names
    if qw.blockwise:
        layouts = {"weight": (i, None, o), "scale": (i, o)}
    else:
        layouts = {"weight": (o, i), "scale": (o,)}
    layouts["zero_point"] = layouts["scale"]
    layouts["input_scale"] = (i,)
    spec_type = type(metadata[key])
    make = ((lambda names: jax.sharding.PartitionSpec(*names))
            if issubclass(spec_type, jax.sharding.PartitionSpec) else tuple)
    return {name: dict(metadata, **{key: make(names)}) for name, names in layouts.items()}


# ------------------------------------------------------------------------ quantize_model


def _check_arguments(model, scheme, block_size, symmetric, filter_fn, method, calibration,
                     smoothing=None):
    """Every argument of `quantize_model`, before anything is done; returns (Scheme, B,
    calibration items or None)."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {', '.join(map(repr, SCHEMES))}, "
                         f"got {scheme!r}")
    spec = SCHEMES[scheme]
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if block_size != -1 and block_size <= 0:
        raise ValueError(f"block_size: expected -1 (per-channel) or a positive int, "
                         f"got {block_size}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric: expected a bool, got {type(symmetric).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable(path, module) or None, got "
                        f"{type(filter_fn).__name__}")
    block_size = spec.block_size(block_size)  # MX / NV blocks
    if spec.float_weight:
        _check_format(spec.format, spec.bits, block_size, symmetric, True, method)
    check_method(method, calibration is not None,
                 calibration_is="an iterable of model inputs (tuples of positional arguments)")
    if smoothing is not None:
        if smoothing != "hadamard":
            raise ValueError(f"smoothing: expected None or 'hadamard' (SmoothQuant is "
                             f"torch_bridge.quantize_model's), got {smoothing!r}")
        rotation.check_arguments(scheme, method)
    items = None
    if calibration is not None:
        if isinstance(calibration, (jax.Array, np.ndarray, Mapping)) or not isinstance(
                calibration, Iterable):
            raise TypeError(f"calibration: expected an iterable of model inputs (each a tuple "
                            f"of positional arguments, or one array), got "
                            f"{type(calibration).__name__}; wrap a single input in a list")
        items = [item if isinstance(item, tuple) else (item,) for item in calibration]
        if not items:
            raise ValueError("calibration: expected at least one model input, got none")
    return spec, block_size, items


REPLACEABLE = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def quantize_model(model, *, scheme: str = "w8a16", block_size: int = -1,
                   symmetric: bool = True, filter_fn: Optional[Callable] = None,
                   method: str = "rtn", calibration=None, smoothing: Optional[str] = None):
    """Swaps every `nnx.Linear` (and single-contraction `nnx.Einsum` / `nnx.LinearGeneral`)
    of `model` for a `QuantizedLinear`, in place; returns `model`.

    Args:
      model: a `flax.nnx.Module`.
      scheme: a name of `xla_qops.schemes.SCHEMES`, as for
        `torch_bridge.quantize_model`: "w8a16", "w4a16", "w8a8", "w4a8", and
        the float formats "w8a16-fp8", "w8a8-fp8", "w4a16-mxfp4",
        "w4a16-nvfp4", "w4a8-fp8".
      block_size: -1 per-channel, else B; layers whose `in` B does not divide
        are left float (see `quantization_report`). mxfp4 takes -1 as 32,
        nvfp4 has B = 16.
      symmetric: absmax scales without zero point, else min/max with one.
      filter_fn: ``filter_fn(path, module) -> bool`` (path '/'-joined, e.g.
        "layers/0/attn/q"); False leaves the layer float.
      method: a name of `xla_qops.quantizers.METHODS` ("rtn", "hqq", and the
        calibrated "gptq", "awq", "awq+gptq", "autoround", ...), as for
        `torch_bridge.quantize_model`: AWQ's per-input-channel scales are
        folded into the producing `nnx.RMSNorm` / `nnx.LayerNorm` / `nnx.Linear`
        (changed in place) where the model's outputs allow it, else applied
        by the layer (`QuantizedLinear.input_scale`); docs/flax.md.
      calibration: for the calibrated methods, an iterable of model inputs
        (each a tuple of positional arguments, or one array); the model runs
        eagerly on them, layer group by layer group.
      smoothing: None, or "hadamard" (as for `torch_bridge.quantize_model`): each
        layer's weight is rotated by a block-diagonal Hadamard matrix H before
        `method` fits it (on the rotated inputs' statistics) and the layer
        rotates its inputs at run time (`QuantizedLinear.input_rotation`;
        `xla_qops.quantizers.rotation`). The integer schemes only, with "rtn",
        "hqq", "gptq", "awq" or "awq+gptq" (AWQ's clip search alone: no input
        scales). No data needed with "rtn" / "hqq".

    Returns:
      `model`, with `quantization_report(model)` listing swapped and skipped
      layers, each layer's method used and where its AWQ scale went.
    """
    spec, block_size, items = _check_arguments(model, scheme, block_size, symmetric, filter_fn,
                                               method, calibration, smoothing)
    todo, skipped = [], []
    for path, module in _modules(model):
        if not isinstance(module, REPLACEABLE):
            continue
        if not path:
            skipped.append((path, "the model itself is the layer; use "
                                  "QuantizedLinear.from_quantized"))
            continue
        if filter_fn is not None and not filter_fn(path, module):
            skipped.append((path, "filter_fn returned False"))
            continue
        layer, reason = _layer(path, module)
        if layer is None:
            skipped.append((path, reason))
            continue
        reason = _shape_problem(layer.w.shape[1], spec, block_size)
        if reason:
            skipped.append((path, reason))
            continue
        todo.append(layer)

    results = _quantize_layers(model, todo, items, spec, block_size, symmetric, method,
                               rotate=smoothing == "hadamard")
    report = QuantizationReport(
        scheme, block_size, symmetric, method, [layer.path for layer in todo], skipped,
        methods={path: r.method for path, r in results.items()},
        input_scales={path: r.input_scale for path, r in results.items()
                      if r.input_scale is not None},
        rotations={path: r.rotation for path, r in results.items()
                   if r.rotation is not None})
    _REPORTS[id(model)] = report
    return model


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_model` swapped (paths) and skipped ((path, reason))."""
    scheme: str
    block_size: int
    symmetric: bool
    method: str
    swapped: list
    skipped: list
    # path -> the method used (round to nearest where the calibration inputs never reached
    # the layer, or with the held-out fallback named where it was taken)
    methods: dict = dataclasses.field(default_factory=dict)
    # path -> (where AWQ's input scale s went: "folded into <path>" or "explicit", s [in])
    input_scales: dict = dataclasses.field(default_factory=dict)
    # path -> what smoothing="hadamard" did there (`rotation.describe`: "Hadamard
    # rotation, blocks of b", or "not rotated (...)" for an odd `in`)
    rotations: dict = dataclasses.field(default_factory=dict)


_REPORTS: dict = {}


def quantization_report(model) -> Optional[QuantizationReport]:
    """The report of the last `quantize_model` call on `model`."""
    return _REPORTS.get(id(model))


def _modules(model):
    """(path '/'-joined, module) of every module in `model`'s graph, once each."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            yield "/".join(map(str, path)), node


def _shape_problem(in_features: int, spec: Scheme, block_size: int) -> Optional[str]:
    if block_size != -1 and in_features % block_size:
        return f"in_features={in_features} is not divisible by block_size={block_size}"
    if spec.float_weight and spec.bits == 4 and block_size == -1 and in_features % 2:
        return f"in_features={in_features} is odd: e2m1 codes are stored in pairs"
    return None


def _build(layer: _Layer, qw: QuantizedWeight, spec: Scheme,
           input_scale: Optional[np.ndarray] = None,
           input_rotation: Optional[int] = None) -> QuantizedLinear:
    m = layer.module
    metadata = _param_metadata(layer, qw)
    mesh = next((d["mesh"] for d in metadata.values() if d.get("mesh") is not None), None)
    if mesh is not None:  # placed first: flax 0.12.0 constrains the value in place,
        # by its PartitionSpec against the mesh in context (entered below)
        key = next(k for k in SHARDING_KEYS if metadata["weight"].get(k) is not None)
        place = {name: jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*d[key])) for name, d in metadata.items()}
        qw = dataclasses.replace(
            qw, w=jax.device_put(qw.w, place["weight"]),
            scale=jax.device_put(qw.scale, place["scale"]),
            zero_point=None if qw.zero_point is None else jax.device_put(
                qw.zero_point, place["zero_point"]))
        if input_scale is not None:
            input_scale = jax.device_put(jnp.asarray(input_scale), place["input_scale"])
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        return QuantizedLinear(
            qw, bias=getattr(m, "bias", None), quantize_activation=spec.quantize_activation,
            activation_format=spec.activation_format, in_axis=layer.in_axis,
            out_shape=layer.out_shape, einsum_str=layer.einsum_str, dtype=m.dtype,
            param_dtype=m.param_dtype, metadata=metadata, input_scale=input_scale,
            input_rotation=input_rotation)


def _replace(model, swapped: dict) -> None:
    """Puts each new module where its float layer was -- at every place that held it
    (a layer shared by two parents is swapped in both)."""
    while True:
        found = [(path, swapped[id(node)]) for path, node in nnx.iter_graph(model)
                 if id(node) in swapped and path]
        if not found:
            return
        for path, new in found:
            parent = model
            for key in path[:-1]:
                parent = parent[key] if isinstance(key, int) or isinstance(
                    parent, (Mapping, list)) else getattr(parent, key)
            key = path[-1]
            if isinstance(key, int) or isinstance(parent, (Mapping, list)):
                parent[key] = new
            else:
                setattr(parent, key, new)


# ------------------------------------------------------------ layer-by-layer quantization
# The steps of torch_bridge.calibrate on an NNX model; what each step decides is
# xla_qops.quantizers.layerwise's, shared with the torch face.


@dataclasses.dataclass
class _LayerResult:
    method: str  # the method used (layerwise.LayerQuantization.method)
    input_scale: Optional[tuple]  # (where s went, s) or None
    rotation: Optional[str] = None  # smoothing="hadamard": rotation.describe's text


class _Stop(Exception):
    """Raised by a watcher to end a gathering forward early."""


@contextlib.contextmanager
def _watching(model, before=None, after=None):
    """Calls ``before(module, input)`` and ``after(module, output)`` around every module
    call of `model`'s forwards (the `__call__` of each module class in its graph wrapped
    for the duration; a class's call reached again through `super()` is seen once)."""
    classes = {cls for _, m in _modules(model) for cls in type(m).__mro__
               if issubclass(cls, nnx.Module) and "__call__" in vars(cls)}
    originals = {cls: vars(cls)["__call__"] for cls in classes}
    active = set()  # modules inside their own call

    def wrap(original):
        @functools.wraps(original)
        def call(self, *args, **kwargs):
            if id(self) in active:
                return original(self, *args, **kwargs)
            active.add(id(self))
            try:
                if before is not None and args:
                    before(self, args[0])
                out = original(self, *args, **kwargs)
            finally:
                active.discard(id(self))
            if after is not None:
                after(self, out)
            return out
        return call

    try:
        for cls, original in originals.items():
            cls.__call__ = wrap(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def _run(model, item, index: int):
    try:
        return model(*item)
    except _Stop:
        raise
    except Exception as e:  # noqa: BLE001  the model's own error, named for the user
        raise ValueError(f"calibration: the model cannot take calibration item {index} "
                         f"({type(e).__name__}: {e})") from e


def _trace(model, layers: list, first_item) -> tuple[list, set]:
    """(layerwise groups by path, in run order, with producer modules; paths of layers
    run more than once) from one forward on the first calibration input."""
    by_id = {id(layer.module): layer for layer in layers}
    produced, calls, order = {}, {}, []
    alive = []  # every array whose id is recorded stays alive: ids are not reused

    def before(module, x):
        layer = by_id.get(id(module))
        if layer is None:
            return
        calls[layer.path] = calls.get(layer.path, 0) + 1
        if calls[layer.path] == 1:
            alive.append(x)
            order.append((layer.path, id(x), produced.get(id(x))))

    def after(module, out):
        # The innermost module returns first: it produced the array (a parent returning
        # it unchanged holds no parameter to fold into).
        if isinstance(out, jax.Array) and id(out) not in produced:
            produced[id(out)] = module
            alive.append(out)

    with _watching(model, before, after):
        _run(model, first_item, 0)
    return layerwise.group_by_input(order), {p for p, c in calls.items() if c > 1}


def _layer_rows(layer: _Layer, x) -> np.ndarray:
    """A layer's input as float64 rows ``[n, in]`` (its contracted axis last)."""
    x = np.asarray(jax.device_get(x), np.float32)
    axis = _einsum_plan(layer.einsum_str, x.ndim)[0] if layer.einsum_str else layer.in_axis
    return np.moveaxis(x, axis, -1).reshape(-1, layer.w.shape[1]).astype(np.float64)


def _gather(model, items: list, layers: list, *, stop_early: bool, holdout: bool) -> layerwise.InputStatistics:
    """Statistics of the input shared by `layers` over every calibration input (with
    `holdout`, the held-out inputs' X^T X apart); a forward stops once they all ran."""
    stats, seen = layerwise.InputStatistics(), set()
    index_of = {id(layer.module): i for i, layer in enumerate(layers)}
    held = [False]

    def before(module, x):
        index = index_of.get(id(module))
        if index is None:
            return
        if index == 0:  # the group shares one input: count it once
            rows = _layer_rows(layers[0], x)
            stats.add(rows.shape[0], np.abs(rows).sum(0),
                      hessian=quantizers.calibration_hessian(rows), held_out=held[0])
        seen.add(index)
        if stop_early and len(seen) == len(layers):
            raise _Stop

    with _watching(model, before):
        for index, item in enumerate(items):
            held[0] = holdout and heldout.is_holdout(index, len(items))
            seen.clear()
            try:
                _run(model, item, index)
            except _Stop:
                pass
    return stats


def _outputs(model, item) -> list:
    """The model's output arrays as float32 numpy."""
    return [np.asarray(jax.device_get(leaf), np.float32)
            for leaf in jax.tree_util.tree_leaves(model(*item)) if isinstance(leaf, jax.Array)]


def _set_value(variable, value) -> None:
    set_value = getattr(variable, "set_value", None)  # flax >= 0.12.5
    if set_value is not None:
        set_value(value)
    else:
        variable.value = value


def _multiply(variable, factor: np.ndarray, axis: int) -> None:
    """Multiplies `variable`'s array along `axis` by `factor` (in the array's dtype)."""
    value = _value(variable)
    shape = [1] * value.ndim
    shape[axis] = -1
    _set_value(variable, value * jnp.asarray(factor, value.dtype).reshape(shape))


def _fold(producer, inverse: np.ndarray) -> Optional[list]:
    """Multiplies `producer`'s outputs by `inverse` in its parameters -- an `nnx.RMSNorm` /
    `nnx.LayerNorm`'s scale and bias, an `nnx.Linear`'s output columns and bias; returns
    [(variable, saved array)] to undo it, or None where it cannot."""
    n = inverse.size
    if isinstance(producer, nnx.Linear) and producer.out_features == n:
        targets = [(producer.kernel, 1), (producer.bias, 0)]
    elif isinstance(producer, (nnx.RMSNorm, nnx.LayerNorm)) and producer.scale is not None \
            and tuple(np.shape(_value(producer.scale))) == (n,):
        targets = [(producer.scale, 0), (getattr(producer, "bias", None), 0)]
    else:
        return None
    saved = []
    for variable, axis in targets:
        if variable is None or np.shape(_value(variable))[axis] != n:
            continue
        saved.append((variable, _value(variable)))
        _multiply(variable, inverse, axis)
    return saved


def _restore(saved: list) -> None:
    for variable, value in saved:
        _set_value(variable, value)


def _input_scales(model, groups, ran: set, repeated: set, by_path, items, spec: Scheme,
                  block_size: int, symmetric: bool) -> dict:
    """AWQ's per-input-channel scales, per group in run order on the float model:
    {path: (where, s)}, where "folded into <producer path>" (the producer's parameters
    divided by s and the group's kernels multiplied, kept only if the model's outputs on
    the first calibration input stay the same) or "explicit" (the quantized layer
    multiplies its inputs by 1/s). torch_bridge.calibrate._scales, step for step."""
    paths = {id(m): path for path, m in _modules(model)}
    grid_of = None if spec.format == "int" else (
        lambda scaled: FloatGrid.of(scaled, spec.format))
    scales, reference = {}, None
    for g in groups:
        if g.names[0] not in ran:
            continue  # the calibration inputs never reach it: no statistics
        layers = [by_path[p] for p in g.names]
        stats = _gather(model, items, layers, stop_early=not set(g.names) & repeated,
                        holdout=False)
        if stats.rows == 0:
            continue
        w_cat = np.concatenate([_layer(layer.path, layer.module)[0].w for layer in layers])
        s = awq.scale_search(w_cat, stats.hessian, stats.mean_abs, spec.bits, block_size,
                             symmetric, grid_of=grid_of)
        if np.all(s == 1):
            continue
        place = "explicit"
        if g.producer is not None:
            if reference is None:
                reference = _outputs(model, items[0])
            saved = _fold(g.producer, 1.0 / s)
            if saved is not None:
                kernels = [(layer.module.kernel, _value(layer.module.kernel))
                           for layer in layers]
                for layer in layers:
                    _multiply(layer.module.kernel, s, layer.kernel_in_axis)
                if layerwise.outputs_unchanged(reference, _outputs(model, items[0])):
                    place = f"folded into {paths.get(id(g.producer), '?')}"
                else:
                    _restore(saved + kernels)
        for p in g.names:
            scales[p] = (place, s)
    return scales


def _quantize_layers(model, todo: list, items, spec: Scheme, block_size: int,
                     symmetric: bool, method: str, rotate: bool = False) -> dict:
    """Quantizes and swaps the layers `todo`, group by group in run order (each group's
    inputs gathered with every earlier group already quantized, as the quantized model
    will see them); returns {path: _LayerResult}. `rotate`: each weight as W H and its
    inputs' statistics as H^T X^T X H (`rotation`), no AWQ input scales;
    torch_bridge.calibrate._quantize_groups' rule."""
    by_path = {layer.path: layer for layer in todo}
    groups, repeated = [], set()  # repeated: layers run more than once in a forward
    if method in quantizers.CALIBRATED:
        groups, repeated = _trace(model, todo, items[0])
    ran = {p for g in groups for p in g.names}  # the layers the calibration inputs reach
    groups += [layerwise.Group([layer.path], None) for layer in todo if layer.path not in ran]
    scales = (_input_scales(model, groups, ran, repeated, by_path, items, spec, block_size,
                            symmetric) if method in quantizers.INPUT_SCALED and not rotate
              else {})
    results = {}
    for g in groups:
        group_method = method if g.names[0] in ran or method not in quantizers.CALIBRATED \
            else "rtn"
        hessian = holdout = None
        if group_method in quantizers.CALIBRATED:
            stats = _gather(model, items, [by_path[p] for p in g.names],
                            stop_early=not set(g.names) & repeated, holdout=True)
            hessian, holdout = stats.hessian, stats.holdout_hessian
        in_features = by_path[g.names[0]].w.shape[1]
        block = rotation.block_for(in_features) if rotate else 1
        if block > 1:  # the rotated problem: W H, inputs X H
            hessian = None if hessian is None else rotation.rotate_hessian(hessian, block)
            holdout = None if holdout is None else rotation.rotate_hessian(holdout, block)
        swapped = {}
        for path in g.names:
            layer = _layer(path, by_path[path].module)[0]  # its kernel as folding left it
            place, s = scales.get(path, (None, None))
            explicit = place == "explicit"
            group = layer.w.shape[1] if block_size == -1 else block_size
            w = rotation.rotate_weight_array(layer.w, block) if block > 1 else layer.w
            done = layerwise.quantize_layer(
                w, scale=s, explicit=explicit, hessian=hessian, holdout=holdout,
                bits=spec.bits, block_size=block_size, symmetric=symmetric,
                method=group_method, format=spec.format,
                pack=spec.bits == 4 and group % 2 == 0)
            swapped[id(layer.module)] = _build(layer, done.weight, spec,
                                               1.0 / s if explicit else None,
                                               block if block > 1 else None)
            results[path] = _LayerResult(
                done.method, None if s is None else (place, s),
                rotation.describe(block, in_features) if rotate else None)
        _replace(model, swapped)
    return results


# --------------------------------------------------------------------------- checkpoints

# QuantizedLinear's state names -> the checkpoint's (torch_xla's buffer names, which
# xla_qops.checkpoint writes for every quantized layer).
_CHECKPOINT_NAMES = {"weight": "weight", "scale": "weight_scaler", "zero_point": "zero_point"}


def _checkpoint_name(keys: tuple, layers) -> str:
    """The checkpoint tensor name of a state leaf at `keys`: a QuantizedLinear's arrays by
    the checkpoint's names, everything else by its '.'-joined path."""
    prefix, name = ".".join(map(str, keys[:-1])), keys[-1]
    if prefix in layers and name in _CHECKPOINT_NAMES:
        return f"{prefix}.{_CHECKPOINT_NAMES[name]}"
    return ".".join(map(str, keys))


def _stored(keys: tuple, value, layers) -> np.ndarray:
    """A leaf as the file holds it: a layer's bias as [out] (the checkpoint's rule; an
    einsum's bias flattened), the rest as is."""
    value = np.asarray(value)
    return value.reshape(-1) if ".".join(map(str, keys[:-1])) in layers and (
        keys[-1] == "bias") else value


def _layers_by_prefix(model) -> dict:
    return {path.replace("/", "."): m for path, m in _modules(model)
            if isinstance(m, QuantizedLinear)}


def _rotations(layers) -> dict:
    """``{p.input_rotation: int64 scalar}`` of the rotated layers (torch_bridge's
    `XlaQuantizedLinear` buffer of that name: the block b; H is derived from it)."""
    return {f"{p}.input_rotation": np.asarray(m.input_rotation, np.int64)
            for p, m in layers.items() if m.input_rotation is not None}


def save_quantized(model, path) -> None:
    """Writes `model`'s state to a safetensors file with `xla_qops.checkpoint`'s layout:
    each `QuantizedLinear` at path ``p`` as ``p.weight`` / ``p.weight_scaler`` /
    ``p.zero_point`` with its scheme in the metadata, ``p.input_rotation`` (int64
    scalar: its block) where it rotates its inputs, ``p.bias`` and every other
    array of the state by its '.'-joined path. `load_quantized` restores it exactly."""
    layers = _layers_by_prefix(model)
    weights = {p: m.quantized_weight for p, m in layers.items()}
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    tensors = {_checkpoint_name(keys, layers): _stored(keys, value, layers)
               for keys, value in flat.items()
               if not (".".join(map(str, keys[:-1])) in layers
                       and keys[-1] in _CHECKPOINT_NAMES)}
    tensors.update(_rotations(layers))
    checkpoint.save_quantized(
        path, weights, tensors,
        quantize_activation={p: m.quantize_activation for p, m in layers.items()},
        activation_format={p: m.activation_format for p, m in layers.items()})


def load_quantized(model, path):
    """Restores a file written by `save_quantized` into `model` (the same architecture,
    already quantized with the same scheme); every tensor is checked against the
    model's state first (`xla_qops.checkpoint.CheckpointError` lists mismatches)."""
    state = nnx.state(model)
    layers = _layers_by_prefix(model)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    expected = {_checkpoint_name(keys, layers): _stored(keys, value, layers)
                for keys, value in flat.items()}
    rotations = _rotations(layers)  # static: checked, not loaded
    expected.update(rotations)
    loaded = checkpoint.load_quantized(path, expected)
    for name, block in rotations.items():
        stored = int(np.asarray(loaded.tensors[name]).item())
        if stored != int(block):
            raise checkpoint.CheckpointError(path, [
                f"{name}: the model rotates by blocks of {int(block)}, the file says {stored}"])
    arrays = dict(loaded.tensors)
    for prefix, qw in loaded.weights.items():
        arrays[f"{prefix}.weight"], arrays[f"{prefix}.weight_scaler"] = qw.w, qw.scale
        if qw.zero_point is not None:
            arrays[f"{prefix}.zero_point"] = qw.zero_point
    pure = traverse_util.unflatten_dict({
        keys: jnp.asarray(arrays[_checkpoint_name(keys, layers)]).reshape(np.shape(value))
        for keys, value in flat.items()})
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model
