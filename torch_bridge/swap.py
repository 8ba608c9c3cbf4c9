"""`quantize_model`: swap every eligible `nn.Linear` for an `XlaQuantizedLinear`.

The swap is in place and returns the model. What was done is recorded in a
`QuantizationReport`, stored on the model (`quantization_report(model)`) and
as the module-level last report (`quantization_report()`).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from torch_bridge import calibrate, checks, rotation
from torch_bridge.linear import XlaQuantizedLinear
from xla_qops import quantizers
from xla_qops.quantize import check_method

_REPORT_ATTR = "_xla_qops_report"
_last_report = None


@dataclasses.dataclass(frozen=True)
class SwappedLayer:
    name: str
    in_features: int
    out_features: int
    bytes_before: int  # float weight + bias
    bytes_after: int  # quantized weight + scales + zero points + bias
    method: str = "rtn"  # the method used for this layer
    weight_error_rtn: float | None = None  # |W - W_hat| / |W| with round-to-nearest
    weight_error: float | None = None  # ... with `method` (and its input scale)
    input_scale: str | None = None  # smoothing / AWQ scale: "folded into <module>", "explicit"


@dataclasses.dataclass(frozen=True)
class SkippedLayer:
    name: str
    reason: str


@dataclasses.dataclass
class QuantizationReport:
    """What `quantize_model` swapped and skipped, and the memory it saved.

    `bytes_before` / `bytes_after` cover the swapped layers; `model_bytes_*`
    the whole model (parameters and buffers, each shared tensor once; a
    weight tied to an embedding stays in the model after its linear is
    quantized, which only the model totals show).
    """

    scheme: str
    block_size: int
    symmetric: bool
    swapped: list[SwappedLayer]
    skipped: list[SkippedLayer]
    model_bytes_before: int
    model_bytes_after: int
    method: str = "rtn"
    calibration_size: int = 0  # calibration inputs (model calls)
    calibration_tokens: int = 0  # elements of their integer tensors (token ids), if any
    smoothing: str | None = None  # e.g. "smoothquant(alpha=0.5)"
    seconds: float = 0.0  # time quantize_model took

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.swapped)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.swapped)

    def __str__(self) -> str:
        lines = [f"quantize_model: scheme={self.scheme} block_size={self.block_size} "
                 f"symmetric={self.symmetric} method={self.method}"
                 + (f" smoothing={self.smoothing}" if self.smoothing else "")
                 + (f" calibration={self.calibration_size} inputs"
                    + (f" ({self.calibration_tokens} tokens)" if self.calibration_tokens else "")
                    if self.calibration_size else "") + f" in {self.seconds:.1f} s",
                 f"  swapped {len(self.swapped)} linear layers: {_mib(self.bytes_before)} -> "
                 f"{_mib(self.bytes_after)}",
                 f"  model: {_mib(self.model_bytes_before)} -> {_mib(self.model_bytes_after)}"]
        if self.smoothing == "hadamard":
            rotated = sum(1 for layer in self.swapped
                          if (layer.input_scale or "").startswith("Hadamard"))
            lines.append(f"  inputs rotated (Hadamard blocks): "
                         f"{rotation.rotated_count(rotated, len(self.swapped))}")
        if any(layer.weight_error is not None for layer in self.swapped):
            lines.append("  weight error |W - W_hat| / |W|, round-to-nearest -> method:")
            lines += [f"    {layer.name}: {layer.weight_error_rtn:.4f} -> {layer.weight_error:.4f}"
                      f" ({layer.method}" + (f", {_input_text(layer.input_scale)}"
                                               if layer.input_scale else "") + ")"
                      for layer in self.swapped if layer.weight_error is not None]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            lines += [f"    {s.name or '<model>'}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _input_text(text: str) -> str:
    """A layer's `input_scale` note as the report prints it: a rotation says so itself."""
    return text if text.startswith(("Hadamard", "not rotated")) else f"input scale {text}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _nbytes([t])
    return total


