"""int4 nibble packing along the input-feature axis (API.md section 2).

Two's-complement nibbles, two weights per byte, the even index in the low
nibble: ``byte = (q[2i] & 0xF) | ((q[2i+1] & 0xF) << 4)``. The input-feature
axis is the last axis of a per-channel weight ``[out, in]`` and axis 1 of a
blockwise weight ``[in/B, B, out]``.

Everything here is traceable: unpacking happens inside the XLA graph with
shifts, never on the host.
"""

import jax.numpy as jnp
from jax import lax


def input_axis(blockwise: bool) -> int:
    """The axis of the stored weight that runs along input features."""
    return 1 if blockwise else -1


def pack_int4(q, axis: int):
    """Packs int4 values in an int8 container into uint8 pairs along `axis`."""
    q = jnp.asarray(q)
    axis = axis % q.ndim
    even = lax.slice_in_dim(q, 0, None, 2, axis).astype(jnp.uint8)
    # Start at min(1, size): an empty axis (in = 0) packs to an empty one.
    odd = lax.slice_in_dim(q, min(1, q.shape[axis]), None, 2, axis).astype(jnp.uint8)
    return (even & 0xF) | ((odd & 0xF) << 4)


def unpack_int4_halves(packed):
    """Returns (low, high) nibbles of a uint8 array as sign-extended int8.

    `low` holds the even input features, `high` the odd ones. Kernels that can
    contract each half against the matching half of the activation avoid the
    interleave entirely.
    """
    as_int8 = lax.bitcast_convert_type(jnp.asarray(packed), jnp.int8)
    low = lax.shift_right_arithmetic(lax.shift_left(as_int8, jnp.int8(4)), jnp.int8(4))
    high = lax.shift_right_arithmetic(as_int8, jnp.int8(4))
    return low, high


def unpack_int4(packed, axis: int):
    """Inverse of `pack_int4`: uint8 pairs along `axis` -> int8 in [-8, 7]."""
    packed = jnp.asarray(packed)
    axis = axis % packed.ndim
    low, high = unpack_int4_halves(packed)
    both = jnp.stack([low, high], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 2
    return both.reshape(shape)
