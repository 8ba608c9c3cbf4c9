"""`XlaQuantizedLinear`: torch_xla's quantized linear module, int4 stored packed.

Constructor and `load_quantized_weight` follow
``torch_xla.experimental.xla_quantized_matmul.XlaQuantizedLinear``; the
state_dict keys are the same (`weight`, `weight_scaler`, `zero_point`, plus
`bias`). Differences: an optional bias, int4 weights kept packed two per
byte (API.md section 2), buffers shaped for the configured layout (so a
fresh module accepts `load_state_dict` of a quantized one), `from_float` and
`from_quantized` (the one way every caller builds a module around a weight), and
torch_xla's unpacked-int4 state dicts are accepted and packed on load.

Buffers (`in` = input_dim, `out` = output_dim, B = block_size):

| config | `weight` | `weight_scaler` / `zero_point` |
|---|---|---|
| int8 per-channel | int8 `[out, in]` | `[out]` |
| int8 blockwise | int8 `[in/B, B, out]` | `[in/B, out]` |
| int4 per-channel | uint8 `[out, in/2]` | `[out]` |
| int4 blockwise | uint8 `[in/B, B/2, out]` | `[in/B, out]` |
| int4, odd `in` (per-channel) or odd B | int8 `[out, in]` / `[in/B, B, out]` holding [-8, 7] (unpacked: the values do not pair up into bytes) | as above |
| fp8 (`weight_format="fp8"`) | float8_e4m3fn, int8's shapes | `weight_scaler` only |
| fp4 (`weight_format="fp4"`) | uint8 e2m1 codes packed as int4 (even `in` / B) | `weight_scaler` only |

The float formats (API.md section 7) are symmetric: no `zero_point` buffer,
whatever `is_symmetric` says, and a zero point given to them is refused. An
fp8 weight survives ``model.to(torch.bfloat16)`` / ``.half()``: those cast
floating buffers, and the module casts it back to float8_e4m3fn, exactly
(every e4m3 value is a bfloat16 and a float16).

`zero_point` exists when ``is_symmetric=False`` (torch_xla's default), or once
one is loaded into a symmetric module (torch_xla's module uses it too).

On CPU the module keeps its weight prepared for the C++ kernels
(`torch_bridge._cpu_ops.PreparedWeight`: float32 scales, packed nibbles),
made when the weight is loaded and after `.to()`; a forward that needs no
gradient then goes straight to the kernels. The state_dict is always the
buffers above.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import xla_qops
from torch_bridge import _cpu_ops
from torch_bridge import _jax_interop as interop
from torch_bridge import checks
from torch_bridge import op as _op
from torch_bridge import rotation


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
      weight_format: the weight's element format (API.md section 7): None
        (int4 with `int4_weight`, else int8), "int8", "int4", "fp8" or "fp4".
        The float formats are symmetric (no zero point, `is_symmetric`
        ignored); fp4 sets `int4_weight` (4-bit values).
      activation_format: with `quantize_activation`, "int8" or "fp8"; None
        means int8 for int weights, fp8 for float weights.
    """

    def __init__(self, input_dim, output_dim, is_symmetric: bool = False, block_size: int = -1,
                 int4_weight: bool = False, quantize_activation: bool = False,
                 bias: bool = False, *, impl: str = "auto", weight_format: str | None = None,
                 activation_format: str | None = None):
        super().__init__()
        weight_format, activation_format = checks.formats(
            weight_format, activation_format, int4_weight, bool(quantize_activation))
        spec = checks.linear_config(input_dim, output_dim, block_size, int4_weight,
                                    weight_format)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.weight_format = weight_format
        self.activation_format = activation_format
        float_weight = weight_format in ("fp8", "fp4")
        self.is_symmetric = bool(is_symmetric) or float_weight
        self.block_size = block_size
        self.int4_weight = weight_format in ("int4", "fp4")
        self.quantize_activation = bool(quantize_activation)
        xla_qops.dispatch.check_impl(impl)
        self.impl = impl
        self.packed = spec.packed
        weight_dtype = (torch.float8_e4m3fn if weight_format == "fp8"
                        else torch.uint8 if spec.packed else torch.int8)
        self.register_buffer("weight", torch.zeros(spec.weight_shape, dtype=weight_dtype))
        self.register_buffer("weight_scaler", torch.zeros(spec.scale_shape))
        self.register_buffer("zero_point",
                             None if self.is_symmetric else torch.zeros(spec.scale_shape))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_dim))
        else:
            self.register_parameter("bias", None)
        # Optional float32 [in] multiplier of x (set_input_scale): where
        # quantize_model's smoothing or AWQ scales could not be folded into
        # the op producing x. None: not in the state_dict, no cost.
        self.register_buffer("input_scale", None)
        # Optional Hadamard rotation of x (set_input_rotation): its block size
        # (an int64 scalar, in the state_dict) and the block itself (derived,
        # not saved). None: no cost.
        self.register_buffer("input_rotation", None)
        self.register_buffer("_hadamard", None, persistent=False)
        self._prepare()

    @property
    def scheme(self) -> str:
        """'w8a16', 'w4a16', 'w8a8', 'w4a8'; with float formats 'w8a16-fp8', 'w8a8-fp8',
        'w4a16-fp4', 'w4a8-fp4', 'w4a8-fp8' (int4 weights, fp8 activations), ..."""
        return checks.scheme_name(self.weight_format, self.activation_format)

    @property
    def float_weight(self) -> bool:
        return self.weight_format in ("fp8", "fp4")

    def _op_formats(self) -> dict:
        """The op's format arguments; none for the int formats with int8 activations (the
        default schema, torch_xla's)."""
        if self.float_weight or self.activation_format == "fp8":
            return dict(weight_format=self.weight_format,
                        activation_format=self.activation_format)
        return {}

    def load_quantized_weight(self, weight, weight_scaler=None, zero_point=None):
        """Stores a quantized weight (torch_xla-compatible).

        Args:
          weight: int8 `[out, in]` per-channel or `[in/B, B, out]` blockwise;
            for int4 modules unpacked int4 (int8 in [-8, 7], packed here) or
            packed uint8 `[out, in/2]` / `[in/B, B/2, out]`; for fp8 modules
            float8_e4m3fn like int8; for fp4 modules packed e2m1 codes, uint8
            or torch.float4_e2m1fn_x2 (stored as uint8). An
            `xla_qops.QuantizedWeight` may be passed instead, alone (its
            format must be the module's).
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
            if qw.weight_format in ("fp8", "fp4") or self.float_weight:
                if qw.weight_format != self.weight_format:
                    raise ValueError(f"weight: this module holds weight_format="
                                     f"{self.weight_format!r}, the QuantizedWeight "
                                     f"{qw.weight_format!r}")
            weight, weight_scaler = _torch_array(qw.w), interop.to_torch(qw.scale)
            zero_point = None if qw.zero_point is None else interop.to_torch(qw.zero_point)
        needs_packing = checks.quantized_weight(self, weight, weight_scaler, zero_point)
        if interop.is_float4_x2(weight):
            weight = weight.view(torch.uint8)  # the same bytes
        if needs_packing:  # on the host, once
            weight = _cpu_ops.pack_int4(weight.cpu(), self.block_size != -1).to(weight.device)
        if zero_point is not None and self.is_symmetric:
            self.is_symmetric = False  # torch_xla's module stores and uses it too
        if zero_point is None and not self.is_symmetric:
            zero_point = torch.zeros_like(weight_scaler)
        # CPU buffers JAX cannot alias would be copied on every call.
        weight, weight_scaler = interop.aligned(weight), interop.aligned(weight_scaler)
        zero_point = None if zero_point is None else interop.aligned(zero_point)
        self.weight = weight
        self.weight_scaler = weight_scaler
        self.zero_point = zero_point
        self._prepare()

    def set_input_scale(self, scale) -> None:
        """Multiplies every input by `scale` (float `[in]`, per input feature) before
        the quantized matmul, in float32, rounded once to x's dtype; None removes it.
        (quantize_model uses it for a per-channel scale it could not fold.)"""
        if scale is not None:
            scale = torch.as_tensor(scale)
            if scale.shape != (self.input_dim,) or not scale.is_floating_point():
                raise ValueError(f"scale: expected a float [{self.input_dim}] (input_dim), got "
                                 f"{scale.dtype} {list(scale.shape)}")
            if not bool(torch.isfinite(scale).all()):
                raise ValueError("scale: expected finite values")
            scale = scale.detach().to(self.weight.device, torch.float32)
        self.input_scale = scale

    def set_input_rotation(self, block) -> None:
        """Multiplies every input by a block-diagonal Hadamard matrix H (normalised
        Sylvester blocks of `block` features, a power of two dividing input_dim) before
        the quantized matmul, after `input_scale`, in float32, rounded once to x's
        dtype; None removes it. The weight must hold W H (`torch_bridge.rotation`):
        quantize_model's ``smoothing="hadamard"`` does both."""
        if block is None:
            self.input_rotation = self._hadamard = None
            return
        block = rotation.check_block(block, self.input_dim)
        device = self.weight.device
        self.input_rotation = torch.tensor(block, dtype=torch.int64, device=device)
        self._hadamard = torch.from_numpy(rotation.hadamard(block)).to(device, torch.float32)

    @classmethod
    def from_float(cls, linear, *, bits: int = 8, block_size: int = -1, symmetric: bool = True,
                   quantize_activation: bool = False, impl: str = "auto", format: str = "int",
                   activation_format: str | None = None):
        """Quantizes an `nn.Linear` (round-to-nearest, xla_qops.quantize_weight).

        Scales and zero points are float32 whatever the linear's dtype; the
        bias keeps its dtype and is added in the activation dtype. The result
        lives on the linear's device. `format`: quantize_weight's, "int"
        (`bits` 8 or 4), "fp8", "mxfp4" (B defaults to 32) or "nvfp4" (B 16);
        `activation_format`: with `quantize_activation`, "int8" or "fp8"
        (None: int8 for int weights, fp8 for float weights).
        """
        checks.float_linear(linear)
        checks.bits(bits)
        xla_qops.dispatch.check_impl(impl)
        w = linear.weight.detach().to("cpu", torch.float32)
        if format != "int":
            # quantize_weight checks format, bits, block_size and symmetric.
            qw = xla_qops.quantize_weight(w.numpy(), bits=bits, block_size=block_size,
                                          symmetric=symmetric, format=format)
            checks.formats(qw.weight_format, activation_format, False, quantize_activation)
        else:
            checks.formats(None, activation_format, bits == 4, quantize_activation)
            # Checked before the (costly) quantization; says whether int4 packs.
            spec = checks.linear_config(linear.in_features, linear.out_features, block_size,
                                        bits == 4)
            # xla_qops.quantize_weight computes on the host (numpy), so the scales
            # are bit-identical to a JAX caller's, eager or jitted.
            qw = xla_qops.quantize_weight(interop.to_jax(w), bits=bits, block_size=block_size,
                                          symmetric=symmetric, pack=spec.packed)
        return cls.from_quantized(qw, quantize_activation=quantize_activation, bias=linear.bias,
                                  device=linear.weight.device, impl=impl,
                                  activation_format=activation_format)

    @classmethod
    def from_quantized(cls, qw, *, quantize_activation: bool = False, bias=None,
                       input_scale=None, device=None, impl: str = "auto",
                       activation_format: str | None = None):
        """A module holding the `xla_qops.QuantizedWeight` `qw` (packed or not; any
        format: int8, int4, fp8, fp4).

        Its configuration is qw's: bits, format, block size, symmetric exactly
        when qw has no zero point. `activation_format`: with
        `quantize_activation`, "int8" or "fp8" (None: int8 for int weights,
        fp8 for float weights). `bias`: a float tensor `[out]` or None, copied
        into a parameter that keeps its dtype and requires_grad.
        `input_scale`: see `set_input_scale`. `device`: where the module
        lives (None: the host, where qw's arrays are).
        """
        if not isinstance(qw, xla_qops.QuantizedWeight):
            raise TypeError(f"qw: expected an xla_qops.QuantizedWeight, got {type(qw).__name__}")
        float_weight = qw.weight_format in ("fp8", "fp4")
        module = cls(qw.in_features, qw.out_features, is_symmetric=qw.zero_point is None,
                     block_size=qw.block_size, int4_weight=qw.bits == 4,
                     quantize_activation=quantize_activation, bias=bias is not None, impl=impl,
                     weight_format=qw.weight_format if float_weight else None,
                     activation_format=activation_format)
        module.load_quantized_weight(qw)
        if bias is not None:
            module.bias = torch.nn.Parameter(bias.detach().to("cpu").clone(),
                                             requires_grad=bias.requires_grad)
        if input_scale is not None:
            module.set_input_scale(input_scale)
        return module if device is None else module.to(device)

    # ------------------------------------------------------------------ prepared weight

    def _prepare(self):
        """Makes the C++ kernels' form of the weight (CPU buffers only), once per
        load: on `load_quantized_weight`, after `.to()` and friends, on unpickling."""
        self._x_checked = set()  # x signatures validated against this weight
        self._cpu = None
        spec = dataclasses.replace(
            checks.linear_config(self.input_dim, self.output_dim, self.block_size,
                                 self.int4_weight, self.weight_format),
            quantize_activation=self.quantize_activation,
            activation_format=self.activation_format)
        self._spec = spec
        if (self.weight.device.type == "cpu" and _cpu_ops.available()
                and _op.direct_supports(spec)):
            self._cpu = _cpu_ops.prepare(self.weight, self.weight_scaler, self.zero_point, spec)
        return self._cpu

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        weight = self._buffers.get("weight")
        if (self.weight_format == "fp8" and weight is not None
                and weight.dtype != torch.float8_e4m3fn):
            # Module.to(dtype) / .half() cast every floating buffer; e4m3 values are
            # exact in the wider float types, so casting back restores the bits.
            self._buffers["weight"] = weight.to(torch.float8_e4m3fn)
        self._prepare()  # the buffers may have moved or changed dtype
        return result

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_cpu", None)  # rebuilt from the buffers on unpickling
        state.pop("_x_checked", None)
        state.pop("_spec", None)
        return state

    def __setstate__(self, state):
        # Modules pickled before the float formats: int formats, derived as then.
        state.setdefault("weight_format", "int4" if state.get("int4_weight") else "int8")
        state.setdefault("activation_format",
                         "int8" if state.get("quantize_activation") else None)
        super().__setstate__(state)
        self._prepare()

    def _check_x(self, x):
        """The op's validation of `x` against this weight (the forward runs it
        once per x signature: dtype, features)."""
        _op.check(x, self.weight, self.weight_scaler, self.zero_point, self.block_size,
                  self.int4_weight, self.quantize_activation, self.impl, self.weight_format,
                  self.activation_format)
        self._x_checked.add((x.dtype, x.shape[-1:]))

    # ------------------------------------------------------------------ forward

    def forward(self, x):
        input_scale = self._buffers["input_scale"]
        if input_scale is not None:
            x = (x.float() * input_scale).to(x.dtype)
        prepared = self._cpu
        direct = (prepared is not None and x.device.type == "cpu"
                  and self.impl in _cpu_ops.DIRECT_IMPLS
                  and not (x.requires_grad and torch.is_grad_enabled()))
        hadamard = self._buffers["_hadamard"]
        if hadamard is not None:
            if (direct and not torch.compiler.is_compiling()
                    and x.numel() <= rotation.KERNEL_ELEMENTS):
                x = _cpu_ops.hadamard_rows(x, hadamard.shape[0])
            else:
                x = rotation.rotate_input(x, hadamard)
        if direct:
            # Straight to the kernels (no autograd needed). Under torch.compile
            # the operator's fake kernel validates x instead, and the graph
            # holds the prepared tensors.
            if not torch.compiler.is_compiling():
                buffers = self._buffers  # (not self.weight: Module.__getattr__ is slow)
                if not prepared.is_current(buffers["weight"], buffers["weight_scaler"],
                                           buffers["zero_point"]):
                    prepared = self._prepare()  # buffers edited in place or reassigned
                if (x.dtype, x.shape[-1:]) not in self._x_checked:
                    self._check_x(x)
            y = _op.direct_matmul(x, prepared, self._spec)
        elif self.impl == "auto":
            y = torch.ops.xla.quantized_matmul(
                x, self.weight, self.weight_scaler, self.zero_point, block_size=self.block_size,
                int4_weight=self.int4_weight, quantize_activation=self.quantize_activation,
                **self._op_formats())
        else:
            y = torch.ops.xla.quantized_matmul(
                x, self.weight, self.weight_scaler, self.zero_point, block_size=self.block_size,
                int4_weight=self.int4_weight, quantize_activation=self.quantize_activation,
                impl=self.impl, **self._op_formats())
        bias = self._parameters["bias"]
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Quantized tensors go through load_quantized_weight (validation, int4
        # packing, dtype kept: an exact round trip) instead of copy_ into the
        # current buffers, which would cast them; they land on the module's
        # current device. The bias is copied like nn.Linear's.
        device = self.weight.device
        # A symmetric module takes a zero point too (load_quantized_weight).
        has_zero_point = not self.is_symmetric or prefix + "zero_point" in state_dict
        names = ["weight", "weight_scaler"] + (["zero_point"] if has_zero_point else [])
        if self.bias is not None:
            names.append("bias")
        found = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        missing_keys.extend(prefix + n for n in names if n not in found)
        if self.input_scale is not None or prefix + "input_scale" in state_dict:
            names.append("input_scale")  # optional: present when the module uses one
            if prefix + "input_scale" in state_dict:
                try:
                    self.set_input_scale(state_dict[prefix + "input_scale"])
                except ValueError as e:
                    error_msgs.append(f"While loading {prefix or 'the module'}: input_{e}")
            else:
                missing_keys.append(prefix + "input_scale")
        if self.input_rotation is not None or prefix + "input_rotation" in state_dict:
            names.append("input_rotation")  # optional, as input_scale
            if prefix + "input_rotation" in state_dict:
                value = state_dict[prefix + "input_rotation"]
                try:
                    if not isinstance(value, torch.Tensor) or value.numel() != 1:
                        raise ValueError(f"expected one int (the block size), got {value!r}")
                    self.set_input_rotation(int(value.item()))
                except (TypeError, ValueError) as e:
                    error_msgs.append(f"While loading {prefix or 'the module'}: "
                                      f"input_rotation: {e}")
            else:
                missing_keys.append(prefix + "input_rotation")
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
        if self.weight_format == "fp8":
            parts.append("fp8 (float8_e4m3fn)")
        elif self.weight_format == "fp4":
            parts.append("fp4 (e2m1 packed)")
        elif self.int4_weight:
            parts.append("int4 packed" if self.packed else
                         "int4 unpacked (int8; odd group size, nibbles cannot pair)")
        if self.impl != "auto":
            parts.append(f"impl={self.impl!r}")
        if self.input_scale is not None:
            parts.append("input_scale")
        if self.input_rotation is not None:
            parts.append(f"input_rotation=hadamard({int(self.input_rotation)})")
        return ", ".join(parts)


def _torch_array(a) -> torch.Tensor:
    """A QuantizedWeight's weight array as a torch tensor, dtype kept: DLPack where it
    can, the bytes (viewed back as float8_e4m3fn) for fp8, which DLPack cannot carry."""
    if np.dtype(a.dtype).name == "float8_e4m3fn":
        raw = np.array(a).view(np.uint8)  # a copy: torch wants a writable array
        return torch.from_numpy(raw).view(torch.float8_e4m3fn)
    return interop.to_torch(a)
