"""On-the-fly activation quantization (W8A8, W4A8): symmetric int8, or e4m3fn.

The definitions live one layer down (`pallas_kernels.activation` for int8,
`pallas_kernels.formats` for fp8), because the Pallas kernels' prologue uses
them too and `pallas_kernels` imports nothing from `xla_qops`. Every backend
here calls them, so all of them, the kernels and the float64 test reference
see the same quantized values.
"""

from pallas_kernels.activation import QMAX, divide_exactly, quantize_activation
from pallas_kernels.formats import quantize_activation_fp8


def quantize_activation_as(activation_format: str, x, block_size: int, absmax=None):
    """(x_q, x_scale) in `activation_format` ("int8" or "fp8")."""
    if activation_format == "fp8":
        return quantize_activation_fp8(x, block_size, absmax)
    return quantize_activation(x, block_size, absmax)


__all__ = ["QMAX", "divide_exactly", "quantize_activation", "quantize_activation_fp8",
           "quantize_activation_as"]
