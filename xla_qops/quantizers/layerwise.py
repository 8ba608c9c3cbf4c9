"""The framework-free steps of a model's layer-by-layer calibrated quantization.

`torch_bridge.calibrate` (torch models) and `xla_qops.nnx` (Flax NNX models)
both quantize a model's linear layers in the same steps; each face only
runs its model and watches its layers. What the steps decide lives here, so
the two faces give the same result for the same weights and inputs:

* `group_by_input`: linear layers that read the very same input array (q/k/v
  after one norm, gate/up after another) form a group, in run order, with
  the module that produced that input (its "producer"), if any.
* `outputs_unchanged`: whether folding an AWQ input scale into the producer
  kept the model's outputs (a producer whose output also feeds a residual
  connection fails this; the scale then stays an explicit multiply).
* `quantize_layer`: one layer's quantized weight from its float ``[out, in]``
  weight, its input scale (folded: already in the weight; explicit: applied
  here) and the ``X^T X`` of its inputs split into fitted and held-out
  inputs (`heldout`), with the errors a report gives.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xla_qops import quantizers
from xla_qops.quantize import quantize_float, quantize_with_hessian, quantize_with_holdout
from xla_qops.quantizers import heldout

# A fold is kept when every model output moves by at most this fraction of its largest
# magnitude (plus an absolute floor for all-zero outputs): the fold is exact in real
# arithmetic, and float32 reassociation of ``(x / s) (s w)`` stays far below it.
FOLD_RELATIVE_TOLERANCE = 1e-3
FOLD_ABSOLUTE_TOLERANCE = 1e-6


@dataclasses.dataclass
class Group:
    """Linear layers that read the same input array, in run order."""
    names: list
    producer: object  # the key of the module whose output that array is, or None


def group_by_input(order) -> list:
    """Groups, in run order, of ``order``: (layer key, id of its input array, producer key
    or None) of each layer's first call, in call order."""
    groups, by_input = [], {}
    for name, input_id, producer in order:
        if input_id in by_input:
            by_input[input_id].names.append(name)
        else:
            by_input[input_id] = Group([name], producer)
            groups.append(by_input[input_id])
    return groups


@dataclasses.dataclass
class InputStatistics:
    """Statistics of one group's shared input over the calibration inputs, float64 arrays
    of the caller's framework (numpy, torch: `add`'s `maximum` is the framework's)."""
    rows: int = 0
    absmax: object = None  # [in]
    abssum: object = None  # [in]
    hessian: object = None  # [in, in] X^T X of the fitted inputs, when asked for
    holdout_hessian: object = None  # ... of the held-out inputs (`heldout`), kept apart

    def add(self, rows: int, abssum, absmax=None, hessian=None, *, held_out: bool = False,
            maximum=np.maximum) -> None:
        """Adds one input's statistics (`rows` rows; `hessian` its X^T X or None)."""
        self.rows += rows
        if absmax is not None:
            self.absmax = absmax if self.absmax is None else maximum(self.absmax, absmax)
        self.abssum = abssum if self.abssum is None else self.abssum + abssum
        if hessian is None:
            return
        if held_out:
            self.holdout_hessian = (hessian if self.holdout_hessian is None
                                    else self.holdout_hessian + hessian)
        else:
            self.hessian = hessian if self.hessian is None else self.hessian + hessian

    @property
    def mean_abs(self) -> np.ndarray:
        """mean |x| per input channel (numpy)."""
        return np.asarray(self.abssum / max(self.rows, 1))


def outputs_unchanged(reference: list, outputs: list) -> bool:
    """Whether float32 arrays `outputs` equal `reference` (same count and shapes) within
    `FOLD_RELATIVE_TOLERANCE` of each reference array's largest magnitude."""
    if len(reference) != len(outputs):
        return False
    for x, y in zip(reference, outputs):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        if x.shape != y.shape:
            return False
        tolerance = FOLD_RELATIVE_TOLERANCE * float(np.abs(x).max(initial=0.0)) + (
            FOLD_ABSOLUTE_TOLERANCE)
        if x.size and float(np.abs(x - y).max()) > tolerance:
            return False
    return True


