"""On-the-fly symmetric int8 activation quantization (W8A8, W4A8).

One scale per token (row of x), or per token and input block of B features
when the weight is blockwise:

    absmax    = max |x| over the group                    (float32)
    inv_scale = 127 / absmax   (0 where absmax == 0)      (float32, one IEEE division)
    x_q       = clip(round_half_even(x * inv_scale), -127, 127)
    x_scale   = absmax / 127                              (float32)

so that ``x ~= x_scale * x_q``. The integers are defined by one division per
group and one multiply per element, in float32: no compiler rewrites those
(XLA does turn ``x / broadcast(s)`` into ``x * broadcast(1 / s)``, which is
why the definition is not ``round(x / x_scale)``), so every backend and the
float64 test reference, which mirrors these steps, get the same integers.
``x_scale`` only scales the int32 sums, so a last-bit difference in it stays
within the float32 accumulation tolerance.
"""

import jax.numpy as jnp


def quantize_activation(x, block_size: int, absmax=None):
    """Quantizes `x` [M, K] to int8.

    `absmax` [M, n_groups], if given, replaces the group maxima of |x|: a
    row-parallel layer (`xla_qops.sharding`) passes the maximum over all
    shards so that every shard quantizes with the token's global scale.

    Returns:
      (x_q int8 [M, K], x_scale float32 [M, n_groups]) where n_groups is 1
      per-channel and K / block_size blockwise.
    """
    x = x.astype(jnp.float32)
    m, k = x.shape
    group = k if block_size == -1 else block_size
    grouped = x.reshape(m, k // group, group)
    if absmax is None:
        absmax = jnp.max(jnp.abs(grouped), axis=-1)
    inv_scale = jnp.where(absmax == 0, 0.0, 127.0 / jnp.where(absmax == 0, 1.0, absmax))
    x_q = jnp.clip(jnp.round(grouped * inv_scale[..., None]), -127, 127).astype(jnp.int8)
    x_scale = absmax / 127.0
    return x_q.reshape(m, k), x_scale
