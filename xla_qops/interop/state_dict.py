"""Whole checkpoints: every quantized layer of a GPTQ, AWQ, MLX, compressed-tensors,
native fp8 or ModelOpt state dict.

These formats name a quantized linear layer's tensors after the layer
(``<layer>.qweight``, ``<layer>.qzeros``, ``<layer>.scales``, ``<layer>.g_idx``
for GPTQ/AWQ; ``<layer>.weight`` (uint32), ``<layer>.scales``,
``<layer>.biases`` for MLX; ``<layer>.weight_packed`` or int8
``<layer>.weight``, ``<layer>.weight_scale``, ``<layer>.weight_shape``,
``<layer>.weight_zero_point``, ``<layer>.weight_g_idx``,
``<layer>.weight_global_scale``, ``<layer>.input_scale`` for
compressed-tensors; ``<layer>.weight`` float8 and ``<layer>.weight_scale_inv``
for native fp8; ``<layer>.weight``, ``<layer>.weight_scale``,
``<layer>.weight_scale_2``, ``<layer>.input_scale`` for ModelOpt), so a
state dict can be converted layer by layer.
The result feeds `xla_qops.checkpoint.save_quantized` directly.
"""

from __future__ import annotations

from typing import Mapping

from xla_qops.interop.awq import from_awq
from xla_qops.interop.compressed_tensors import from_compressed_tensors
from xla_qops.interop.floats import from_fp8_blocks, from_modelopt
from xla_qops.interop.gptq import from_gptq
from xla_qops.interop.mlx import from_mlx

FORMATS = ("gptq", "awq", "mlx", "compressed-tensors", "fp8", "modelopt")
_CT_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx",
             "weight_global_scale", "input_scale", "input_global_scale")


def layer_tensors(tensors, fmt):
    """layer name -> {argument: tensor name} of every quantized layer."""
    layers = {}
    for name in tensors:
        if fmt in ("gptq", "awq") and name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            parts = {"qweight": name, "qzeros": f"{prefix}.qzeros", "scales": f"{prefix}.scales"}
            if fmt == "gptq" and f"{prefix}.g_idx" in tensors:
                parts["g_idx"] = f"{prefix}.g_idx"
            layers[prefix] = parts
        elif fmt == "compressed-tensors" and name.endswith(".weight_scale"):
            prefix = name[: -len(".weight_scale")]
            parts = {part: f"{prefix}.{part}" for part in _CT_PARTS
                     if f"{prefix}.{part}" in tensors}
            if "weight_packed" not in parts:  # int-quantized: an int8 weight
                parts["weight"] = f"{prefix}.weight"
            layers[prefix] = parts
        elif fmt == "fp8" and name.endswith(".weight_scale_inv"):
            prefix = name[: -len(".weight_scale_inv")]
            parts = {"weight": f"{prefix}.weight", "weight_scale_inv": name}
            if f"{prefix}.input_scale" in tensors:  # activation_scheme "static": not used
                parts["input_scale"] = f"{prefix}.input_scale"
            layers[prefix] = parts
        elif fmt == "modelopt" and name.endswith(".weight_scale"):
            prefix = name[: -len(".weight_scale")]
            parts = {part: f"{prefix}.{part}" for part in ("weight", "weight_scale",
                                                           "weight_scale_2", "input_scale")
                     if f"{prefix}.{part}" in tensors or part in ("weight", "weight_scale")}
            layers[prefix] = parts
        elif fmt == "mlx" and name.endswith(".biases"):
            prefix = name[: -len(".biases")]
            parts = {"wq": f"{prefix}.weight", "scales": f"{prefix}.scales", "biases": name}
            layers[prefix] = parts
    for prefix, parts in layers.items():
        missing = [t for t in parts.values() if t not in tensors]
        if missing:
            raise ValueError(f"tensors: layer {prefix!r} ({fmt}) lacks {', '.join(missing)}")
    return layers


def from_state_dict(tensors: Mapping[str, object], format: str, **kwargs):
    """Imports every quantized layer of a state dict.

    Args:
      tensors: name -> array (numpy, JAX or torch), e.g. a loaded safetensors file.
      format: "gptq", "awq", "mlx", "compressed-tensors", "fp8" (native fp8,
        ``.weight_scale_inv``) or "modelopt".
      **kwargs: passed to `from_gptq` / `from_awq` / `from_mlx` /
        `from_compressed_tensors` / `from_fp8_blocks` / `from_modelopt` for
        every layer (e.g. ``bits=4, version=1``, ``group_size=64``, for
        compressed-tensors ``**scheme_args(quantization_config)["importer"]``,
        for fp8 ``block=(128, 128)``, for modelopt ``quant_algo="NVFP4"``).

    Returns:
      ``(weights, others)``: layer name -> `QuantizedWeight`, and every tensor
      that belongs to no quantized layer (biases, norms, embeddings), as given.
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    if kwargs.get("permute_act_order"):
        raise ValueError("permute_act_order: a permutation per layer has no place in a state "
                         "dict; import act-order layers one by one with from_gptq")
    importer = {"gptq": from_gptq, "awq": from_awq, "mlx": from_mlx,
                "compressed-tensors": _compressed_tensors_layer, "fp8": fp8_layer,
                "modelopt": modelopt_layer}[format]
    layers = layer_tensors(tensors, format)
    weights, used = {}, set()
    for prefix, parts in layers.items():
        try:
            weights[prefix] = importer(**{arg: tensors[t] for arg, t in parts.items()}, **kwargs)
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer {prefix!r}: {e}") from e
        used.update(parts.values())
    others = {name: a for name, a in tensors.items() if name not in used}
    return weights, others


def _compressed_tensors_layer(**kwargs):
    tensors = {name: kwargs.pop(name) for name in (*_CT_PARTS, "weight") if name in kwargs}
    return from_compressed_tensors(tensors, **kwargs)


def fp8_layer(weight, weight_scale_inv, input_scale=None, block=(128, 128)):
    """One native-fp8 layer from its tensors (``input_scale``, if any, not used)."""
    return from_fp8_blocks(weight, weight_scale_inv, block=block)


def modelopt_layer(**kwargs):
    tensors = {name: kwargs.pop(name) for name in ("weight", "weight_scale", "weight_scale_2",
                                                   "input_scale") if name in kwargs}
    return from_modelopt(tensors, **kwargs)
