"""A module-swapped torch model's state dict to and from safetensors.

The file format and its checks are `xla_qops.checkpoint`'s (one format for
JAX and torch); this module reads a torch model's layer schemes off its
`XlaQuantizedLinear` modules and turns loaded arrays into torch tensors.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

from torch_bridge.linear import XlaQuantizedLinear
from xla_qops.checkpoint import LayerScheme, dtype_name, load_state_dict, save_state_dict


def schemes_of_model(model: torch.nn.Module) -> dict[str, LayerScheme]:
    """LayerSchemes of every XlaQuantizedLinear submodule, keyed by module name."""
    return {name: LayerScheme(
                bits=4 if m.int4_weight else 8, block_size=int(m.block_size),
                packed=m.weight.dtype == torch.uint8, symmetric=m.zero_point is None,
                quantize_activation=bool(m.quantize_activation),
                in_features=int(m.input_dim), out_features=int(m.output_dim),
                scale_dtype=dtype_name(m.weight_scaler), weight_format=m.weight_format,
                activation_format=m.activation_format)
            for name, m in model.named_modules() if isinstance(m, XlaQuantizedLinear)}


def save_torch(model: torch.nn.Module, path,
               metadata: Optional[Mapping[str, str]] = None) -> None:
    """Saves a module-swapped torch model's state_dict with its schemes."""
    save_state_dict(path, model.state_dict(), schemes_of_model(model), metadata)


def load_torch(path, model: Optional[torch.nn.Module] = None, *,
               strict: bool = True) -> tuple[dict, dict[str, LayerScheme]]:
    """(torch state dict, schemes) from `path`; with `model`, checked against its state_dict
    (`strict` as in `load_state_dict`).

    Typical use: build the module-swapped model the schemes describe, then
    ``model.load_state_dict(load_torch(path, model)[0])``.
    """
    expected = None if model is None else model.state_dict()
    tensors, schemes, _ = load_state_dict(path, expected, strict=strict)
    out = {}
    for name, a in tensors.items():
        out[name] = to_torch(a)
    return out, schemes


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A numpy array as a torch tensor of the same dtype, bit for bit (bfloat16 and
    float8_e4m3fn, which torch.from_numpy does not know, by their bytes)."""
    viewed = {"bfloat16": (np.int16, torch.bfloat16),
              "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
              "float8_e5m2": (np.uint8, torch.float8_e5m2)}.get(a.dtype.name)
    if viewed is not None:
        raw, dtype = viewed
        return torch.from_numpy(np.ascontiguousarray(a).view(raw).copy()).view(dtype)
    return torch.from_numpy(np.array(a))
