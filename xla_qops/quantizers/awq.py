"""AWQ-style activation-aware quantization, and SmoothQuant's scales.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration" (2023); Xiao et al., "SmoothQuant" (2022).

On a float format (`float_formats.FloatGrid`) the clip search tries the
format's own scale of each clipped range and rounds onto its values, and the
scale search measures each candidate s on the format.

Both measure a candidate by the layer's output error on calibration inputs,
``tr(D H D^T)`` with D the weight error and ``H = X^T X`` (so only H is kept,
not the samples).

* `clip_search`: each group's grid may cover only a fraction r of its range
  (``r * absmax``, or ``r * [min, max]``), r from 1 down to `MIN_CLIP`; the r
  with the smallest output error is kept per group and output channel. The
  result is a plain `QuantizedWeight` of the layer's own weight.
* `scale_search`: per input channel a scale ``s_j = mean|x_j|^alpha``
  (normalised), alpha searched on a grid; the weight quantized is
  ``W diag(s)`` and its inputs must be divided by s. That division cannot
  live in API.md's `QuantizedWeight` (its scales are per output channel and
  block), so it is folded into the op that produces the layer's input (a
  LayerNorm's weight and bias, a Linear's output rows) when the model
  allows it, or applied as an explicit per-channel input scale otherwise
  (torch_bridge.calibrate). `quantize_weight(method="awq")` alone does the
  clip search only.
* `smoothquant_scales`: ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)``,
  which moves activation outliers into the weight for A8 schemes (folded the
  same way).
"""

from __future__ import annotations

import numpy as np

from xla_qops.quantizers import grid

MIN_CLIP = 0.5
CLIP_STEPS = 20
ALPHAS = np.linspace(0.0, 1.0, 21)


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``tr(D H D^T)`` for ``D = w - w_hat`` (``[out, in]``)."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(((d @ h) * d).sum())


def _group_errors(grouped: np.ndarray, w_hat: np.ndarray, h_blocks: np.ndarray) -> np.ndarray:
    """Per group and output channel ``d_g H_g d_g^T`` ``[G, out]`` (H_g: the group's block of H)."""
    d = grouped.astype(np.float64, copy=False) - w_hat
    return (np.matmul(d, h_blocks) * d).sum(-1)


def clip_search(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, symmetric: bool, *,
                element_grid=None):
    """Round-to-nearest with a per-(group, channel) clipped range, the clip minimising the
    output error: (q, scale, zero_point), groups form. `element_grid`: the grid to round
    onto (a `float_formats.FloatGrid`: each candidate is that format's scale of the clipped
    range and its RNE rounding); None: the int grid of `bits` and `symmetric`."""
    element_grid = element_grid or grid.IntGrid(bits, symmetric)
    grouped_all = grid.to_groups(w, block_size)
    groups, _, block = grouped_all.shape
    h = np.asarray(h, np.float64)
    h_blocks = np.stack([h[g * block:(g + 1) * block, g * block:(g + 1) * block]
                         for g in range(groups)])

    def search(grouped):
        lo, hi = grouped.min(axis=-1), grouped.max(axis=-1)
        grouped64 = grouped.astype(np.float64)  # once, for every ratio's error
        best = None
        for ratio in np.linspace(1.0, MIN_CLIP, CLIP_STEPS + 1):
            r = np.float32(ratio)
            scale, zero_point = element_grid.params(lo * r, hi * r)
            q = element_grid.round(grouped, scale, zero_point)
            err = _group_errors(grouped64, element_grid.dequantize(q, scale, zero_point,
                                                                   np.float64), h_blocks)
            if best is None:
                best = grid.BestGrid(err, q, scale, zero_point)
            else:
                best.offer(err, q, scale, zero_point)
        return best.result()

    return grid.in_row_chunks(grouped_all, search)


def scale_search(w: np.ndarray, h: np.ndarray, mean_abs_x: np.ndarray, bits: int,
                 block_size: int, symmetric: bool, *, grid_of=None) -> np.ndarray:
    """The per-input-channel scale s (``[in]``, float32) minimising the output error of
    quantizing ``W diag(s)`` and dividing the inputs by s; s = 1 if none beats it.
    `grid_of`: the grid of a (scaled) weight, ``grid_of(w) -> FloatGrid`` for a float
    format (its tensor factor follows the scaled weight); None: the int grid."""
    w = np.asarray(w, np.float32)
    base = np.maximum(np.asarray(mean_abs_x, np.float64), 1e-8)
    best_err, best_s = None, np.ones(w.shape[1], np.float32)
    for alpha in ALPHAS:
        s = base ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        scaled = w * s
        element_grid = grid_of(scaled) if grid_of else grid.IntGrid(bits, symmetric)
        q, scale, zero_point = element_grid.rtn(grid.to_groups(scaled, block_size))
        w_hat = grid.from_groups(element_grid.dequantize(q, scale, zero_point, np.float64)) / s
        err = output_error(w, w_hat, h)
        if best_err is None or err < best_err:
            best_err, best_s = err, s
    return best_s


def smoothquant_scales(absmax_x: np.ndarray, w: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """SmoothQuant's ``s_j = max|x_j|^alpha / max_o|W_oj|^(1 - alpha)`` (float32, ``[in]``);
    channels with no activation or no weight keep s = 1."""
    ax = np.asarray(absmax_x, np.float64)
    aw = np.abs(np.asarray(w, np.float64)).max(axis=0)
    ok = (ax > 0) & (aw > 0)
    s = np.ones_like(ax)
    s[ok] = ax[ok] ** alpha / aw[ok] ** (1.0 - alpha)
    return s.astype(np.float32)
