"""On-the-fly symmetric int8 activation quantization (W8A8, W4A8).

One scale per token (row of x), or per token and input block of B features
when the weight is blockwise:

    absmax  = max |x| over the group          (float32)
    x_scale = absmax / 127                    (float32)
    x_q     = clip(round(x / x_scale), -127, 127)   (0 where absmax == 0)

so that ``x ~= x_scale * x_q``. All arithmetic is float32 so every backend
(and the float64 test reference, which mirrors these steps in float32) gets
the same integers.
"""

import jax.numpy as jnp


def quantize_activation(x, block_size: int):
    """Quantizes `x` [M, K] to int8.

    Returns:
      (x_q int8 [M, K], x_scale float32 [M, n_groups]) where n_groups is 1
      per-channel and K / block_size blockwise.
    """
    x = x.astype(jnp.float32)
    m, k = x.shape
    group = k if block_size == -1 else block_size
    grouped = x.reshape(m, k // group, group)
    absmax = jnp.max(jnp.abs(grouped), axis=-1)
    x_scale = absmax / 127.0
    safe = jnp.where(absmax == 0, 1.0, x_scale)
    x_q = jnp.clip(jnp.round(grouped / safe[..., None]), -127, 127).astype(jnp.int8)
    return x_q.reshape(m, k), x_scale
