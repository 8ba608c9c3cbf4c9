"""`XlaQuantizedLinear`: torch_xla's quantized linear module, int4 stored packed.

Constructor and `load_quantized_weight` follow
``torch_xla.experimental.xla_quantized_matmul.XlaQuantizedLinear``; the
state_dict keys are the same (`weight`, `weight_scaler`, `zero_point`, plus
`bias`). Differences: an optional bias, int4 weights kept packed two per
byte (API.md section 2), buffers shaped for the configured layout (so a
fresh module accepts `load_state_dict` of a quantized one), `from_float`, and
torch_xla's unpacked-int4 state dicts are accepted and packed on load.

Buffers (`in` = input_dim, `out` = output_dim, B = block_size):

| config | `weight` | `weight_scaler` / `zero_point` |
|---|---|---|
| int8 per-channel | int8 `[out, in]` | `[out]` |
| int8 blockwise | int8 `[in/B, B, out]` | `[in/B, out]` |
| int4 per-channel | uint8 `[out, in/2]` | `[out]` |
| int4 blockwise | uint8 `[in/B, B/2, out]` | `[in/B, out]` |

`zero_point` exists only when ``is_symmetric=False`` (torch_xla's default).
"""

from __future__ import annotations

import torch

import xla_qops
from torch_bridge import _jax_interop as interop
from torch_bridge import checks
from torch_bridge import op as _op  # noqa: F401  (registers torch.ops.xla.quantized_matmul)
from xla_qops import packing


def _pack_int4(weight: torch.Tensor, blockwise: bool) -> torch.Tensor:
    """int8 in [-8, 7] -> packed uint8 (xla_qops.packing, run on the host once at load)."""
    packed = packing.pack_int4(interop.to_jax(weight.cpu()), packing.input_axis(blockwise))
    return interop.to_torch(packed).to(weight.device)


