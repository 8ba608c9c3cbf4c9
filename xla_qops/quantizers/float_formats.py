"""The float element grids of API.md section 7 (host numpy): one place for each
format's scale rule, rounding and storage, which every method uses.

Every format is symmetric (no zero point); values are rounded to nearest even
and saturate at the format's largest finite value. Groups are `grid`'s
``[G, out, B]``. Each step is one float32 IEEE operation on the host
(``w / scale`` a true division), as for the integer grid (`grid`).

* ``fp8``: ``scale = amax / 448`` per channel or block; an all-zero group
  gets scale 1. Values are e4m3fn's.
* ``mxfp4`` (OCP MX): ``scale = 2 ** (floor(log2(amax)) - 2)`` per block
  (2 = e2m1's largest exponent), a power of two, so ``q = e2m1(w / scale)``
  saturates the top of the block's binade at 6; an all-zero block gets 1.
* ``nvfp4`` (NVIDIA, B = 16): one float32 factor for the tensor and per
  block an e4m3-representable ``s_b``, the stored scale their combination
  rounded once. Two forms of the tensor factor exist in the field:

  - multiplier (ModelOpt's ``weight_scale_2``; `quantize_weight`'s, API.md):
    ``G = amax_tensor / (448 * 6)``, ``s_b = e4m3(amax_b / 6 / G)``,
    ``scale = float32(s_b * G)``;
  - divisor (compressed-tensors' ``weight_global_scale``, llm-compressor's
    rule): ``g = 448 * 6 / amax_tensor`` (as torch evaluates it there:
    ``float32(float32(1 / amax) * 2688)``), ``s_b = e4m3(amax_b / 6 * g)``,
    ``scale = float32(s_b / g)``: the form whose checkpoint reproduces the
    scale exactly (``xla-qops quantize --format compressed-tensors``).

  A block whose ``s_b`` rounds to 0 gets scale 0 and values 0 (its values are
  below the format's reach).

`FloatGrid` is the grid object the methods (`grid.IntGrid`'s float sibling)
take: RTN, GPTQ's column rounding and AWQ's clip and scale searches all round
through `round_values`, so every stored value is a representable code.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from pallas_kernels.formats import FP4_MAX, FP8_MAX, fp4_codes
from xla_qops.quantizers import grid
from xla_qops.schemes import FLOAT_FORMATS, FORMAT_BLOCKS

NVFP4_BLOCK = FORMAT_BLOCKS["nvfp4"]
MXFP4_BLOCK = FORMAT_BLOCKS["mxfp4"]
_F32 = np.float32
_ELEMENT = {"fp8": (ml_dtypes.float8_e4m3fn, FP8_MAX), "mxfp4": (ml_dtypes.float4_e2m1fn, FP4_MAX),
            "nvfp4": (ml_dtypes.float4_e2m1fn, FP4_MAX)}


def element_format(fmt: str) -> str:
    """`quantized_matmul`'s weight_format of a quantizer format: "fp8" or "fp4"."""
    return "fp8" if fmt == "fp8" else "fp4"


