"""The named quantization schemes of `quantize_model` and the CLI's `--scheme`
(API.md sections 4 and 7): what the weights and the activations become.

One table for every face (torch_bridge.quantize_model, `xla-qops quantize`,
and the JAX model faces to come), so a scheme means the same everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

FLOAT_FORMATS = ("fp8", "mxfp4", "nvfp4")
# The methods that round onto a float grid (xla_qops.quantizers.FLOAT_METHODS; HQQ's free
# scale update cannot keep MX's powers of two or NVFP4's e4m3 block scales).
FLOAT_METHODS = ("rtn", "gptq", "awq")
FORMAT_BLOCKS = {"mxfp4": 32, "nvfp4": 16}  # the block a -1 block size means


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
        """The block size the weights get for `quantize_model`'s `block_size` (the float
        formats' rules checked by the caller, `float_format_problem`): MX blocks default
        to 32, NV blocks are 16."""
        return format_block_size(self.format, value)


# scheme name -> Scheme (API.md sections 4 and 7).
SCHEMES = {
    "w8a16": Scheme(8, False), "w4a16": Scheme(4, False),
    "w8a8": Scheme(8, True, "int", "int8"), "w4a8": Scheme(4, True, "int", "int8"),
    "w8a16-fp8": Scheme(8, False, "fp8"), "w8a8-fp8": Scheme(8, True, "fp8", "fp8"),
    "w4a16-mxfp4": Scheme(4, False, "mxfp4"), "w4a16-nvfp4": Scheme(4, False, "nvfp4"),
    "w4a8-fp8": Scheme(4, True, "int", "fp8"),
}


def format_block_size(fmt: str, block_size: int) -> int:
    """The block size a weight of quantizer format `fmt` gets for `block_size` (after
    `float_format_problem`): -1 means MX's 32 and NVFP4's 16."""
    return FORMAT_BLOCKS.get(fmt, block_size) if block_size == -1 else block_size


def float_format_problem(fmt: str, *, subject: str, block_size: int = -1,
                         symmetric: bool = True, method: str = "rtn",
                         cli: bool = False) -> Optional[str]:
    """The one statement of what a float weight format (API.md section 7) allows: None, or
    the error message (argument, expected, actual) of the first rule broken.

    Every face calls it before any work: `xla_qops.quantize_weight(format=...)`,
    `torch_bridge.quantize_model(scheme=...)` and `xla-qops quantize --scheme`.
    `subject` names what was asked for in the face's words ("format='nvfp4'",
    "scheme='w4a16-nvfp4'", "scheme w4a16-nvfp4"); `cli` spells the arguments as the
    command line's options. Rules: symmetric (no zero point); a method that rounds onto
    the format's grid (`FLOAT_METHODS`); NVFP4 blocks of 16; e2m1 codes pair inside a
    block (an even block size). An int format ("int") breaks none.
    """
    if fmt not in FLOAT_FORMATS:
        return None
    if not symmetric:
        name, got = ("asymmetric", "--asymmetric") if cli else ("symmetric", "symmetric=False")
        return (f"{name}: {subject} has float weights, which are symmetric (no zero point, "
                f"API.md section 7), got {got}")
    if method not in FLOAT_METHODS:
        return (f"method: {subject} rounds to nearest even onto its float grid, with method "
                f"{', '.join(map(repr, FLOAT_METHODS))}, got {method!r}")
    name = "block-size" if cli else "block_size"
    if fmt == "nvfp4" and block_size not in (-1, FORMAT_BLOCKS["nvfp4"]):
        return f"{name}: {subject} has blocks of 16, got {block_size} (NVFP4)"
    if fmt != "fp8" and block_size != -1 and block_size % 2:
        return (f"{name}: e2m1 codes are stored in pairs inside a block, so it must be even "
                f"for {subject}, got {block_size}")
    return None
