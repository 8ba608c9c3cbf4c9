"""The plain formula: dequantize the whole weight, then one float32 matmul.

    y = x_hat @ (scale * q - zero_point).T

with ``x_hat = x`` (A16) or ``x_hat = x_scale * x_q`` (A8: int8 or e4m3fn, see
`xla_qops.activation`), and ``value(q)`` for ``q`` in the float element formats
(API.md section 7). Slow and memory-hungry on purpose: it is the readable
statement of API.md's convention that the faster backends are checked against.
"""

import jax.numpy as jnp
from jax import lax

from xla_qops.activation import quantize_activation_as
from xla_qops.quantize import QuantizedWeight


def available() -> bool:
    return True


def supports(spec, platform) -> bool:
    del spec, platform
    return True


def matmul(x, w, scale, zero_point, spec, platform=None):
    del platform  # platform-independent
    weight = QuantizedWeight(w=w, scale=scale, zero_point=zero_point, bits=spec.bits,
                             block_size=spec.block_size, packed=spec.packed,
                             format=spec.weight_format if spec.float_weight else "int")
    w_float = weight.dequantize(jnp.float32)  # [out, in]
    x_hat = x.astype(jnp.float32)
    if spec.quantize_activation:
        x_q, x_scale = quantize_activation_as(spec.activation_format, x_hat, spec.block_size)
        group = spec.in_features // x_scale.shape[1]
        x_hat = x_q.astype(jnp.float32) * jnp.repeat(x_scale, group, axis=1)
    y = lax.dot_general(x_hat, w_float, (((1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