def scaled_hessian(hessian, s):
    """X^T X of the inputs divided by s (an explicit input scale), or None."""
    return None if hessian is None else hessian / s[:, None] / s[None, :]


def weight_error(w: np.ndarray, qw, column_scale: np.ndarray | None = None) -> float:
    """Relative Frobenius error ``|W - W_hat| / |W|`` of a QuantizedWeight (of ``W diag(s)``
    when `column_scale` s is given: W_hat is then its dequantized weight divided by s)."""
    w_hat = np.asarray(qw.dequantize(), np.float64)
    if column_scale is not None:
        w_hat = w_hat / column_scale.astype(np.float64)
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w.astype(np.float64) - w_hat)) / (norm if norm else 1.0)


def quantize_plain(w, bits, block_size, symmetric, method, hessian, format="int",
                   nvfp4_divisor=False, pack=False):
    """A QuantizedWeight of `method` fitted on `hessian` (None for the data-free methods),
    on the int grid or float format `format`'s."""
    if format != "int":  # float grids (arguments checked by the caller)
        return quantize_float(w, format, block_size, method, hessian,
                              nvfp4_divisor=nvfp4_divisor)
    return quantize_with_hessian(w, bits=bits, block_size=block_size, symmetric=symmetric,
                                 method=method, hessian=hessian, pack=pack)


@dataclasses.dataclass
class LayerQuantization:
    """One layer's quantized weight and what a report says of it."""
    weight: object  # the QuantizedWeight (of ``W diag(s)`` when the scale is explicit)
    method: str  # the method used, with the held-out fallback named where it was taken
    weight_error_rtn: float  # relative Frobenius error of round to nearest
    weight_error: float  # ... of the method used (scales included)
    held_out: heldout.HeldOutCheck | None  # the fallback's check (calibrated int methods)


def quantize_layer(w: np.ndarray, *, scale: np.ndarray | None, explicit: bool, hessian,
                   holdout, bits: int, block_size: int, symmetric: bool, method: str,
                   format: str = "int", nvfp4_divisor: bool = False,
                   pack: bool = False) -> LayerQuantization:
    """Quantizes one layer's float32 weight `w` ``[out, in]`` as the model now holds it.

    scale: its AWQ input scale s or None; `explicit`: s is not folded (the quantized
    layer multiplies its inputs by 1/s, so ``W diag(s)`` is quantized here and the
    inputs' ``X^T X`` divided by s), else s is already in `w` (and in its inputs).
    hessian / holdout: ``X^T X`` of the fitted and of the held-out calibration inputs
    (`heldout`; holdout None: none held out), None both for the data-free methods.
    Calibrated methods on the int grid keep round to nearest where it does better on
    the held-out inputs; on a float format they are fitted on every input unchecked.
    """
    explicit = scale is not None and explicit
    w_eff = w * scale if explicit else w
    h_eff, holdout_eff = ((scaled_hessian(hessian, scale), scaled_hessian(holdout, scale))
                          if explicit else (hessian, holdout))
    check = None
    if method in quantizers.CALIBRATED and format == "int":
        qw, check = quantize_with_holdout(
            w_eff, bits=bits, block_size=block_size, symmetric=symmetric, method=method,
            fit_hessian=h_eff, holdout_hessian=holdout_eff, pack=pack)
    else:  # float grids: no held-out check, so fitted on every input
        h_all = h_eff if holdout_eff is None else h_eff + holdout_eff
        qw = quantize_plain(w_eff, bits, block_size, symmetric, method, h_all, format,
                            nvfp4_divisor, pack)
    # Errors against the layer's float weight as the model had it before any scale: a
    # folded (or explicit) s is undone on the result.
    w_orig = w / scale if (scale is not None and not explicit) else w
    # Round to nearest of an unscaled weight is what qw already is.
    rtn = (qw if method == "rtn" and scale is None
           else quantize_plain(w_orig, bits, block_size, symmetric, "rtn", None, format,
                               nvfp4_divisor, pack))
    used = method if check is None or check.kept != "rtn" else (
        f"rtn (fallback: {method} worse on the held-out split)")
    return LayerQuantization(qw, used, weight_error(w_orig, rtn),
                             weight_error(w_orig, qw, scale), check)
