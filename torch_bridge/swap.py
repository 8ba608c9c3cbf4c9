"""`quantize_model`: swap every eligible `nn.Linear` for an `XlaQuantizedLinear`.

The swap is in place and returns the model. What was done is recorded in a
`QuantizationReport`, stored on the model (`quantization_report(model)`) and
as the module-level last report (`quantization_report()`).
"""

from __future__ import annotations

import dataclasses

import torch

from torch_bridge import checks
from torch_bridge.linear import XlaQuantizedLinear

_REPORT_ATTR = "_xla_qops_report"
_last_report = None


@dataclasses.dataclass(frozen=True)
class SwappedLayer:
    name: str
    in_features: int
    out_features: int
    bytes_before: int  # float weight + bias
    bytes_after: int  # quantized weight + scales + zero points + bias


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

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.swapped)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.swapped)

    def __str__(self) -> str:
        lines = [f"quantize_model: scheme={self.scheme} block_size={self.block_size} "
                 f"symmetric={self.symmetric}",
                 f"  swapped {len(self.swapped)} linear layers: {_mib(self.bytes_before)} -> "
                 f"{_mib(self.bytes_after)}",
                 f"  model: {_mib(self.model_bytes_before)} -> {_mib(self.model_bytes_after)}"]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            lines += [f"    {s.name or '<model>'}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


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
                   symmetric: bool = True, filter_fn=None):
    """Swaps every `nn.Linear` of `model` for an `XlaQuantizedLinear`, in place.

    Args:
      model: a `torch.nn.Module`.
      scheme: "w8a16", "w4a16", "w8a8" or "w4a8" (int4 stored packed).
      block_size: -1 per-channel, else B; layers whose in_features B does not
        divide are skipped (and reported).
      symmetric: absmax scales without zero point, else min/max with one.
      filter_fn: optional ``filter_fn(name, module) -> bool``; False skips.

    Returns:
      `model`. `quantization_report(model)` tells what was swapped, skipped
      (and why) and the bytes before and after.
    """
    global _last_report
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    bits, quantize_activation = checks.scheme(scheme)
    checks.block_size(block_size)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable(name, module) or None, "
                        f"got {type(filter_fn).__name__}")

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
        todo.append((name, module, holders))

    swapped = []
    for name, module, holders in todo:
        quantized = XlaQuantizedLinear.from_float(
            module, bits=bits, block_size=block_size, symmetric=symmetric,
            quantize_activation=quantize_activation)
        for parent, attr in holders:
            setattr(parent, attr, quantized)
        swapped.append(SwappedLayer(
            name, module.in_features, module.out_features,
            bytes_before=_nbytes([module.weight, module.bias]),
            bytes_after=_nbytes([quantized.weight, quantized.weight_scaler,
                                 quantized.zero_point, quantized.bias])))

    report = QuantizationReport(scheme=scheme, block_size=block_size, symmetric=symmetric,
                                swapped=swapped, skipped=skipped,
                                model_bytes_before=model_bytes_before,
                                model_bytes_after=_model_bytes(model))
    setattr(model, _REPORT_ATTR, report)
    _last_report = report
    return model


def quantization_report(model=None) -> QuantizationReport | None:
    """The report of the last `quantize_model` call on `model` (or on any model)."""
    if model is None:
        return _last_report
    return getattr(model, _REPORT_ATTR, None)
