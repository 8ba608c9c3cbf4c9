"""Round-to-nearest weight quantization and the `QuantizedWeight` container.

Convention (API.md section 1): ``w_float = scale * q - zero_point``.

* symmetric: ``scale = absmax / qmax`` per channel or block, no zero point.
* asymmetric: the group's [min, max] is mapped onto [qmin, qmax]:
  ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = scale * qmin - min``,
  so ``min`` dequantizes to itself and ``max`` to itself up to rounding.

Degenerate groups keep a finite scale: an all-zero group gets ``scale = 1``
(``q = 0``, ``zero_point = 0``, so it dequantizes to exact zeros), and a constant
non-zero group in asymmetric mode gets ``scale = |c| / qmax``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from xla_qops import packing

_QRANGE = {8: (-128, 127), 4: (-8, 7)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized linear weight in API.md's layouts.

    Array leaves: `w`, `scale`, `zero_point` (None when symmetric).
    Static fields: `bits` (8 or 4), `block_size` (-1 per-channel), `packed`
    (int4 stored as uint8 pairs).

    Layouts (`in` input features, `out` output features, B the block size):
      per-channel: w [out, in] (packed int4: [out, in/2]), scale/zero_point [out]
      blockwise:   w [in/B, B, out] (packed: [in/B, B/2, out]),
                   scale/zero_point [in/B, out]
    """

    w: jax.Array
    scale: jax.Array
    zero_point: Optional[jax.Array]
    bits: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    packed: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def int4_weight(self) -> bool:
        return self.bits == 4

    @property
    def blockwise(self) -> bool:
        return self.block_size != -1

    @property
    def out_features(self) -> int:
        return self.w.shape[-1] if self.blockwise else self.w.shape[0]

    @property
    def in_features(self) -> int:
        axis = packing.input_axis(self.blockwise)
        stored = self.w.shape[0] * self.w.shape[1] if self.blockwise else self.w.shape[axis]
        return stored * 2 if self.packed else stored

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays held (weight, scale and zero point)."""
        arrays = [self.w, self.scale] + ([self.zero_point] if self.zero_point is not None else [])
        return int(sum(a.size * np.dtype(a.dtype).itemsize for a in arrays))

    def int_values(self) -> jax.Array:
        """The integer weight unpacked into int8, in the stored layout."""
        if self.packed:
            return packing.unpack_int4(self.w, packing.input_axis(self.blockwise))
        return self.w

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight ``scale * q - zero_point`` as ``[out, in]``."""
        q = self.int_values().astype(jnp.float32)
        scale = self.scale.astype(jnp.float32)
        zero = (0.0 if self.zero_point is None else self.zero_point.astype(jnp.float32))
        if self.blockwise:
            w = q * scale[:, None, :]
            if self.zero_point is not None:
                w = w - zero[:, None, :]
            w = w.reshape(-1, w.shape[-1]).T  # [in, out] -> [out, in]
        else:
            w = q * scale[:, None] - (zero[:, None] if self.zero_point is not None else 0.0)
        return w.astype(dtype)

    def pack(self) -> "QuantizedWeight":
        """The same weight with int4 values packed two per byte."""
        if self.packed or self.bits != 4:
            return self
        return dataclasses.replace(
            self, w=packing.pack_int4(self.w, packing.input_axis(self.blockwise)),
            packed=True)

    def unpack(self) -> "QuantizedWeight":
        """The same weight with int4 values in an int8 container (torch_xla's form)."""
        if not self.packed:
            return self
        return dataclasses.replace(self, w=self.int_values(), packed=False)


def _check_weight(w, bits, block_size):
    if bits not in _QRANGE:
        raise ValueError(f"bits: expected 8 or 4, got {bits}")
    if not hasattr(w, "ndim") or w.ndim != 2:
        shape = getattr(w, "shape", None)
        raise ValueError(f"w: expected a float weight [out, in] (nn.Linear "
                         f"orientation), got shape {shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w: expected a floating dtype, got {np.dtype(w.dtype).name}")
    in_features = w.shape[1]
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if block_size != -1 and (block_size <= 0 or in_features % block_size):
        raise ValueError(f"block_size: expected -1 or a positive divisor of "
                         f"in={in_features}, got {block_size}")
    if not isinstance(w, jax.core.Tracer):
        # Only concrete weights can be inspected; under jit the check is skipped.
        if not bool(jnp.all(jnp.isfinite(w))):
            n_bad = int(jnp.sum(~jnp.isfinite(w)))
            raise ValueError(f"w: expected finite values, found {n_bad} NaN/inf entries")


def quantize_weight(w, *, bits: int = 8, block_size: int = -1, symmetric: bool = True,
                    pack: bool = True) -> QuantizedWeight:
    """Quantizes a float `[out, in]` weight with round-to-nearest.

    Args:
      w: float weight in torch `nn.Linear` orientation `[out, in]`.
      bits: 8 or 4.
      block_size: -1 for one scale per output channel, or B (dividing `in`)
        for one scale per output channel and block of B input features.
      symmetric: absmax scaling without zero point; otherwise min/max with a
        float zero point (``w = scale * q - zero_point``).
      pack: for bits=4, store two values per byte (uint8). Ignored for bits=8.

    Returns:
      A `QuantizedWeight`; scales and zero points are float32.
    """
    _check_weight(w, bits, block_size)
    w = jnp.asarray(w, jnp.float32)
    out_features, in_features = w.shape
    qmin, qmax = _QRANGE[bits]
    # Group axis last: per-channel [out, in] -> groups over `in`;
    # blockwise -> [in/B, out, B].
    if block_size == -1:
        grouped = w
    else:
        grouped = w.reshape(out_features, in_features // block_size, block_size)
        grouped = grouped.transpose(1, 0, 2)
    lo = jnp.min(grouped, axis=-1)
    hi = jnp.max(grouped, axis=-1)
    absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    all_zero = absmax == 0
    if symmetric:
        scale = jnp.where(all_zero, 1.0, absmax / qmax)
        zero_point = None
        q = jnp.round(grouped / scale[..., None])
    else:
        spread = hi - lo
        scale = jnp.where(spread > 0, spread / (qmax - qmin),
                          jnp.where(all_zero, 1.0, absmax / qmax))
        zero_point = jnp.where(all_zero, 0.0, scale * qmin - lo)
        q = jnp.round((grouped + zero_point[..., None]) / scale[..., None])
    q = jnp.clip(q, qmin, qmax).astype(jnp.int8)
    if block_size != -1:
        q = q.transpose(0, 2, 1)  # [in/B, out, B] -> [in/B, B, out]
    result = QuantizedWeight(w=q, scale=scale, zero_point=zero_point, bits=bits,
                             block_size=int(block_size), packed=False)
    return result.pack() if (pack and bits == 4) else result
