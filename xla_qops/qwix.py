"""`PtqProvider`: qwix's post-training quantization with this project's kernels.

A drop-in for `qwix.PtqProvider` (same rules)::

    model = qwix.quantize_model(model, xla_qops.qwix.PtqProvider(rules), *inputs)

Quantized `dot_general` / `einsum` calls the kernels can run go to
`xla_qops.quantized_matmul`: a weight (a Param of the module) on the right-hand
side with one contracting axis and no batch axes, quantized to int8 or int4,
per channel or with an int `tile_size` (or a fraction of the axis) along that
axis, any calibration of the weight, and either no activation quantization
(W8A16, W4A16) or dynamic int8 activations (W8A8, W4A8). Everything else --
static activation scales (SRQ), other qtypes (fp8, nf4, mx formats), tile
maps, batched matmuls, convolutions -- runs qwix's own path, unchanged.

The weight is quantized by qwix itself (`qarray.quantize` with the rule's
`HowToQuantize`, so the integers and scales are qwix's) and converted once, at
quantization, into a `QuantizedWeight`: qwix's QArray ``[in, out]`` (the
contracting axis moved first, the other axes flattened) becomes API.md's
``[out, in]`` / ``[in/B, B, out]``, its integer-domain zero point ``zp``
(``w = (q - zp) * scale``) becomes ours, ``scale * zp``
(``w = scale * q - zero_point``), and int4 is packed two per byte. The model's
state then holds the converted arrays (boxed like qwix's, with the kernel's
metadata), and a call runs the kernel directly.

Supported qwix: 0.1.5 (with flax 0.12.0, the pinned jax 0.7.1) and 0.1.8
(with flax 0.12.12 on jax 0.12) (the plug-in points used -- `PtqProvider.dot_general` /
`einsum`, `_get_current_rule_and_op_id`, `ptq.WithAux`,
`ptq.create_quantized_param`, `flax_util.find_param`,
`dot_general.get_how_to_quantize`, `einsum.get_how_to_quantize` -- are
partly private; `SUPPORTED_QWIX` names the versions tested).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

try:
    import flax.struct
    import qwix
    from qwix._src.core import dot_general as qwix_dot_general
    from qwix._src.core import einsum as qwix_einsum
    from qwix._src.core import qarray
    from qwix._src.providers import ptq
    try:
        from qwix._src.utils import flax_util  # qwix >= 0.1.6
    except ImportError:
        from qwix._src import flax_util  # qwix 0.1.5
except ImportError as e:  # the optional extra
    raise ImportError("xla_qops.qwix needs qwix and flax: pip install 'xla-qops[flax]'") from e

from xla_qops.api import quantized_matmul
from xla_qops.nnx import _einsum_plan, _parse_einsum
from xla_qops.quantize import QuantizedWeight

# 0.1.5 is the newest qwix that runs on flax 0.12.0 (the pinned jax 0.7.1 stack: 0.1.6
# and later call Variable.get_raw_value, which flax 0.12.0 lacks); 0.1.8 on current JAX.
SUPPORTED_QWIX = ("0.1.5", "0.1.8")
_INT_QTYPES = {np.dtype(jnp.int8): 8, np.dtype(jnp.int4): 4}
_FLOATS = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


@flax.struct.dataclass
class KernelWeight:
    """A qwix-quantized weight converted for `xla_qops.quantized_matmul`.

    `weight` holds the arrays (a `QuantizedWeight`, the state qwix boxes);
    the static fields say how the original kernel's axes map onto it.
    """

    weight: QuantizedWeight
    kernel_shape: tuple = flax.struct.field(pytree_node=False)  # the float kernel's shape
    contracting: int = flax.struct.field(pytree_node=False)  # its contracting axis
    quantize_activation: bool = flax.struct.field(pytree_node=False)
    dtype: Any = flax.struct.field(pytree_node=False)  # qwix's dequantized dtype

    # Array-like, as qwix's WithAux expects of what it wraps.
    shape = property(lambda self: self.kernel_shape)
    ndim = property(lambda self: len(self.kernel_shape))

    @property
    def free_shape(self) -> tuple:
        return tuple(d for i, d in enumerate(self.kernel_shape) if i != self.contracting)

    def __call__(self, lhs, lhs_contracting: int, preferred_element_type=None):
        """``dot_general(lhs, kernel, ((lhs_contracting,), (contracting,)))``: lhs's free
        axes, then the kernel's."""
        dtype = jnp.result_type(lhs.dtype, self.dtype)
        x = jnp.asarray(lhs, dtype)
        if lhs_contracting % x.ndim != x.ndim - 1:
            x = jnp.moveaxis(x, lhs_contracting, -1)
        y = quantized_matmul(x, self.weight, quantize_activation=self.quantize_activation,
                             activation_format="int8" if self.quantize_activation else None)
        y = y.reshape(*y.shape[:-1], *self.free_shape)
        return y if preferred_element_type is None else y.astype(preferred_element_type)


