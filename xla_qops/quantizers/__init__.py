"""Weight quantizers: one entry point (`quantize`), one module per method.

| method | needs | what it does | module |
|---|---|---|---|
| ``"rtn"`` | nothing | round to nearest on the min/max (or absmax) grid | grid |
| ``"hqq"`` | nothing | half-quadratic optimisation of the grid (l_p weight error) | hqq |
| ``"gptq"`` | layer inputs | column-by-column rounding with inverse-Hessian compensation | gptq |
| ``"awq"`` | layer inputs | activation-aware clipping of each group's grid | awq |

All work on a float32 ``[out, in]`` weight with numpy on the host and
return ``(q, scale, zero_point)`` in API.md's layouts (int8 q, float32
scales), which `xla_qops.quantize_weight` wraps into a `QuantizedWeight`.
A calibration sample is a float ``[n, in]`` array of the layer's inputs; only
its ``X^T X`` is used (`calibration_hessian`), which callers that stream
many batches (torch_bridge.calibrate) accumulate themselves and pass instead.
"""

from __future__ import annotations

import numpy as np

from xla_qops.quantizers import awq, gptq, grid, hqq

METHODS = ("rtn", "hqq", "gptq", "awq")
CALIBRATED = ("gptq", "awq")


def calibration_hessian(x) -> np.ndarray:
    """``X^T X`` (float64 ``[in, in]``) of layer inputs ``[..., in]``."""
    return gptq.hessian(x)


def quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool, method: str = "rtn",
             hessian: np.ndarray | None = None):
    """(q, scale, zero_point) of a float32 ``[out, in]`` in API.md's layouts.

    `hessian`: ``X^T X`` of the layer's inputs, required by the calibrated
    methods (the caller validates; see `xla_qops.quantize.check_method`).
    """
    w = np.asarray(w, np.float32)
    if method == "rtn":
        groups = grid.round_to_nearest(w, bits, block_size, symmetric)
    elif method == "hqq":
        groups = hqq.quantize(w, bits, block_size, symmetric)
    elif method == "gptq":
        groups = gptq.quantize(w, hessian, bits, block_size, symmetric)
    elif method == "awq":
        groups = awq.clip_search(w, hessian, bits, block_size, symmetric)
    else:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return grid.to_layout(*groups, block_size)
