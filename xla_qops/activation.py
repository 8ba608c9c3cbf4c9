"""On-the-fly symmetric int8 activation quantization (W8A8, W4A8).

The definition lives in `pallas_kernels.activation`, one layer down, because
the Pallas kernels' prologue uses it too and `pallas_kernels` imports nothing
from `xla_qops`. Every backend here calls it, so all of them, the kernels and
the float64 test reference see the same integers.
"""

from pallas_kernels.activation import QMAX, divide_exactly, quantize_activation

__all__ = ["QMAX", "divide_exactly", "quantize_activation"]
