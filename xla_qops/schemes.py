"""The named quantization schemes of `quantize_model` and the CLI's `--scheme`
(API.md sections 4 and 7): what the weights and the activations become.

One table for every face (torch_bridge.quantize_model, `xla-qops quantize`,
and the JAX model faces to come), so a scheme means the same everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A `quantize_model` scheme: what the weights and the activations become.

    Attributes:
      bits: 8 or 4 (the weight's width).
      quantize_activation: activations quantized per token (A8).
      format: `xla_qops.quantize_weight`'s format: "int", "fp8", "mxfp4" or
        "nvfp4".
      activation_format: with `quantize_activation`, "int8" or "fp8" (API.md
        section 7); None for A16.
    """

    bits: int
    quantize_activation: bool
    format: str = "int"
    activation_format: Optional[str] = None

    @property
    def weight_format(self) -> str:
        """`quantized_matmul`'s name for the weight format: int8, int4, fp8 or fp4."""
        if self.format == "int":
            return f"int{self.bits}"
        return "fp8" if self.format == "fp8" else "fp4"

    @property
    def float_weight(self) -> bool:
        return self.format != "int"

    def block_size(self, value: int) -> int:
        """The block size the weights get for `quantize_model`'s `block_size` (checked):
        MX blocks default to 32, NV blocks are 16."""
        if self.format == "mxfp4" and value == -1:
            return 32
        if self.format == "nvfp4":
            if value not in (-1, 16):
                raise ValueError(f"block_size: scheme 'w4a16-nvfp4' has blocks of 16 (NVFP4), "
                                 f"got {value}")
            return 16
        if self.float_weight and self.bits == 4 and value != -1 and value % 2:
            raise ValueError(f"block_size: e2m1 codes are stored in pairs inside a block, so "
                             f"it must be even for an fp4 scheme, got {value}")
        return value


# scheme name -> Scheme (API.md sections 4 and 7).
SCHEMES = {
    "w8a16": Scheme(8, False), "w4a16": Scheme(4, False),
    "w8a8": Scheme(8, True, "int", "int8"), "w4a8": Scheme(4, True, "int", "int8"),
    "w8a16-fp8": Scheme(8, False, "fp8"), "w8a8-fp8": Scheme(8, True, "fp8", "fp8"),
    "w4a16-mxfp4": Scheme(4, False, "mxfp4"), "w4a16-nvfp4": Scheme(4, False, "nvfp4"),
    "w4a8-fp8": Scheme(4, True, "int", "fp8"),
}