class XlaQuantizedLinear(torch.nn.Module):
    """``y = quantized_matmul(x, weight, weight_scaler, zero_point) + bias``.

    Args:
      input_dim, output_dim: `in` and `out` features.
      is_symmetric: no zero point. False (torch_xla's default) keeps a float
        `zero_point` buffer: ``w = weight_scaler * q - zero_point``.
      block_size: -1 per-channel, else B dividing `input_dim`.
      int4_weight: int4 values, stored packed (uint8).
      quantize_activation: W8A8 / W4A8 (per-token int8 activations).
      bias: add a float bias parameter `[out]`.
      impl: the xla_qops implementation ("auto", "xla", "pallas", "reference",
        "custom_call"); passed to the op's `with_impl` overload.
    """

    def __init__(self, input_dim, output_dim, is_symmetric: bool = False, block_size: int = -1,
                 int4_weight: bool = False, quantize_activation: bool = False,
                 bias: bool = False, *, impl: str = "auto"):
        super().__init__()
        spec = checks.linear_config(input_dim, output_dim, block_size, int4_weight)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.is_symmetric = bool(is_symmetric)
        self.block_size = block_size
        self.int4_weight = bool(int4_weight)
        self.quantize_activation = bool(quantize_activation)
        xla_qops.dispatch.check_impl(impl)
        self.impl = impl
        weight_dtype = torch.uint8 if int4_weight else torch.int8
        self.register_buffer("weight", torch.zeros(spec.weight_shape, dtype=weight_dtype))
        self.register_buffer("weight_scaler", torch.zeros(spec.scale_shape))
        self.register_buffer("zero_point",
                             None if self.is_symmetric else torch.zeros(spec.scale_shape))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_dim))
        else:
            self.register_parameter("bias", None)

    @property
    def scheme(self) -> str:
        return f"w{4 if self.int4_weight else 8}a{8 if self.quantize_activation else 16}"

    def load_quantized_weight(self, weight, weight_scaler=None, zero_point=None):
        """Stores a quantized weight (torch_xla-compatible).

        Args:
          weight: int8 `[out, in]` per-channel or `[in/B, B, out]` blockwise;
            for int4 modules unpacked int4 (int8 in [-8, 7], packed here) or
            packed uint8 `[out, in/2]` / `[in/B, B/2, out]`. An
            `xla_qops.QuantizedWeight` may be passed instead, alone.
          weight_scaler: float `[out]` / `[in/B, out]`.
          zero_point: float like `weight_scaler`; only for is_symmetric=False
            modules. None there stores zeros (exactly the symmetric result).

        The tensors are stored as given (dtype and device), like torch_xla,
        except that a CPU tensor JAX cannot alias (not contiguous or not
        64-byte aligned, e.g. from numpy) is stored as an aligned copy.
        """
        if isinstance(weight, xla_qops.QuantizedWeight):
            if weight_scaler is not None or zero_point is not None:
                raise TypeError("weight: an xla_qops.QuantizedWeight carries its own scale and "
                                "zero point; do not pass weight_scaler / zero_point as well")
            qw = weight
            weight, weight_scaler = interop.to_torch(qw.w), interop.to_torch(qw.scale)
            zero_point = None if qw.zero_point is None else interop.to_torch(qw.zero_point)
        needs_packing = checks.quantized_weight(self, weight, weight_scaler, zero_point)
        if needs_packing:
            weight = _pack_int4(weight, self.block_size != -1)
        if zero_point is None and not self.is_symmetric:
            zero_point = torch.zeros_like(weight_scaler)
        # CPU buffers JAX cannot alias would be copied on every call.
        weight, weight_scaler = interop.aligned(weight), interop.aligned(weight_scaler)
        zero_point = None if zero_point is None else interop.aligned(zero_point)
        self.weight = weight
        self.weight_scaler = weight_scaler
        self.zero_point = zero_point

    @classmethod
    def from_float(cls, linear, *, bits: int = 8, block_size: int = -1, symmetric: bool = True,
                   quantize_activation: bool = False, impl: str = "auto"):
        """Quantizes an `nn.Linear` (round-to-nearest, xla_qops.quantize_weight).

        Scales and zero points are float32 whatever the linear's dtype; the
        bias keeps its dtype and is added in the activation dtype. The result
        lives on the linear's device.
        """
        checks.float_linear(linear)
        checks.bits(bits)
        module = cls(linear.in_features, linear.out_features, is_symmetric=symmetric,
                     block_size=block_size, int4_weight=bits == 4,
                     quantize_activation=quantize_activation, bias=linear.bias is not None,
                     impl=impl)
        w = linear.weight.detach().to("cpu", torch.float32)
        # Not jitted: under jit XLA turns `absmax / qmax` into a multiply by the
        # reciprocal, and scales would differ from xla_qops.quantize_weight's
        # (correctly rounded) ones in the last bit.
        qw = xla_qops.quantize_weight(interop.to_jax(w), bits=bits, block_size=block_size,
                                      symmetric=symmetric, pack=True)
        module.load_quantized_weight(qw)
        if linear.bias is not None:
            module.bias = torch.nn.Parameter(linear.bias.detach().to("cpu").clone(),
                                             requires_grad=linear.bias.requires_grad)
        return module.to(linear.weight.device)

    def forward(self, x):
        if self.impl == "auto":
            y = torch.ops.xla.quantized_matmul(
                x, self.weight, self.weight_scaler, self.zero_point, block_size=self.block_size,
                int4_weight=self.int4_weight, quantize_activation=self.quantize_activation)
        else:
            y = torch.ops.xla.quantized_matmul(
                x, self.weight, self.weight_scaler, self.zero_point, block_size=self.block_size,
                int4_weight=self.int4_weight, quantize_activation=self.quantize_activation,
                impl=self.impl)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Quantized tensors go through load_quantized_weight (validation, int4
        # packing, dtype kept: an exact round trip) instead of copy_ into the
        # current buffers, which would cast them; they land on the module's
        # current device. The bias is copied like nn.Linear's.
        device = self.weight.device
        names = ["weight", "weight_scaler"] + ([] if self.is_symmetric else ["zero_point"])
        if self.bias is not None:
            names.append("bias")
        found = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        missing_keys.extend(prefix + n for n in names if n not in found)
        if strict:
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k[len(prefix):] not in names)
        if "weight" in found and "weight_scaler" in found:
            try:
                self.load_quantized_weight(found["weight"].to(device),
                                           found["weight_scaler"].to(device),
                                           found["zero_point"].to(device)
                                           if "zero_point" in found else None)
            except (TypeError, ValueError) as e:
                error_msgs.append(f"While loading {prefix or 'the module'}: {e}")
        if "bias" in found:
            if found["bias"].shape != self.bias.shape:
                error_msgs.append(f"bias: expected shape {list(self.bias.shape)}, got "
                                  f"{list(found['bias'].shape)}")
            else:
                with torch.no_grad():
                    self.bias.copy_(found["bias"])

    def extra_repr(self) -> str:
        layout = "per-channel" if self.block_size == -1 else f"block_size={self.block_size}"
        parts = [f"input_dim={self.input_dim}", f"output_dim={self.output_dim}", self.scheme,
                 layout, "symmetric" if self.is_symmetric else "asymmetric (zero_point)",
                 f"bias={self.bias is not None}"]
        if self.int4_weight:
            parts.append("int4 packed")
        if self.impl != "auto":
            parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)
