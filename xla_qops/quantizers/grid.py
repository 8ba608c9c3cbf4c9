"""The quantization grid every method shares: groups, scales, rounding.

Convention (API.md section 1): ``w = scale * q - zero_point``, so
``q = clip(round_half_even((w + zero_point) / scale), qmin, qmax)``.

A weight ``[out, in]`` is viewed as groups ``[G, out, B]``: blockwise G = in/B
blocks of B input features; per-channel G = 1, B = in. Scales and zero points
are ``[G, out]``. `to_layout` turns ``q [G, out, B]`` and ``scale [G, out]``
into API.md's layouts (per-channel q ``[out, in]``, scale ``[out]``; blockwise
q ``[in/B, B, out]``, scale ``[in/B, out]``).

Every step of `minmax_params` and `round_to_grid` is one float32 IEEE
operation, rounded once (numpy on the host: see xla_qops/quantize.py for why
not XLA), so round-to-nearest's scales and integers are the same bits
everywhere; the methods call the same two functions with their own ranges.
"""

from __future__ import annotations

import numpy as np

QRANGE = {8: (-128, 127), 4: (-8, 7)}
_F32 = np.float32


SMALL_LAYER = 1 << 21  # elements of a layer processed in one piece (float64: 16 MiB)


def rows_per_chunk(out_features: int, in_features: int) -> int:
    """Output rows the methods process at a time: a small layer (`SMALL_LAYER` elements,
    whose temporaries are a few tens of MiB at most) whole, since each chunk repeats
    GPTQ's per-column Python loop; a larger one at most an eighth of the layer and 4M
    elements at a time, so that the float64 temporaries (up to ~10 per element) stay
    within a few float32 copies of the layer (tests/test_quantizers.py measures it)."""
    if out_features * in_features <= SMALL_LAYER:
        return max(1, out_features)
    return max(1, min(out_features // 8, (1 << 22) // max(in_features, 1)))


def in_row_chunks(grouped: np.ndarray, quantize_chunk):
    """(q, scale, zero_point) of groups ``[G, out, B]``, `quantize_chunk` (C-ordered groups
    ``[G, rows, B]`` -> (q, scale, zero_point or None)) run on `rows_per_chunk` output
    rows at a time and the results joined along ``out``."""
    groups, out_features, block = grouped.shape
    rows = rows_per_chunk(out_features, groups * block)
    return join_row_chunks([quantize_chunk(np.ascontiguousarray(grouped[:, r:r + rows]))
                            for r in range(0, out_features, rows)])


def join_row_chunks(parts: list):
    """(q, scale, zero_point or None) of consecutive output-row chunks' results,
    joined along ``out`` (axis 1 of the groups form)."""
    q = np.concatenate([p[0] for p in parts], axis=1)
    scale = np.concatenate([p[1] for p in parts], axis=1)
    zero_point = None if parts[0][2] is None else np.concatenate([p[2] for p in parts], axis=1)
    return q, scale, zero_point


class BestGrid:
    """The best grid seen so far per group and output channel, as the methods try
    candidate grids in turn: lower error wins, a tie keeps the earlier one.

    Attributes: `error` ``[G, out]``, and `q` ``[G, out, B]``, `scale`,
    `zero_point` (``[G, out]``; None for symmetric grids) of the winners.
    """

    def __init__(self, error: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point):
        self.error, self.q, self.scale, self.zero_point = error, q, scale, zero_point

    def offer(self, error: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point) -> None:
        """Keeps, per group and channel, the candidate's grid where its error is lower."""
        better = error < self.error
        self.error = np.where(better, error, self.error)
        self.q = np.where(better[..., None], q, self.q)
        self.scale = np.where(better, scale, self.scale)
        if zero_point is not None:
            self.zero_point = np.where(better, zero_point, self.zero_point)

    def result(self):
        """(q, scale, zero_point) of the winners."""
        return self.q, self.scale, self.zero_point


def to_groups(w: np.ndarray, block_size: int) -> np.ndarray:
    """``[out, in]`` -> ``[G, out, B]`` (a view where numpy can make one)."""
    out_features, in_features = w.shape
    if block_size == -1:
        return w[None]
    return w.reshape(out_features, in_features // block_size, block_size).transpose(1, 0, 2)


def from_groups(grouped: np.ndarray) -> np.ndarray:
    """``[G, out, B]`` -> ``[out, in]``."""
    groups, out_features, block = grouped.shape
    return grouped.transpose(1, 0, 2).reshape(out_features, groups * block)


def minmax_params(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool):
    """(scale, zero_point or None), float32, for groups whose values lie in [lo, hi].

    symmetric: ``scale = absmax / qmax``; asymmetric: [lo, hi] onto [qmin, qmax],
    ``zero_point = scale * qmin - lo``. An all-zero group gets scale 1 (and
    zero point 0); a constant non-zero group in asymmetric mode ``|c| / qmax``.
    """
    qmin, qmax = QRANGE[bits]
    lo, hi = lo.astype(_F32, copy=False), hi.astype(_F32, copy=False)
    absmax = np.maximum(np.abs(lo), np.abs(hi))
    all_zero = absmax == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            return np.where(all_zero, _F32(1), absmax / _F32(qmax)).astype(_F32), None
        spread = hi - lo
        scale = np.where(spread > 0, spread / _F32(qmax - qmin),
                         np.where(all_zero, _F32(1), absmax / _F32(qmax))).astype(_F32)
        zero_point = np.where(all_zero, _F32(0), scale * _F32(qmin) - lo).astype(_F32)
    return scale, zero_point


def round_to_grid(grouped: np.ndarray, scale: np.ndarray, zero_point, bits: int,
                  offsets: np.ndarray | None = None) -> np.ndarray:
    """int8 ``q [G, out, B]`` of float32 groups on the grid ``(scale, zero_point)``;
    `offsets` ``[G, out, B]`` (learned rounding, autoround) are added before rounding."""
    qmin, qmax = QRANGE[bits]
    with np.errstate(divide="ignore", invalid="ignore"):
        if zero_point is None:
            q = grouped / scale[..., None]
        else:
            q = (grouped + zero_point[..., None]) / scale[..., None]
    if offsets is not None:
        q = q + offsets
    return np.clip(np.rint(q), qmin, qmax).astype(np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point, dtype=np.float32) -> np.ndarray:
    """``scale * q - zero_point`` on groups ``[G, out, B]``."""
    w = q.astype(dtype) * scale[..., None].astype(dtype)
    if zero_point is not None:
        w -= zero_point[..., None].astype(dtype)
    return w


def to_layout(q: np.ndarray, scale: np.ndarray, zero_point, block_size: int):
    """``q [G, out, B]``, ``[G, out]`` params -> API.md's layouts (C order)."""
    if block_size == -1:
        return q[0], scale[0], None if zero_point is None else zero_point[0]
    return np.ascontiguousarray(q.transpose(0, 2, 1)), scale, zero_point


def group_params(grouped: np.ndarray, bits: int, symmetric: bool):
    """Round-to-nearest's (scale, zero_point or None) of float32 groups ``[G, out, B]``."""
    return minmax_params(grouped.min(axis=-1), grouped.max(axis=-1), bits, symmetric)


def round_to_nearest_groups(grouped: np.ndarray, bits: int, symmetric: bool):
    """Round-to-nearest of float32 groups ``[G, out, B]``: (q, scale, zero_point)."""
    scale, zero_point = group_params(grouped, bits, symmetric)
    return round_to_grid(grouped, scale, zero_point, bits), scale, zero_point


def round_to_nearest(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """Round-to-nearest of a float32 ``[out, in]``: (q, scale, zero_point), groups form."""
    return round_to_nearest_groups(to_groups(w, block_size), bits, symmetric)


class IntGrid:
    """The integer grid of `bits` as an object, the interface the methods round through
    (`float_formats.FloatGrid` is the float formats' one): ``params(lo, hi)``,
    ``round(groups, scale, zero_point)``, ``round_column`` (GPTQ's float64 column),
    ``dequantize`` and ``rtn``; the functions above, unchanged."""

    q_dtype = np.int8

    def __init__(self, bits: int, symmetric: bool):
        self.bits, self.symmetric = bits, symmetric

    def params(self, lo: np.ndarray, hi: np.ndarray):
        return minmax_params(lo, hi, self.bits, self.symmetric)

    def round(self, grouped: np.ndarray, scale: np.ndarray, zero_point) -> np.ndarray:
        return round_to_grid(grouped, scale, zero_point, self.bits)

    def round_column(self, col: np.ndarray, scale: np.ndarray, zero_point) -> np.ndarray:
        qmin, qmax = QRANGE[self.bits]
        shifted = col if zero_point is None else col + zero_point
        return np.clip(np.rint(shifted / scale), qmin, qmax)

    dequantize = staticmethod(dequantize)

    def rtn(self, grouped: np.ndarray):
        return round_to_nearest_groups(grouped, self.bits, self.symmetric)