def from_qarray(qa, contracting: int, *, quantize_activation: bool = False) -> KernelWeight:
    """qwix's QArray of a kernel (contracting axis `contracting`, scales per channel of
    the other axes and per tile, if any, of the contracting one) -> `KernelWeight`.

    ``(q - zp) * scale`` becomes ``scale * q - scale * zp``; int4 is packed where its
    pairs fit (an even `in` or tile)."""
    bits = _INT_QTYPES[np.dtype(qa.qtype or qa.qvalue.dtype)]
    shape = tuple(qa.qvalue.shape)
    q = jnp.moveaxis(qa.qvalue.astype(jnp.int8), contracting, 0)
    k = q.shape[0]
    q = q.reshape(k, -1)  # [in, out]
    tiles = qa.scale.shape[contracting]
    moved_scale_shape = (tiles,) + tuple(d for i, d in enumerate(shape) if i != contracting)

    def per_output(a):  # scale-shaped -> [tiles, out] float32
        a = jnp.moveaxis(jnp.asarray(a, jnp.float32), contracting, 0)
        return jnp.broadcast_to(a, moved_scale_shape).reshape(tiles, -1)

    scale = per_output(qa.scale)
    zero = None if qa.zero_point is None else scale * per_output(qa.zero_point)
    if tiles == 1:  # per channel
        w, block = q.T, -1
        scale, zero = scale[0], None if zero is None else zero[0]
    else:
        block = k // tiles
        w = q.reshape(tiles, block, -1)
    qw = QuantizedWeight(w=w, scale=scale, zero_point=zero, bits=bits, block_size=block,
                         packed=False)
    if bits == 4 and (k if block == -1 else block) % 2 == 0:
        qw = qw.pack()
    return KernelWeight(qw, shape, contracting, quantize_activation, np.dtype(qa.scale.dtype))


def _kernel_route(rule, lhs, rhs) -> bool:
    """Whether a quantized matmul with this rule and these operands runs on the kernels
    (module docstring); the callers have checked the axes."""
    if rule is None or rule.weight_qtype is None or isinstance(rhs, ptq.WithAux):
        return False
    try:
        if np.dtype(rule.weight_qtype) not in _INT_QTYPES:
            return False
        if rule.act_qtype is not None and (
                np.dtype(rule.act_qtype) != np.dtype(jnp.int8) or rule.act_static_scale
                or rule.act_calibration_method not in (None, "absmax")):
            return False
    except TypeError:  # a qtype numpy does not know ("nf4", "mxfp8", ...)
        return False
    tile = rule.tile_size
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, (int, float))):
        return False
    if not hasattr(lhs, "dtype") or np.dtype(lhs.dtype) not in _FLOATS:
        return False
    if not hasattr(rhs, "dtype") or np.dtype(rhs.dtype) not in _FLOATS:
        return False
    return bool(flax_util.find_param(rhs))


