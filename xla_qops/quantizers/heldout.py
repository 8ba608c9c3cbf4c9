"""Per-layer fallback to round to nearest, judged on a held-out split of the calibration data.

A calibrated method (GPTQ, AWQ, awq+gptq) minimises the layer's output error
on its calibration inputs; on a few hundred short sentences it can fit them
at the expense of inputs it never saw. So the calibration inputs are split:
every `HOLDOUT_EVERY`-th input (a whole model input: a batch of sentences,
not tokens of sentences that are also fitted) is held out, the method is fitted on
the others, and its output error ``tr(D H_holdout D^T)`` on the held-out
inputs is compared with round to nearest's. A layer where round to nearest
is better keeps round to nearest; otherwise the method is fitted again on
all the inputs (``H_fit + H_holdout``), so a layer that passes loses no data.
The check is returned per layer (`HeldOutCheck`) for the caller's report.

SmoothQuant's smoothing is judged on the same split, but not here: its gain is
in the quantized activations' error, which ``tr(D H D^T)`` (weight error only)
cannot see, so `torch_bridge.calibrate` measures it on held-out input rows
(`calibrate._judge_smoothing`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xla_qops import quantizers
from xla_qops.quantizers import awq, grid

HOLDOUT_EVERY = 5  # one calibration input in five is held out (at least one of two or more)


def is_holdout(index: int, count: int) -> bool:
    """Whether calibration input `index` (of `count`) is in the held-out split: the last of
    every `HOLDOUT_EVERY` (of all of them when fewer); none of a single input."""
    if count < 2:
        return False
    every = min(HOLDOUT_EVERY, count)
    return index % every == every - 1


@dataclasses.dataclass(frozen=True)
class HeldOutCheck:
    """One layer's check: output errors ``tr(D H_holdout D^T)`` on the held-out inputs."""
    method: str  # the calibrated method checked
    error_rtn: float  # of round to nearest
    error_calibrated: float  # of `method` fitted on the other inputs

    @property
    def kept(self) -> str:
        """The method the layer keeps: `method` unless round to nearest did better."""
        return self.method if self.error_calibrated <= self.error_rtn else "rtn"


def dequantize_layout(q: np.ndarray, scale: np.ndarray, zero_point, block_size: int):
    """float64 ``[out, in]`` of (q, scale, zero_point) in API.md's (unpacked) layouts."""
    q = np.asarray(q, np.float64)
    zero = 0.0 if zero_point is None else np.asarray(zero_point, np.float64)
    if block_size == -1:
        return q * np.asarray(scale, np.float64)[:, None] - (
            zero[:, None] if zero_point is not None else 0.0)
    w = q * np.asarray(scale, np.float64)[:, None, :]
    if zero_point is not None:
        w = w - zero[:, None, :]
    return w.reshape(-1, w.shape[-1]).T


def output_error(w: np.ndarray, layout, block_size: int, h: np.ndarray) -> float:
    """``tr(D H D^T)`` for ``D = w - dequantize_layout(*layout)``, a chunk of output rows
    at a time (`grid.rows_per_chunk`): the whole float64 ``D`` and ``D H`` of a large
    layer would be ~6 float32 copies of it at once (a 4096 x 14336 layer: 1.5 GB)."""
    q, scale, zero_point = layout
    out_features = w.shape[0]
    rows = grid.rows_per_chunk(out_features, w.shape[1])
    total = 0.0
    for r in range(0, out_features, rows):
        part = slice(r, r + rows)
        if block_size == -1:
            chunk = (q[part], scale[part], None if zero_point is None else zero_point[part])
        else:
            chunk = (q[:, :, part], scale[:, part],
                     None if zero_point is None else zero_point[:, part])
        total += awq.output_error(w[part], dequantize_layout(*chunk, block_size), h)
    return total


def quantize_checked(w: np.ndarray, bits: int, block_size: int, symmetric: bool, method: str,
                     fit_hessian: np.ndarray, holdout_hessian: np.ndarray | None):
    """((q, scale, zero_point) in API.md's layouts, HeldOutCheck or None) of a float32
    ``[out, in]``: `method` fitted on all the inputs where it beats round to nearest on the
    held-out ones, round to nearest where it does not. No held-out inputs (None): `method`
    on `fit_hessian`, unchecked."""
    if holdout_hessian is None:
        return quantizers.quantize(w, bits, block_size, symmetric, method, fit_hessian), None
    rtn = quantizers.quantize(w, bits, block_size, symmetric, "rtn")
    fitted = quantizers.quantize(w, bits, block_size, symmetric, method, fit_hessian)
    check = HeldOutCheck(
        method,
        output_error(w, rtn, block_size, holdout_hessian),
        output_error(w, fitted, block_size, holdout_hessian))
    if check.kept == "rtn":
        return rtn, check
    return quantizers.quantize(w, bits, block_size, symmetric, method,
                               fit_hessian + holdout_hessian), check
