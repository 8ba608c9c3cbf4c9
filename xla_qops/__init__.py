"""xla-qops: quantized matmuls (W8A16, W4A16, W8A8, W4A8) for XLA devices.

Public API (see docs/ and API.md):

    quantized_matmul(x, w, scale, zero_point=None, block_size=-1,
                     int4_weight=False, quantize_activation=False, *, impl="auto")
    Impl, IMPLS         the impl names (a Literal type and its values)
    quantize_weight(w, *, bits=8, block_size=-1, symmetric=True, pack=True,
                    method="rtn", calibration=None)
    QuantizedWeight

Submodules: `xla_qops.interop` (GPTQ, AWQ, HQQ, int4pack, MLX importers),
`xla_qops.checkpoint` (safetensors), `xla_qops.sharding` (sharded matmul),
`xla_qops.quantizers` (the quantization methods), `xla_qops.data` (sentence sets);
with the `flax` extra, `xla_qops.nnx` (Flax NNX modules) and `xla_qops.qwix` (a qwix
provider), imported on first use so that `import xla_qops` never imports flax.
"""

from xla_qops.api import quantized_matmul
from xla_qops.dispatch import IMPLS, Impl
from xla_qops.quantize import QuantizedWeight, quantize_weight
from xla_qops import checkpoint, interop, sharding  # noqa: E402  (public submodules)

__all__ = ["quantized_matmul", "quantize_weight", "QuantizedWeight", "IMPLS", "Impl"]
__version__ = "0.1.0"

_LAZY_SUBMODULES = ("nnx", "qwix")  # need flax / qwix (the `flax` extra)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
