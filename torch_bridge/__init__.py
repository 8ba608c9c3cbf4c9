"""torch_bridge: xla-qops for PyTorch and PyTorch/XLA (API.md section 4, docs/torch.md).

``import torch_bridge`` registers ``torch.ops.xla.quantized_matmul`` (torch_xla's
schema; CPU tensors, XLA tensors, torch.compile) backed by xla_qops, whether
``torch_xla.experimental.xla_quantized_matmul`` is imported before or after;
overloads append ``weight_format`` / ``activation_format`` (fp8, fp4; API.md
section 7) and ``impl``.

    XlaQuantizedLinear(input_dim, output_dim, is_symmetric=False, block_size=-1,
                       int4_weight=False, quantize_activation=False, bias=False)
    quantize_model(model, *, scheme="w8a16", block_size=-1, symmetric=True,
                   filter_fn=None) -> model     # SCHEMES: w8a16 ... w4a8-fp8
    quantization_report(model=None) -> QuantizationReport
    load_quantized(model, source, *, format=None) -> LoadReport   # GPTQ/AWQ/compressed-tensors
    register_with_torchax()          # the op inside torchax-traced JAX functions
    checkpoint.save_torch / load_torch                           # safetensors state dicts
"""

from torch_bridge import op  # noqa: F401  (registers the op first)
from torch_bridge.checks import SCHEMES
from torch_bridge.linear import XlaQuantizedLinear
from torch_bridge.load import CheckpointMismatch, LoadReport, load_quantized
from torch_bridge.swap import QuantizationReport, quantization_report, quantize_model
from torch_bridge.torchax_ops import register_with_torchax

__all__ = ["XlaQuantizedLinear", "quantize_model", "quantization_report",
           "QuantizationReport", "SCHEMES", "load_quantized", "LoadReport",
           "CheckpointMismatch", "register_with_torchax"]
