"""Round-to-nearest onto the float element grids of API.md section 7 (host numpy).

Every format is symmetric (no zero point); values are rounded to nearest even
and saturate at the format's largest finite value. Layouts are section 2's:
per-channel ``q [out, in]``, ``scale [out]``; blockwise ``q [in/B, B, out]``,
``scale [in/B, out]``. Each step is one float32 IEEE operation on the host
(``w / scale`` a true division), as for the integer grid (`grid`).

* ``fp8``: ``scale = amax / 448`` per channel or block; an all-zero group
  gets scale 1. ``q`` is float8_e4m3fn.
* ``mxfp4`` (OCP MX): ``scale = 2 ** (floor(log2(amax)) - 2)`` per block
  (2 = e2m1's largest exponent), a power of two, so ``q = e2m1(w / scale)``
  saturates the top of the block's binade at 6; an all-zero block gets 1.
* ``nvfp4`` (NVIDIA, B = 16): one float32 factor for the tensor,
  ``global = amax_tensor / (448 * 6)``, and per block an e4m3-representable
  ``s_b = e4m3(amax_b / 6 / global)``; the stored scale is the product
  ``float32(s_b * global)``, rounded once. A block whose ``s_b`` rounds to 0
  gets scale 0 and codes 0 (it dequantizes to zeros, as its values are below
  the format's reach).

``q`` for fp4 is returned as e2m1 codes (uint8, one per element), unpacked.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from pallas_kernels.formats import FP4_MAX, FP8_MAX, fp4_codes

FLOAT_FORMATS = ("fp8", "mxfp4", "nvfp4")
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32


def _groups(w: np.ndarray, block_size: int) -> np.ndarray:
    """float32 [out, in] -> [groups..., members]: [out, in] per-channel, [in/B, out, B] blockwise."""
    if block_size == -1:
        return w
    out_features, in_features = w.shape
    return w.T.reshape(in_features // block_size, block_size, out_features).transpose(0, 2, 1)


def _ungroup(q: np.ndarray, block_size: int) -> np.ndarray:
    """Inverse layout of `_groups`, to section 2's stored layout."""
    return q if block_size == -1 else q.transpose(0, 2, 1)


def _e4m3(values: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at 448."""
    return np.clip(values, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def quantize(w: np.ndarray, fmt: str, block_size: int):
    """(q, scale float32) of a float32 ``[out, in]`` onto `fmt`'s grid.

    q: float8_e4m3fn (fp8) or uint8 e2m1 codes (mxfp4, nvfp4), unpacked, in
    the stored layout.
    """
    w = np.asarray(w, np.float32)
    groups = _groups(w, block_size)
    amax = np.max(np.abs(groups), axis=-1)
    if fmt == "fp8":
        scale = np.where(amax == 0, np.float32(1), amax / np.float32(FP8_MAX)).astype(np.float32)
        q = _e4m3(groups / scale[..., None])
    elif fmt == "mxfp4":
        safe = np.where(amax == 0, np.float32(1), amax)
        scale = np.where(amax == 0, np.float32(1),
                         np.exp2(np.floor(np.log2(safe)) - 2)).astype(np.float32)
        q = fp4_codes(groups / scale[..., None])
    elif fmt == "nvfp4":
        tensor_amax = np.float32(np.max(np.abs(w))) if w.size else np.float32(0)
        global_scale = (np.float32(1) if tensor_amax == 0
                        else np.float32(tensor_amax / np.float32(FP8_MAX * FP4_MAX)))
        block_scale = _e4m3(amax / np.float32(FP4_MAX) / global_scale).astype(np.float32)
        scale = (block_scale * global_scale).astype(np.float32)
        safe = np.where(scale == 0, np.float32(1), scale)
        q = np.where(scale[..., None] == 0, np.uint8(0), fp4_codes(groups / safe[..., None]))
    else:
        raise ValueError(f"format: expected one of {', '.join(map(repr, FLOAT_FORMATS))}, "
                         f"got {fmt!r}")
    return _ungroup(q, block_size), scale
