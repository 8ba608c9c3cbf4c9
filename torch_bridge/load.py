"""`load_quantized`: a published quantized checkpoint into a torch model, in one call.

    model = transformers.AutoModelForCausalLM.from_config(config)   # float, any init
    torch_bridge.load_quantized(model, "path/to/gptq-or-awq-or-compressed-tensors")

Every quantized layer of the checkpoint (`xla_qops.interop.read_checkpoint`)
replaces the `nn.Linear` at the same module path with an
`XlaQuantizedLinear` holding the imported weight (W8A8/W4A8 where the
checkpoint quantizes activations; the float element formats of API.md
section 7 as they are stored: fp8 weights as float8_e4m3fn, fp4 as packed
e2m1 codes, with fp8 activations where the checkpoint quantizes them; the
bias from ``<path>.bias``); every other
tensor loads into the model as ``load_state_dict`` would, cast to the
parameter's floating dtype. Everything is checked before anything changes:
missing, unexpected and misshapen tensors, quantized layers that are not
Linears of the right size -- all listed in one `CheckpointMismatch`, and the
model is left as it was.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from torch_bridge.checkpoint import to_torch
from torch_bridge.linear import XlaQuantizedLinear
from torch_bridge.swap import linear_holders, swap_into
from xla_qops.interop.checkpoints import read_checkpoint


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model; `problems` lists every mismatch."""

    def __init__(self, source, problems):
        self.problems = list(problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s), nothing loaded:\n  "
                         + "\n  ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_quantized` did."""

    format: str
    swapped: dict  # module path -> scheme ("w4a16", ...)
    loaded: int  # other tensors copied into the model
    tied: list  # model tensors not in the checkpoint but sharing storage with one that is

    def __str__(self) -> str:
        schemes = {}
        for s in self.swapped.values():
            schemes[s] = schemes.get(s, 0) + 1
        listing = ", ".join(f"{n} {s}" for s, n in sorted(schemes.items()))
        return (f"load_quantized ({self.format}): swapped {len(self.swapped)} linear layers "
                f"({listing}); loaded {self.loaded} other tensors"
                + (f"; tied, not in the checkpoint: {', '.join(self.tied)}" if self.tied else ""))


def _to_torch(a: np.ndarray) -> torch.Tensor:
    return to_torch(np.asarray(a))


def _activation_format(imported, path):
    """The layer's activation format where the importer says ("int8" / "fp8"); None
    takes section 7's default (int8 for int weights, fp8 for float weights)."""
    formats = getattr(imported, "activation_format", None)
    return formats.get(path) if isinstance(formats, dict) else None


def _plan_swaps(model, imported, problems):
    """(path, linear, QuantizedWeight) for every quantized layer that fits."""
    modules = dict(model.named_modules())
    swaps = []
    for path, qw in imported.weights.items():
        module = modules.get(path)
        if not isinstance(module, torch.nn.Linear):
            found = "nothing" if module is None else type(module).__name__
            problems.append(f"{path}: the checkpoint quantizes it; the model has {found} there, "
                            f"not an nn.Linear")
            continue
        if (module.in_features, module.out_features) != (qw.in_features, qw.out_features):
            problems.append(f"{path}: the checkpoint's weight is [{qw.out_features}, "
                            f"{qw.in_features}]; the model's Linear is [{module.out_features}, "
                            f"{module.in_features}]")
            continue
        swaps.append((path, module, qw))
    return swaps


def _aliases(model) -> dict[str, set]:
    """state_dict name -> the names sharing its storage (tied weights)."""
    by_storage = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), t.shape),
                              []).append(name)
    return {n: set(names) for names in by_storage.values() for n in names}


def load_quantized(model: torch.nn.Module, source, *, format: str | None = None,
                   **overrides) -> LoadReport:
    """Loads a GPTQ, AWQ or compressed-tensors checkpoint into `model`, in place.

    Args:
      model: the float model the checkpoint was made from (e.g. a transformers
        model built from its ``config.json``; its weights are overwritten).
      source: a checkpoint directory or ``.safetensors`` file.
      format: override the detected format ("gptq", "awq", "compressed-tensors").
      **overrides: importer keywords (``target_bits``, ``exact``, ...).

    Returns:
      A `LoadReport` (also stored as ``model._xla_qops_load_report``).

    Raises:
      CheckpointMismatch: every tensor that is missing, unexpected or of the
        wrong shape or kind, and every quantized layer the model has no
        matching Linear for; the model is unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    imported = read_checkpoint(source, format=format, **overrides)
    problems = []
    swaps = _plan_swaps(model, imported, problems)
    swapped_paths = {path for path, *_ in swaps} | set(imported.weights)
    # What the model expects besides the swapped layers' own weights.
    state = model.state_dict(keep_vars=True)
    aliases = _aliases(model)
    expected = {}
    for name, t in state.items():
        owner, _, leaf = name.rpartition(".")
        if owner in swapped_paths and leaf == "weight":
            continue
        expected[name] = t
    provided = dict(imported.tensors)
    for name, t in expected.items():
        if name in provided:
            a = provided[name]
            if tuple(a.shape) != tuple(t.shape):
                problems.append(f"{name}: the checkpoint has shape {list(a.shape)}, the model "
                                f"{list(t.shape)}")
            elif t.is_floating_point() != (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
                problems.append(f"{name}: the checkpoint has {a.dtype.name}, the model "
                                f"{str(t.dtype).removeprefix('torch.')}")
    tied = sorted(n for n in expected if n not in provided
                  and any(alias in provided for alias in aliases.get(n, ())))
    missing = [n for n in expected if n not in provided and n not in tied]
    problems += [f"{n}: missing from the checkpoint" for n in missing]
    problems += [f"{n}: in the checkpoint, not in the model" for n in provided
                 if n not in expected]
    if problems:
        raise CheckpointMismatch(source, problems)

    with torch.no_grad():
        for name, a in provided.items():
            target = expected[name]
            target.copy_(_to_torch(a).to(target.dtype))
        swapped = {}
        holders = linear_holders(model)
        for path, linear, qw in swaps:
            quantize_activation = imported.quantize_activation[path]
            quantized = XlaQuantizedLinear.from_quantized(
                qw, quantize_activation=quantize_activation,
                activation_format=(_activation_format(imported, path)
                                   if quantize_activation else None),
                bias=linear.bias,  # loaded above under <path>.bias
                device=linear.weight.device)
            swap_into(holders.get(id(linear), []), quantized)
            swapped[path] = quantized.scheme
    report = LoadReport(format=imported.format, swapped=swapped, loaded=len(provided),
                        tied=tied)
    model._xla_qops_load_report = report
    return report
