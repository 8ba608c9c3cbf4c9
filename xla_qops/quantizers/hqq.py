"""HQQ: half-quadratic optimisation of the grid, no calibration data.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning
Models" (2023). The objective is a sparsity-promoting l_p norm (p < 1) of
the weight error, ``sum |w - (s q - z)|^p`` per group, which lets a few
outliers keep a large error so that the bulk is represented well. It is
minimised by alternating (half-quadratic splitting) between

* an auxiliary error ``e = shrink_p(w - w_hat, beta)`` (the generalised
  soft-threshold: the part of the error the l_p norm lets through), and
* the grid parameter that best explains ``w - e`` in least squares, q fixed:
  the zero point ``z = mean(s q - (w - e))`` (asymmetric), or the scale
  ``s = <q, w - e> / <q, q>`` (symmetric, which has no zero point),

then re-rounding q on the new grid, with ``beta`` growing by ``kappa`` each
step. Each group keeps the best grid seen by the objective, round-to-
nearest's included, so HQQ is never worse than RTN on it
(tests/test_quantizers.py). Costs ~`iterations` RTN passes over the weight.
"""

from __future__ import annotations

import numpy as np

from xla_qops.quantizers import grid

P_NORM = 0.7
ITERATIONS = 20
BETA, KAPPA = 10.0, 1.01


def objective(grouped: np.ndarray, q, scale, zero_point) -> np.ndarray:
    """``sum |w - w_hat|^p`` per group ``[G, out]`` (float64)."""
    err = grouped.astype(np.float64, copy=False) - grid.dequantize(q, scale, zero_point, np.float64)
    return (np.abs(err) ** P_NORM).sum(axis=-1)


def _shrink(x: np.ndarray, beta: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.sign(x) * np.maximum(np.abs(x) - np.abs(x) ** (P_NORM - 1) / beta, 0.0)


def _optimise(grouped: np.ndarray, bits: int, symmetric: bool):
    """HQQ on float32 groups ``[G, rows, B]``: (q, scale, zero_point)."""
    q, scale, zero_point = grid.round_to_nearest_groups(grouped, bits, symmetric)
    w = grouped.astype(np.float64)  # the groups once in float64, for every objective
    best = grid.BestGrid(objective(w, q, scale, zero_point), q, scale, zero_point)
    q_it, s = q, scale.astype(np.float64)  # the iterate (the best is kept apart)
    z = None if zero_point is None else zero_point.astype(np.float64)
    beta = BETA
    for _ in range(ITERATIONS):
        w_hat = grid.dequantize(q_it, s, z, np.float64)
        target = w - _shrink(w - w_hat, beta)
        qf = q_it.astype(np.float64)
        if symmetric:
            norm = (qf * qf).sum(-1)
            s = np.where(norm > 0, (qf * target).sum(-1) / np.where(norm > 0, norm, 1), s)
            s = np.where(s > 0, s, best.scale)  # a non-positive scale is no grid
        else:
            z = (s[..., None] * qf - target).mean(-1)
        s32 = s.astype(np.float32)
        z32 = None if z is None else z.astype(np.float32)
        q_it = grid.round_to_grid(grouped, s32, z32, bits)
        best.offer(objective(w, q_it, s32, z32), q_it, s32, z32)
        beta *= KAPPA
    return best.result()


def quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """HQQ of a float32 ``[out, in]``: (q, scale, zero_point) in groups form."""
    return grid.in_row_chunks(grid.to_groups(w, block_size),
                              lambda chunk: _optimise(chunk, bits, symmetric))
