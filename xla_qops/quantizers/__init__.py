"""Weight quantizers: one entry point (`quantize`), one module per method.

| method | needs | what it does | module |
|---|---|---|---|
| ``"rtn"`` | nothing | round to nearest on the min/max (or absmax) grid | grid |
| ``"hqq"`` | nothing | half-quadratic optimisation of the grid (l_p weight error) | hqq |
| ``"gptq"`` | layer inputs | column-by-column rounding with inverse-Hessian compensation | gptq |
| ``"awq"`` | layer inputs | activation-aware clipping of each group's grid | awq |
| ``"awq+gptq"`` | layer inputs | GPTQ's rounding onto AWQ's clipped grids | awq_gptq |
| ``"autoround"`` | layer inputs | rounding offsets, clips learned by signed gradient | autoround |
| ``"awq+gptq+autoround"`` | layer inputs | autoround started from awq+gptq's result | autoround |
| ``"awq+gptq+blockround"`` | a torch model | awq+gptq, then block output reconstruction | torch_bridge.blockround |

All work on a float32 ``[out, in]`` weight with numpy on the host and
return ``(q, scale, zero_point)`` in API.md's layouts (int8 q, float32
scales), which `xla_qops.quantize_weight` wraps into a `QuantizedWeight`
(autoround's steps run under `jax.jit` in float32; its final rounding is numpy's).
A calibration sample is a float ``[n, in]`` array of the layer's inputs; only
its ``X^T X`` is used (`calibration_hessian`), which callers that stream
many batches (torch_bridge.calibrate) accumulate themselves and pass instead.

The float formats of API.md section 7 (fp8, mxfp4, nvfp4) go through
`quantize_float` with `FLOAT_METHODS` ("rtn", "gptq", "awq"): the same
methods, rounding through the format's `float_formats.FloatGrid` instead of
`grid.IntGrid` (its scale rule, RNE onto e4m3 / e2m1 saturating, its
dequantization), so every value they store is a code of the format.
"""

from __future__ import annotations

import numpy as np

from xla_qops.quantizers import autoround, awq, awq_gptq, float_formats, gptq, grid, hqq
from xla_qops.schemes import FLOAT_METHODS  # the methods that round onto the float grids

METHODS = ("rtn", "hqq", "gptq", "awq", "awq+gptq", "autoround", "awq+gptq+autoround")
CALIBRATED = ("gptq", "awq", "awq+gptq", "autoround", "awq+gptq+autoround",
              "awq+gptq+blockround")
# Methods whose quantize_model also searches AWQ's per-input-channel scale first.
INPUT_SCALED = ("awq", "awq+gptq", "awq+gptq+autoround", "awq+gptq+blockround")
# Methods of a whole torch model (torch_bridge.quantize_model, xla-qops quantize), not of one
# weight: each transformer block's Linears refined jointly against the block's output
# (torch_bridge.blockround), starting from the layer-wise method named here.
# They are not in METHODS (quantize_weight's, and the NNX face's, which refuse them).
BLOCK_METHODS = {"awq+gptq+blockround": "awq+gptq"}
MODEL_METHODS = METHODS + tuple(BLOCK_METHODS)  # torch_bridge.quantize_model's, the CLI's


def needs_data(method: str, smoothing) -> bool:
    """Whether quantizing a model with `method` and `smoothing` runs it on calibration
    inputs: a calibrated method, or SmoothQuant ("hadamard", a rotation, sees no data)."""
    return method in CALIBRATED or smoothing not in (None, "hadamard")


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
    elif method == "awq+gptq":
        groups = awq_gptq.quantize(w, hessian, bits, block_size, symmetric)
    elif method == "autoround":
        groups = autoround.quantize(w, hessian, bits, block_size, symmetric)
    elif method == "awq+gptq+autoround":
        groups = autoround.quantize(w, hessian, bits, block_size, symmetric,
                                    start=awq_gptq.quantize(w, hessian, bits, block_size,
                                                            symmetric))
    else:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return grid.to_layout(*groups, block_size)


def quantize_float(w: np.ndarray, fmt: str, block_size: int, method: str = "rtn",
                   hessian: np.ndarray | None = None, nvfp4_divisor: bool = False):
    """(values float32, scale float32) of a float32 ``[out, in]`` on float format `fmt`'s grid
    (`float_formats`), in API.md's layouts; `float_formats.to_storage` makes the codes.

    `method`: one of `FLOAT_METHODS` (the caller validates, see
    `xla_qops.schemes.float_format_problem`); `nvfp4_divisor`: NVFP4's tensor factor in
    compressed-tensors' divisor form (float_formats).
    """
    w = np.asarray(w, np.float32)
    element_grid = float_formats.FloatGrid.of(w, fmt, nvfp4_divisor)
    # bits and symmetric (None, True) are the int grid's; element_grid replaces it.
    if method == "rtn":
        groups = element_grid.rtn(grid.to_groups(w, block_size))
    elif method == "gptq":
        groups = gptq.quantize(w, hessian, None, block_size, True, element_grid=element_grid)
    elif method == "awq":
        groups = awq.clip_search(w, hessian, None, block_size, True, element_grid=element_grid)
    else:
        raise ValueError(f"method: format={fmt!r} takes one of {FLOAT_METHODS}, got {method!r}")
    values, scale, _ = grid.to_layout(*groups, block_size)
    return values, scale
