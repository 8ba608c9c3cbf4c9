"""Fused pure-XLA implementation: runs on every backend XLA has.

The scale and zero point are applied to the *output* of an integer-weight
contraction instead of to the weight, so no float weight is formed for
per-channel weights:

    y = (x @ q.T) * scale - (sum_k x) * zero_point

Packed int4 is unpacked in the graph with shifts (`xla_qops.packing`); the
low nibbles (even input features) and high nibbles (odd ones) are contracted
against ``x[:, 0::2]`` and ``x[:, 1::2]`` separately, so the nibbles are never
interleaved back into a full-size int8 weight.

Blockwise weights ``[in/B, B, out]`` need one scale per block and output:

* ``M <= B`` (decode): a dot batched over blocks, ``[in/B, M, out]`` partial
  sums scaled and reduced. That intermediate is no bigger than the weight.
* ``M > B`` (prefill): the intermediate would outgrow the weight, so the
  weight is dequantized (a fusion XLA can feed into the dot) and one matmul
  is done.

With ``quantize_activation`` the products are int8 x int8 with int32
accumulation and both scales are applied to the int32 sums.
"""

import jax.numpy as jnp
from jax import lax

from xla_qops import packing
from xla_qops.activation import quantize_activation

_HIGHEST = lax.Precision.HIGHEST


def available() -> bool:
    return True


def supports(spec, platform) -> bool:
    del spec, platform
    return True


def _weight_pairs(x, w, spec):
    """Splits the contraction into (activation part, int8 weight part) pairs.

    Blockwise: x [M, nb, B'] with weight parts [nb, B', N]; per-channel:
    x [M, K'] with weight parts [N, K']. For int4, B' / K' are halved: even
    input features pair with the low nibbles, odd ones with the high nibbles.
    """
    m = x.shape[0]
    if spec.blockwise:
        x = x.reshape(m, spec.n_blocks, spec.block_size)
    if spec.bits == 8:
        return [(x, w)]
    if spec.packed:
        low, high = packing.unpack_int4_halves(w)
    else:
        # Unpacked int4 is split the same way so that both int4 forms sum in the
        # same order and give bit-identical results.
        axis = packing.input_axis(spec.blockwise)
        low, high = (lax.slice_in_dim(w, start, None, 2, axis % w.ndim) for start in (0, 1))
    return [(x[..., 0::2], low), (x[..., 1::2], high)]


def _contract(pairs, spec, acc_dtype):
    """Sum over pairs of the integer-weight contraction.

    Per-channel: [M, N]. Blockwise: [nb, M, N] (one partial sum per block).
    """
    operand_dtype = jnp.int8 if acc_dtype == jnp.int32 else jnp.float32
    total = None
    for x_part, q_part in pairs:
        a, b = x_part.astype(operand_dtype), q_part.astype(operand_dtype)
        if spec.blockwise:
            # a [M, nb, B'] . b [nb, B', N] -> [nb, M, N], batched over blocks.
            dims = (((2,), (1,)), ((1,), (0,)))
        else:
            # a [M, K'] . b [N, K'] -> [M, N].
            dims = (((1,), (1,)), ((), ()))
        part = lax.dot_general(a, b, dims, precision=_HIGHEST,
                               preferred_element_type=acc_dtype)
        total = part if total is None else total + part
    return total


def _dequantized_matmul(pairs, scale, zero_point):
    """Blockwise prefill: dequantize each weight part, then one f32 matmul."""
    total = None
    for x_part, q_part in pairs:
        w_part = q_part.astype(jnp.float32) * scale[:, None, :]
        if zero_point is not None:
            w_part = w_part - zero_point[:, None, :]
        m = x_part.shape[0]
        part = lax.dot_general(x_part.reshape(m, -1).astype(jnp.float32),
                               w_part.reshape(-1, w_part.shape[-1]),
                               (((1,), (0,)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=jnp.float32)
        total = part if total is None else total + part
    return total


def matmul(x, w, scale, zero_point, spec, platform=None):
    del platform  # platform-independent
    m = x.shape[0]
    scale = scale.astype(jnp.float32)
    zero_point = None if zero_point is None else zero_point.astype(jnp.float32)

    if spec.quantize_activation:
        x_q, x_scale = quantize_activation(x, spec.block_size)  # [M,K], [M,groups]
        acc = _contract(_weight_pairs(x_q, w, spec), spec, jnp.int32).astype(jnp.float32)
        # Activation sum per group in the quantized domain (for the zero point).
        x_sum = x_q.astype(jnp.int32).reshape(m, x_scale.shape[1], -1).sum(-1)
        x_sum = x_sum.astype(jnp.float32) * x_scale  # [M, groups]
        if spec.blockwise:
            y = jnp.einsum("bmn,mb,bn->mn", acc, x_scale, scale, precision=_HIGHEST)
        else:
            y = acc * x_scale * scale[None, :]
    else:
        x_f32 = x.astype(jnp.float32)
        x_sum = x_f32.reshape(m, spec.n_blocks, -1).sum(-1)  # [M, groups]
        pairs = _weight_pairs(x_f32, w, spec)
        if spec.blockwise and m > spec.block_size:
            return _dequantized_matmul(pairs, scale, zero_point).astype(x.dtype)
        acc = _contract(pairs, spec, jnp.float32)
        if spec.blockwise:
            y = jnp.einsum("bmn,bn->mn", acc, scale, precision=_HIGHEST)
        else:
            y = acc * scale[None, :]

    if zero_point is not None:
        zp = zero_point if spec.blockwise else zero_point[None, :]  # [groups, N]
        y = y - lax.dot_general(x_sum, zp, (((1,), (0,)), ((), ())), precision=_HIGHEST)
    return y.astype(x.dtype)
