"""Public entry point: `quantized_matmul`.

validate (`spec.check_args`) -> pick a backend (`dispatch.resolve`; for the
kernel impls with the partitioning rule of `xla_qops.partitioning`, so that
sharded operands under plain `jax.jit` are not gathered) -> run it under a
custom VJP whose backward pass is the fused XLA formula, so every backend
(Pallas and C++ kernels included) is differentiable with respect to `x`,
`scale` and `zero_point`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from xla_qops import dispatch, partitioning
from xla_qops.backends import xla as xla_backend
from xla_qops.quantize import QuantizedWeight
from xla_qops.spec import check_args


def quantized_matmul(x, w, scale=None, zero_point=None, block_size=-1, int4_weight=False,
                     quantize_activation=False, *, weight_format=None, activation_format=None,
                     impl: dispatch.Impl = "auto"):
    """``x @ (scale * q - zero_point).T`` with a quantized weight.

    Args:
      x: activations ``[..., in]``, bfloat16, float16 or float32.
      w: quantized weight (API.md section 2): int8 ``[out, in]`` per-channel or
        ``[in/B, B, out]`` blockwise; int4 unpacked as int8 with values in
        [-8, 7], or packed two per byte as uint8 (``[out, in/2]`` /
        ``[in/B, B/2, out]``), both with ``int4_weight=True``. A
        `QuantizedWeight` may be passed instead, with no other weight argument.
      scale: float ``[out]`` per-channel, ``[in/B, out]`` blockwise.
      zero_point: None (symmetric) or float, same shape as `scale`.
      block_size: -1 for per-channel, else B, which must divide ``in``.
      int4_weight: the weight holds int4 values.
      quantize_activation: quantize `x` per token (and input block) and
        multiply the quantized operands (W8A8, W4A8): int8 x int8 with int32
        accumulation, or e4m3fn with float32 accumulation (`activation_format`).
      weight_format: the weight's element format (API.md section 7): "int8",
        "int4", "fp8" (``w`` float8_e4m3fn, same shapes as int8) or "fp4" (``w``
        uint8, two e2m1 codes per byte packed as int4). None infers "fp8" from a
        float8_e4m3fn ``w``, else "int4" with `int4_weight`, else "int8"; "fp4"
        must be named. The float formats take no zero point.
      activation_format: with `quantize_activation`, "int8" or "fp8" (scale
        amax / 448 per token and block, round to nearest even, saturating; an
        all-zero row gets scale 1). None means "int8" for int weights and
        "fp8" for fp8/fp4 weights.
      impl: "auto" (best for the platform), "xla" (fused pure JAX, any
        platform), "pallas" (Pallas kernel: Mosaic on TPU, Triton on CUDA,
        interpret mode on the host CPU), "custom_call" (host-CPU C++ kernels)
        or "reference" (the plain dequantize-then-matmul formula). Every impl
        is resolved per platform when the function is lowered; one that
        cannot run on the platform lowered for fails that lowering with a
        ValueError (`xla_qops.dispatch`).

    Returns:
      ``[..., out]`` in ``x``'s dtype. Accumulation is float32 (int32 for
      integer-by-integer products).

    Gradients: with respect to `x`, `scale` and `zero_point`; activation
    quantization is treated as the identity (straight-through). The integer
    weight has no gradient (JAX refuses `grad` with respect to integer input).
    """
    if isinstance(w, QuantizedWeight):
        extra = [name for name, given in (
            ("scale", scale is not None), ("zero_point", zero_point is not None),
            ("block_size", block_size != -1), ("int4_weight", int4_weight is not False))
            if given]
        if extra:
            raise TypeError(f"w: a QuantizedWeight carries its own {', '.join(extra)}; "
                            f"do not pass them as well")
        if weight_format is not None and weight_format != w.weight_format:
            raise ValueError(f"weight_format: the QuantizedWeight holds {w.weight_format!r} "
                             f"values, got weight_format={weight_format!r}")
        w, scale, zero_point, block_size, int4_weight, weight_format = (
            w.w, w.scale, w.zero_point, w.block_size, w.int4_weight, w.weight_format)
    elif scale is None:
        raise TypeError("scale: required when w is an array (or pass a QuantizedWeight as w)")
    dispatch.check_impl(impl)
    spec = check_args(x, w, scale, zero_point, block_size, int4_weight, quantize_activation,
                      weight_format, activation_format)
    if impl in partitioning.PARTITIONED_IMPLS:
        run = partitioning.partitioned(impl, spec)
    else:
        run = dispatch.resolve(impl, spec)
    leading = tuple(x.shape[:-1])
    rows = int(np.prod(leading, dtype=np.int64))
    if rows == 0:
        # No tokens: nothing for a kernel to do (and no grid to launch).
        return jnp.zeros((*leading, spec.out_features), x.dtype)

    def matmul(x, w, scale, zero_point):
        y = _with_vjp(run, spec, x.reshape(rows, spec.in_features), w, scale, zero_point)
        return y.reshape(*leading, spec.out_features)

    # Operands typed with Explicit mesh axes: run the op with those axes Auto,
    # so that the partitioner places it (one rule for both axis types).
    matmul = partitioning.with_auto_axes(matmul, spec, x, w, scale, zero_point)
    return matmul(x, w, scale, zero_point)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _with_vjp(run, spec, x, w, scale, zero_point):
    return run(x, w, scale, zero_point)


def _with_vjp_fwd(run, spec, x, w, scale, zero_point):
    return run(x, w, scale, zero_point), (x, w, scale, zero_point)


def _with_vjp_bwd(run, spec, residuals, g):
    del run
    x, w, scale, zero_point = residuals
    # The fused formula's backward, products per platform as its forward
    # (activation quantization straight-through; xla_qops.backends.xla.vjp).
    dx, dscale, dzero = xla_backend.vjp(x, w, scale, zero_point, spec, g)
    return dx, np.zeros(w.shape, jax.dtypes.float0), dscale, dzero


_with_vjp.defvjp(_with_vjp_fwd, _with_vjp_bwd)