def linear_holders(model: torch.nn.Module) -> dict[int, list]:
    """id(linear) -> every (parent module, attribute) holding that `nn.Linear`:
    a module registered under two names is swapped everywhere, by one module."""
    parents: dict[int, list] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():  # named_children() dedups
            if isinstance(child, torch.nn.Linear):
                parents.setdefault(id(child), []).append((parent, child_name))
    return parents


def swap_into(holders, module: torch.nn.Module) -> None:
    """Puts `module` in every (parent module, attribute) of `holders` (one entry of
    `linear_holders`), replacing the Linear each held."""
    for parent, attr in holders:
        setattr(parent, attr, module)


def _skip_reason(name, module, parents, block_size, filter_fn):
    """Why `module` is not swapped, or None."""
    if filter_fn is not None and not filter_fn(name, module):
        return "filter_fn returned False"
    if not parents:
        return ("the model itself is an nn.Linear; use XlaQuantizedLinear.from_float "
                "to replace it")
    if any(isinstance(p, torch.nn.MultiheadAttention) for p, _ in parents):
        return "owned by nn.MultiheadAttention, which reads its .weight directly"
    in_features = module.in_features
    if block_size != -1 and in_features % block_size:
        return f"in_features={in_features} is not divisible by block_size={block_size}"
    return None