class PtqProvider(qwix.PtqProvider):
    """`qwix.PtqProvider` whose quantized matmuls run `xla_qops.quantized_matmul` where the
    kernels can (module docstring); the rest, and every other op, is qwix's own."""

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                    preferred_element_type=None, *, out_sharding=None):
        (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
        if len(lhs_c) == 1 and len(rhs_c) == 1 and not lhs_b and not rhs_b:
            kernel = self._kernel("dot_general", lhs, rhs, rhs_c[0], functools.partial(
                qwix_dot_general.get_how_to_quantize, dimension_numbers=dimension_numbers))
            if kernel is not None:
                return kernel(lhs, lhs_c[0], preferred_element_type)
        return super().dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type, out_sharding=out_sharding)

    def einsum(self, einsum_str, *operands, precision=None, preferred_element_type=None,
               _dot_general=jax.lax.dot_general, out_sharding=None):
        axes = self._einsum_axes(einsum_str, operands)
        if axes is not None:
            lhs, rhs = operands
            kernel = self._kernel("einsum", lhs, rhs, axes[1], functools.partial(
                qwix_einsum.get_how_to_quantize, einsum_str=einsum_str))
            if kernel is not None:
                y = kernel(lhs, axes[0], preferred_element_type)
                permutation = _einsum_plan(einsum_str, lhs.ndim)[1]
                return y if permutation is None else jnp.transpose(y, permutation)
        return super().einsum(einsum_str, *operands, precision=precision,
                              preferred_element_type=preferred_element_type,
                              _dot_general=_dot_general, out_sharding=out_sharding)

    def _kernel(self, op_name: str, lhs, rhs, rhs_contracting: int,
                get_how_to_quantize) -> Optional[KernelWeight]:
        """The `KernelWeight` this call runs on -- converted earlier, or quantized by qwix
        and converted now -- or None for qwix's own path. Counts the op as qwix does (its
        op ids name activation scales)."""
        if isinstance(rhs, ptq.WithAux) and isinstance(rhs.array, KernelWeight):
            self._get_current_rule_and_op_id(op_name)
            return rhs.array
        rule, _ = self._get_current_rule_and_op_id(op_name, only_rule=True)
        if not _kernel_route(rule, lhs, rhs):
            return None
        self._get_current_rule_and_op_id(op_name)
        how = get_how_to_quantize(ndims=(lhs.ndim, rhs.ndim), for_lhs=False,
                                  tile_size=rule.tile_size, qtype=rule.weight_qtype,
                                  calibration_method=rule.weight_calibration_method)
        name = flax_util.find_param(rhs)
        converter = _Converting(self._qarray_module, rhs_contracting, rule.act_qtype is not None)
        # qwix's own step: quantize, box like the float Param, put it in the module.
        return ptq.create_quantized_param(name, rhs, how, _qarray_module=converter).array

    @staticmethod
    def _einsum_axes(einsum_str, operands) -> Optional[tuple]:
        """(lhs contracting axis, rhs contracting axis) of a two-operand einsum that is one
        matmul (xla_qops.nnx's rule), else None."""
        if len(operands) != 2 or not isinstance(einsum_str, str):
            return None
        try:
            e = _parse_einsum(einsum_str)
            lhs_axis = _einsum_plan(einsum_str, operands[0].ndim)[0]
        except (ValueError, AttributeError):
            return None
        if len(e.rhs) != operands[1].ndim:
            return None
        return lhs_axis, e.rhs.index(e.contracted)


class _Converting:
    """A stand-in for qwix's qarray module whose `quantize` returns a `KernelWeight`
    (qwix's quantization, then `from_qarray`)."""

    def __init__(self, qarray_module, contracting: int, quantize_activation: bool):
        self._qarray_module = qarray_module
        self._contracting = contracting
        self._quantize_activation = quantize_activation

    def quantize(self, value, how: qarray.HowToQuantize) -> KernelWeight:
        return from_qarray(self._qarray_module.quantize(value, how), self._contracting,
                           quantize_activation=self._quantize_activation)
