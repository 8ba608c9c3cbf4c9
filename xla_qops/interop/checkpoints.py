"""Whole quantized checkpoints from other tools: GPTQ, AWQ, compressed-tensors.

`read_checkpoint(source)` takes what a user downloads -- a directory with
``config.json`` and one or more ``*.safetensors`` files, or a single
``.safetensors`` file -- and returns every quantized linear layer as a
`QuantizedWeight` keyed by its module path, whether it quantizes
activations, and every other tensor under its own name.

The format comes from ``config.json``'s ``quantization_config.quant_method``
("gptq", "awq", "compressed-tensors"), else from the tensor names
(``.qweight`` GPTQ or AWQ by their shapes, ``.weight_packed``
compressed-tensors), else it must be given (``format=``). The layer
parameters (bits, group size, GPTQ version, compressed-tensors config
groups) come from the config; without one they are read off the tensor
shapes. `torch_bridge.load_quantized` and `xla_qops.checkpoint.load_quantized`
build on this.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Mapping

import numpy as np

from xla_qops.interop.awq import from_awq
from xla_qops.interop.compressed_tensors import from_compressed_tensors, scheme_args
from xla_qops.interop.gptq import from_gptq
from xla_qops.interop.state_dict import layer_tensors
from xla_qops.quantize import QuantizedWeight

FORMATS = ("gptq", "awq", "compressed-tensors")


@dataclasses.dataclass
class ImportedCheckpoint:
    """A foreign checkpoint converted: what `read_checkpoint` returns."""

    format: str
    weights: dict[str, QuantizedWeight]  # module path -> weight
    quantize_activation: dict[str, bool]  # module path -> W8A8/W4A8
    tensors: dict[str, np.ndarray]  # every other tensor, by its checkpoint name
    config: dict  # quantization_config ({} without config.json)


def _files(source) -> tuple[list[str], dict]:
    """(safetensors files, quantization_config) of a directory or a file."""
    source = os.fspath(source)
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "*.safetensors")))
        config_path = os.path.join(source, "config.json")
        if not files:
            raise FileNotFoundError(f"source: no .safetensors files in {source}")
    elif os.path.isfile(source):
        files, config_path = [source], os.path.join(os.path.dirname(source), "config.json")
    else:
        raise FileNotFoundError(f"source: {source} is neither a directory nor a file")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f).get("quantization_config") or {}
    return files, config


def _load_tensors(files) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    tensors = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"source: tensor {name!r} appears in more than one file")
                tensors[name] = f.get_tensor(name)
    return tensors


def detect_format(tensors: Mapping, config: Mapping) -> str:
    """The checkpoint's format: from the config, else from its tensor names and shapes."""
    method = config.get("quant_method")
    if method is not None:
        if method not in FORMATS:
            raise ValueError(f"config: quant_method {method!r} is not one of "
                             f"{', '.join(FORMATS)} (pass format= to override)")
        return method
    for name in tensors:
        if name.endswith(".weight_packed"):
            return "compressed-tensors"
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            scales = tensors.get(f"{prefix}.scales")
            if scales is None:
                break
            # GPTQ packs along in ([K/8, N]), AWQ along out ([K, N/8]); scales are [G, N].
            return "gptq" if tensors[name].shape[1] == scales.shape[1] else "awq"
    raise ValueError("source: no config.json quantization_config and no GPTQ/AWQ "
                     "(.qweight) or compressed-tensors (.weight_packed) tensors; pass format=")


def _gptq_args(config: Mapping) -> dict:
    if config.get("desc_act"):
        raise ValueError("config: desc_act=True (act-order) GPTQ checkpoint: its input features "
                         "are permuted per layer, which a swapped Linear cannot apply; import "
                         "its layers with interop.from_gptq(..., permute_act_order=True)")
    version = 2 if config.get("checkpoint_format") == "gptq_v2" else 1
    return {"bits": int(config.get("bits", 4)), "version": version}


