"""On-the-fly symmetric int8 activation quantization (W8A8, W4A8).

Shared by every backend of `xla_qops` and by the Pallas kernels' prologue
(`pallas_kernels.operands`), so it lives here, below both; `xla_qops.activation`
re-exports it.

One scale per token (row of x), or per token and input block of B features
when the weight is blockwise:

    absmax    = max |x| over the group                    (float32)
    inv_scale = 127 / absmax   (0 where absmax == 0)      (float32, one IEEE division)
    x_q       = clip(round_half_even(x * inv_scale), -127, 127)
    x_scale   = absmax / 127                              (float32, one IEEE division)

so that ``x ~= x_scale * x_q``. The integers are defined by one division per
group and one multiply per element, so no compiler rewrite applies to them:
XLA turns ``x / broadcast(s)`` into ``x * broadcast(1 / s)`` (one ulp off,
enough to move a .5 tie), which is why the definition is not
``round(x / x_scale)``. ``x_scale`` is a division by the constant 127, which
XLA would likewise turn into a multiplication by an inexact 1/127; the
divisor is passed through `lax.optimization_barrier`, which the algebraic
simplifier cannot see through, so every backend, the host-CPU C++ kernels and
the float64 test reference (which mirrors these steps) get the same bits on
every JAX version (tests/test_numerics.py pins them). Division is correctly
rounded on the CPU and on NVIDIA GPUs; on a TPU it has not been checked.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

QMAX = 127


def divide_exactly(numerator, denominator):
    """``numerator / denominator`` as one IEEE division, whatever XLA rewrites.

    A division by a constant or a broadcast is rewritten by XLA's algebraic
    simplifier into a multiplication by the reciprocal; hiding the divisor
    behind an optimization barrier keeps the division.
    """
    denominator = jnp.broadcast_to(jnp.asarray(denominator, jnp.result_type(numerator)),
                                   jnp.shape(numerator))
    return numerator / lax.optimization_barrier(denominator)


def quantize_groups(x, block_size: int, absmax, top: float):
    """The shared first steps of per-token (and per-block) activation quantization.

    Returns (absmax [M, groups], ``x * (top / absmax)`` as float32
    [M, groups, B'], 0 for all-zero groups): one IEEE division per group, one
    multiply per element.
    """
    x = x.astype(jnp.float32)
    m, k = x.shape
    group = k if block_size == -1 else block_size
    grouped = x.reshape(m, k // group, group)
    if absmax is None:
        absmax = jnp.max(jnp.abs(grouped), axis=-1)
    nonzero = jnp.where(absmax == 0, 1.0, absmax)
    inv_scale = jnp.where(absmax == 0, 0.0, top / nonzero)
    return absmax, grouped * inv_scale[..., None]


def quantize_activation(x, block_size: int, absmax=None):
    """Quantizes `x` [M, K] to int8.

    `absmax` [M, n_groups], if given, replaces the group maxima of |x|: a
    row-parallel layer (`xla_qops.sharding`) passes the maximum over all
    shards so that every shard quantizes with the token's global scale.

    Returns:
      (x_q int8 [M, K], x_scale float32 [M, n_groups]) where n_groups is 1
      per-channel and K / block_size blockwise.
    """
    absmax, scaled = quantize_groups(x, block_size, absmax, QMAX)
    x_q = jnp.clip(jnp.round(scaled), -QMAX, QMAX).astype(jnp.int8)
    x_scale = divide_exactly(absmax, float(QMAX))
    return x_q.reshape(x.shape), x_scale