def round_values(scaled: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values of `fmt`'s elements nearest `scaled` (float32 or float64, converted
    directly: no double rounding), ties to even, saturating at +-448 (e4m3) / +-6 (e2m1)."""
    dtype, top = _ELEMENT[fmt]
    return np.clip(scaled, -top, top).astype(dtype).astype(_F32)


def _e4m3(values: np.ndarray) -> np.ndarray:
    """float32 -> the nearest e4m3fn value as float32 (RNE, saturating at 448)."""
    return round_values(values, "fp8")


class FloatGrid:
    """The grid of a float format for one weight: ``w ~= scale * value``.

    `nvfp4_divisor` picks NVFP4's tensor-factor form (module docstring); the
    factor comes from the whole weight's largest magnitude `tensor_amax` and
    stays fixed while a method tries clipped block ranges.
    """

    symmetric = True
    q_dtype = _F32  # methods hold values as float32; `to_storage` makes the codes

    def __init__(self, fmt: str, tensor_amax=0.0, nvfp4_divisor: bool = False):
        if fmt not in FLOAT_FORMATS:
            raise ValueError(f"format: expected one of {', '.join(map(repr, FLOAT_FORMATS))}, "
                             f"got {fmt!r}")
        self.fmt, self.nvfp4_divisor = fmt, nvfp4_divisor
        amax = _F32(tensor_amax)
        if fmt != "nvfp4":
            self.factor = None
        elif nvfp4_divisor:
            # compressed-tensors' generate_gparam: `448 * 6 / amax` with a tensor amax, which
            # torch evaluates as reciprocal(amax) * 2688, two float32 roundings.
            self.factor = (_F32(1) if amax == 0
                           else _F32(_F32(_F32(1) / amax) * _F32(FP8_MAX * FP4_MAX)))
        else:
            self.factor = _F32(1) if amax == 0 else _F32(amax / _F32(FP8_MAX * FP4_MAX))

    @classmethod
    def of(cls, w: np.ndarray, fmt: str, nvfp4_divisor: bool = False) -> "FloatGrid":
        """The grid of float32 weight `w` (its tensor factor from ``max |w|``)."""
        return cls(fmt, np.max(np.abs(w)) if w.size else 0.0, nvfp4_divisor)

    def params(self, lo: np.ndarray, hi: np.ndarray):
        """(scale float32, None) of groups whose values lie in [lo, hi] (float32)."""
        amax = np.maximum(np.abs(lo), np.abs(hi)).astype(_F32, copy=False)
        zero = amax == 0
        if self.fmt == "fp8":
            return np.where(zero, _F32(1), amax / _F32(FP8_MAX)).astype(_F32), None
        if self.fmt == "mxfp4":
            safe = np.where(zero, _F32(1), amax)
            return np.where(zero, _F32(1), np.exp2(np.floor(np.log2(safe)) - 2)).astype(_F32), None
        local = (amax / _F32(FP4_MAX)).astype(_F32)
        if self.nvfp4_divisor:
            return (_e4m3(local * self.factor) / self.factor).astype(_F32), None
        return (_e4m3(local / self.factor) * self.factor).astype(_F32), None

    def round_scaled(self, scaled: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Values of `scaled` (already ``w / scale``); 0 where the scale is 0."""
        return np.where(scale == 0, _F32(0), round_values(scaled, self.fmt))

    def round(self, grouped: np.ndarray, scale: np.ndarray, zero_point=None) -> np.ndarray:
        """float32 values ``[G, out, B]`` of float32 groups on the grid `scale` ``[G, out]``."""
        safe = np.where(scale == 0, _F32(1), scale)[..., None]
        return self.round_scaled(grouped / safe, scale[..., None])

    def round_column(self, col: np.ndarray, scale: np.ndarray, zero_point=None) -> np.ndarray:
        """GPTQ's rounding of one float64 column on its (float64) group scales."""
        safe = np.where(scale == 0, 1.0, scale)
        return self.round_scaled(col / safe, scale).astype(np.float64)

    @staticmethod
    def dequantize(q: np.ndarray, scale: np.ndarray, zero_point=None, dtype=_F32) -> np.ndarray:
        return q.astype(dtype) * scale[..., None].astype(dtype)

    def rtn(self, grouped: np.ndarray):
        """Round to nearest: (values, scale, None) of float32 groups ``[G, out, B]``."""
        scale, _ = self.params(grouped.min(axis=-1), grouped.max(axis=-1))
        return self.round(grouped, scale), scale, None


def to_storage(values: np.ndarray, fmt: str) -> np.ndarray:
    """Grid values (float32, any layout) -> float8_e4m3fn (fp8) or e2m1 codes uint8 (fp4,
    one per element, unpacked); exact, as the values are the format's."""
    if fmt == "fp8":
        return values.astype(ml_dtypes.float8_e4m3fn)
    return fp4_codes(values)


def quantize(w: np.ndarray, fmt: str, block_size: int, nvfp4_divisor: bool = False):
    """Round to nearest: (q, scale float32) of a float32 ``[out, in]`` onto `fmt`'s grid.

    q: float8_e4m3fn (fp8) or uint8 e2m1 codes (mxfp4, nvfp4), unpacked, in
    the stored layout.
    """
    w = np.asarray(w, _F32)
    values, scale, _ = FloatGrid.of(w, fmt, nvfp4_divisor).rtn(grid.to_groups(w, block_size))
    q, scale, _ = grid.to_layout(values, scale, None, block_size)
    return to_storage(q, fmt), scale