def _ct_layer_args(config: Mapping, prefix: str, parts: Mapping) -> tuple[dict, bool]:
    """from_compressed_tensors keywords and quantize_activation for one layer."""
    if not config:
        return _ct_inferred_args(parts), False
    groups = config.get("config_groups") or {}
    chosen = None
    for name, group in groups.items():
        targets = group.get("targets") or []
        regexes = [t[3:] for t in targets if t.startswith("re:")]
        if any(re.fullmatch(r, prefix) or re.match(r, prefix) for r in regexes):
            chosen = name
            break
        if chosen is None and len(regexes) < len(targets):  # a class-name target ("Linear")
            chosen = name
    if chosen is None:
        raise ValueError(f"config: no config group targets layer {prefix!r}")
    args = scheme_args(config, chosen)
    return args["importer"], args["quantize_activation"]


def _ct_inferred_args(parts: Mapping) -> dict:
    """Layer parameters read off the tensors (no config.json)."""
    scale = parts["weight_scale"]
    if "weight_packed" in parts:
        n, k = (int(d) for d in np.asarray(parts["weight_shape"]).reshape(-1))
        words = parts["weight_packed"].shape[1]  # ceil(K * bits / 32)
        bits = {-(-k // 8): 4, -(-k // 4): 8}.get(words)
        if bits is None:
            raise ValueError(f"weight_packed: {words} words per row fit neither 4- nor 8-bit "
                             f"values for in={k}")
        fmt = "pack-quantized"
    else:
        n, k = parts["weight"].shape
        bits, fmt = 8, "int-quantized"
    groups = scale.shape[1] if scale.ndim == 2 else 1
    strategy = "channel" if groups == 1 else "group"
    return dict(num_bits=bits, group_size=None if groups == 1 else k // groups,
                symmetric="weight_zero_point" not in parts, strategy=strategy,
                compression_format=fmt)


def read_checkpoint(source, *, format: str | None = None, **overrides) -> ImportedCheckpoint:
    """Every quantized layer of a GPTQ, AWQ or compressed-tensors checkpoint.

    Args:
      source: a directory (``config.json`` + ``*.safetensors``, sharded or
        not) or one ``.safetensors`` file (a ``config.json`` beside it is read).
      format: "gptq", "awq" or "compressed-tensors" to override detection.
      **overrides: importer keywords that win over the config (e.g.
        ``target_bits=8``, ``exact=False``, GPTQ ``version=2``).

    Raises:
      ValueError: the format cannot be told or is not supported, or layers
        fail to import -- every failing layer in one message.
    """
    files, config = _files(source)
    tensors = _load_tensors(files)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    fmt = format or detect_format(tensors, config)
    layers = layer_tensors(tensors, fmt)
    if not layers:
        raise ValueError(f"source: no {fmt} quantized layers in {', '.join(files)}")
    weights, quantize_activation, used, problems = {}, {}, set(), []
    for prefix, parts in layers.items():
        arrays = {arg: tensors[t] for arg, t in parts.items()}
        try:
            if fmt == "gptq":
                weight = from_gptq(**arrays, **{**_gptq_args(config), **overrides})
                qa = False
            elif fmt == "awq":
                weight = from_awq(**arrays, **overrides)
                qa = False
            else:
                args, qa = _ct_layer_args(config, prefix, arrays)
                weight = from_compressed_tensors(arrays, **{**args, **overrides})
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"{prefix}: {e}")
            continue
        weights[prefix], quantize_activation[prefix] = weight, qa
        used.update(parts.values())
    if problems:
        raise ValueError(f"source: {len(problems)} of {len(layers)} {fmt} layers do not import:"
                         "\n  " + "\n  ".join(problems))
    others = {name: a for name, a in tensors.items() if name not in used}
    return ImportedCheckpoint(format=fmt, weights=weights,
                              quantize_activation=quantize_activation, tensors=others,
                              config=dict(config))