def quantize_model(model, *, scheme: str = "w8a16", block_size: int = -1,
                   symmetric: bool = True, filter_fn=None, method: str = "rtn",
                   calibration=None, smoothing: str | None = None,
                   smoothing_alpha: float = 0.5, progress: bool = True):
    """Swaps every `nn.Linear` of `model` for an `XlaQuantizedLinear`, in place.

    Args:
      model: a `torch.nn.Module`.
      scheme: "w8a16", "w4a16", "w8a8" or "w4a8" (int4 stored packed); with
        float element formats (API.md section 7) "w8a16-fp8" (e4m3fn weights,
        scale amax/448), "w8a8-fp8" (and fp8 activations per token),
        "w4a16-mxfp4" (e2m1, power-of-two scales per block of 32),
        "w4a16-nvfp4" (e2m1, blocks of 16, e4m3 block scales times a tensor
        factor) or "w4a8-fp8" (int4 weights, fp8 activations).
      block_size: -1 per-channel, else B; layers whose in_features B does not
        divide are skipped (and reported). mxfp4 takes -1 as 32, nvfp4 has
        B = 16 (-1 or 16).
      symmetric: absmax scales without zero point, else min/max with one
        (the float weight formats are symmetric only).
      filter_fn: optional ``filter_fn(name, module) -> bool``; False skips.
      method: "rtn" (round to nearest), "hqq" (no data), "gptq" or "awq"
        (need `calibration`); see docs/quantizers.md. Float weight formats
        take "rtn", "gptq" or "awq", each rounding onto the format's grid.
      calibration: an iterable of model inputs (tensors, tuples of tensors or
        dicts of tensors, as the model's forward takes them), run through the
        model on its device under no_grad (torch_bridge.calibrate).
      smoothing: None, "smoothquant" (A8 schemes, needs `calibration`):
        activation outliers moved into the weights by per-channel scales,
        folded into the preceding norm / Linear where the model allows it,
        else applied by the layer (`XlaQuantizedLinear.input_scale`); or
        "hadamard" (the integer schemes; methods "rtn", "hqq", "gptq", "awq"
        or "awq+gptq", AWQ's clip search only; no data of its own): each
        layer's inputs rotated by a block-diagonal Hadamard matrix at run time
        and its weight by the same matrix before `method` quantizes it, on the
        rotated inputs' statistics (`XlaQuantizedLinear.set_input_rotation`,
        torch_bridge.rotation).
      smoothing_alpha: SmoothQuant's migration strength in [0, 1].
      progress: a progress bar per calibration pass (tqdm).

    Returns:
      `model`. `quantization_report(model)` tells what was swapped, skipped
      (and why), the bytes before and after, and per layer the weight error of
      round-to-nearest and of the method.
    """
    global _last_report
    start = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    spec = checks.scheme(scheme)
    bits, quantize_activation = spec.bits, spec.quantize_activation
    checks.block_size(block_size)
    checks.scheme_arguments(spec, scheme, symmetric, method, block_size)
    block_size = spec.block_size(block_size)  # the format's own block (mxfp4, nvfp4)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable(name, module) or None, "
                        f"got {type(filter_fn).__name__}")
    checks.smoothing(smoothing, smoothing_alpha, scheme, quantize_activation,
                     calibration is not None, method)
    rotate = smoothing == "hadamard"  # each weight rotated first; no data of its own
    needs_data = quantizers.needs_data(method, smoothing)
    check_method(method, calibration is not None, allow_unused=smoothing is not None,
                 calibration_is="an iterable of the model's inputs",
                 methods=quantizers.MODEL_METHODS)
    inputs = calibrate.check_inputs(calibration) if needs_data else None

    parents = linear_holders(model)

    model_bytes_before = _model_bytes(model)
    # Decide (and check) everything first, so a bad layer leaves the model untouched.
    todo, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        holders = parents.get(id(module), [])
        reason = _skip_reason(name, module, holders, block_size, filter_fn)
        if reason is not None:
            skipped.append(SkippedLayer(name, reason))
            continue
        try:
            checks.float_linear(module)
        except (TypeError, ValueError) as e:
            raise type(e)(f"model layer {name!r}: {e}") from None
        if spec.float_weight and spec.bits == 4 and block_size == -1 and module.in_features % 2:
            skipped.append(SkippedLayer(name, f"in_features={module.in_features} is odd: e2m1 "
                                              f"codes are stored in pairs"))
            continue
        todo.append((name, module, holders))

    swapped = []
    if method == "rtn" and smoothing is None:  # the plain path: no data, no errors measured
        for name, module, holders in todo:
            quantized = XlaQuantizedLinear.from_float(
                module, bits=bits, block_size=block_size, symmetric=symmetric,
                quantize_activation=quantize_activation, format=spec.format,
                activation_format=spec.activation_format)
            swap_into(holders, quantized)
            swapped.append(_swapped(name, module, quantized))
        rows = 0
    else:
        holders_of = {name: holders for name, _, holders in todo}
        results = calibrate.quantize_linears(
            model, [(name, module) for name, module, _ in todo], bits=bits,
            block_size=block_size, symmetric=symmetric, quantize_activation=quantize_activation,
            method=method, inputs=inputs, smoothing=None if rotate else smoothing,
            smoothing_alpha=float(smoothing_alpha), format=spec.format, rotate=rotate,
            search_scales=not rotate,
            activation_format=spec.activation_format,
            swap=lambda name, quantized: swap_into(holders_of[name], quantized),
            progress=progress)
        for name, module, _ in todo:
            r = results[name]
            swapped.append(dataclasses.replace(
                _swapped(name, module, r.module), method=r.method,
                weight_error_rtn=r.weight_error_rtn, weight_error=r.weight_error,
                input_scale=r.input_scale))
        rows = sum(calibrate.tokens_of(item) for item in inputs) if inputs else 0

    report = QuantizationReport(scheme=scheme, block_size=block_size, symmetric=symmetric,
                                swapped=swapped, skipped=skipped,
                                model_bytes_before=model_bytes_before,
                                model_bytes_after=_model_bytes(model), method=method,
                                calibration_size=len(inputs) if inputs else 0,
                                calibration_tokens=rows,
                                smoothing=(f"{smoothing}(alpha={smoothing_alpha})"
                                           if smoothing and not rotate else smoothing),
                                seconds=time.perf_counter() - start)
    setattr(model, _REPORT_ATTR, report)
    _last_report = report
    return model


def _swapped(name, module, quantized) -> SwappedLayer:
    return SwappedLayer(
        name, module.in_features, module.out_features,
        bytes_before=_nbytes([module.weight, module.bias]),
        bytes_after=_nbytes([quantized.weight, quantized.weight_scaler, quantized.zero_point,
                             quantized.bias, quantized.input_scale]))


def quantization_report(model=None) -> QuantizationReport | None:
    """The report of the last `quantize_model` call on `model` (or on any model)."""
    if model is None:
        return _last_report
    return getattr(model, _REPORT_ATTR, None)
