"""The one place for torch-surface checks of modules and model swaps.

The op's own arguments are checked by xla_qops.spec.check_args (via
torch_bridge.op); this module checks what only exists at the torch level:
an `XlaQuantizedLinear`'s configuration, the tensors loaded into it, the
module given to `from_float` and the arguments of `quantize_model`. Every
error names the argument and gives the expected and the actual value.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from xla_qops import spec as matmul_spec
from xla_qops.quantizers import rotation
from xla_qops.schemes import SCHEMES, Scheme, float_format_problem  # noqa: F401  (SCHEMES)
from xla_qops.spec import FLOAT_WEIGHT_FORMATS, MatmulSpec

FLOAT4_X2 = getattr(torch, "float4_e2m1fn_x2", None)


def scheme_name(weight_format: str, activation_format: Optional[str]) -> str:
    """A module's scheme: 'w8a16', ... for the int formats, else the quantize_model
    scheme it matches ('w8a16-fp8', 'w8a8-fp8', 'w4a8-fp8'; fp4 weights 'w4a16-fp4',
    'w4a8-fp4'), else 'w<bits>a8-<weight>/<activation>'."""
    bits = 8 if weight_format in ("int8", "fp8") else 4
    base = f"w{bits}a{16 if activation_format is None else 8}"
    if weight_format.startswith("int"):
        if activation_format in (None, "int8"):
            return base
        return f"{base}-{activation_format}"  # int weights, fp8 activations
    if activation_format in (None, "fp8"):
        return f"{base}-{weight_format}"
    return f"{base}-{weight_format}/{activation_format}"


def formats(weight_format, activation_format, int4_weight, quantize_activation
            ) -> tuple[str, Optional[str]]:
    """(weight format, activation format) of a module configuration, resolved as
    `xla_qops.quantized_matmul` resolves them (API.md section 7)."""
    matmul_spec.check_format_names(weight_format, activation_format, quantize_activation)
    if weight_format is None:
        weight_format = "int4" if int4_weight else "int8"
    elif int4_weight and weight_format in ("int8", "fp8"):
        raise ValueError(f"int4_weight: True says 4-bit values, but weight_format="
                         f"{weight_format!r} is 8-bit; pass int4_weight=False")
    return weight_format, matmul_spec.default_activation_format(weight_format, activation_format,
                                                         quantize_activation)


def _shape(t) -> str:
    return "[" + ", ".join(str(int(d)) for d in t) + "]"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def linear_config(input_dim, output_dim, block_size, int4_weight,
                  weight_format: Optional[str] = None) -> MatmulSpec:
    """Checks an XlaQuantizedLinear configuration; returns its storage spec.

    The spec's `weight_shape` / `scale_shape` are the buffer layouts (API.md
    sections 2 and 7). int4 is stored packed two per byte along the input
    features where they pair up (even `input_dim` per-channel, even block
    size), and unpacked in an int8 container (torch_xla's form) where they do
    not. fp8 is stored like int8 (float8_e4m3fn); fp4 only packed (uint8), so
    its pairs must fit.
    """
    weight_format, _ = formats(weight_format, None, int4_weight, False)
    for name, v in (("input_dim", input_dim), ("output_dim", output_dim)):
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not _is_int(block_size):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if block_size != -1 and (block_size <= 0 or input_dim % block_size):
        raise ValueError(f"block_size: expected -1 (per-channel) or a positive divisor of "
                         f"input_dim={input_dim}, got {block_size}")
    group = input_dim if block_size == -1 else block_size
    if weight_format == "fp4" and group % 2:
        what = "input_dim" if block_size == -1 else "block_size"
        raise ValueError(f"{what}: fp4 (e2m1) codes are stored packed two per byte along the "
                         f"input features, so {what} must be even, got {group}")
    four = weight_format in ("int4", "fp4")
    return MatmulSpec(in_features=input_dim, out_features=output_dim, block_size=block_size,
                      bits=4 if four else 8, packed=four and group % 2 == 0,
                      has_zero_point=False, quantize_activation=False, x_dtype="float32",
                      weight_format=weight_format)


def quantized_weight(module, weight, weight_scaler, zero_point):
    """Checks tensors for `XlaQuantizedLinear.load_quantized_weight`.

    Accepted weights (API.md section 2): int8 `[out, in]` / `[in/B, B, out]`;
    int4 modules take torch_xla's unpacked form (int8 holding [-8, 7], same
    shapes) and, where int4 is stored packed (`linear_config`), the packed
    form (uint8, `[out, in/2]` / `[in/B, B/2, out]`). A zero point is
    accepted by a module built with is_symmetric=True too, as torch_xla's
    module does (the module then uses it).

    Returns:
      True if `weight` is unpacked int4 and must be packed before storing.
    """
    where = (f"XlaQuantizedLinear(input_dim={module.input_dim}, output_dim={module.output_dim}, "
             f"block_size={module.block_size}, int4_weight={module.int4_weight}"
             + (f", weight_format={module.weight_format!r})"
                if module.weight_format in FLOAT_WEIGHT_FORMATS else ")"))
    for name, t in (("weight", weight), ("weight_scaler", weight_scaler),
                    ("zero_point", zero_point)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if weight_scaler is None:
        raise TypeError("weight_scaler: required (or pass an xla_qops.QuantizedWeight as weight)")
    for name, t in (("weight_scaler", weight_scaler), ("zero_point", zero_point)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name}: expected a tensor on {weight.device} like weight, "
                             f"got one on {t.device}")

    storage = linear_config(module.input_dim, module.output_dim, module.block_size,
                            module.int4_weight, module.weight_format)
    unpacked_shape = dataclasses.replace(storage, packed=False).weight_shape
    needs_packing = False
    if module.weight_format in FLOAT_WEIGHT_FORMATS:
        _float_weight(module.weight_format, where, weight, zero_point, storage)
    elif module.int4_weight:
        if storage.packed and weight.dtype == torch.uint8 and tuple(weight.shape) == storage.weight_shape:
            pass
        elif weight.dtype == torch.int8 and tuple(weight.shape) == unpacked_shape:
            needs_packing = storage.packed
        elif not storage.packed and weight.dtype == torch.uint8:
            what = "input_dim" if module.block_size == -1 else "block_size"
            raise TypeError(f"weight: {where} has an odd {what}, so its int4 values cannot pair "
                            f"up into bytes; pass them unpacked as int8 "
                            f"{_shape(unpacked_shape)}, got uint8 {_shape(weight.shape)}")
        else:
            kind = "uint8" if weight.dtype == torch.uint8 else "int8"
            expected = _shape(storage.weight_shape if kind == "uint8" else unpacked_shape)
            if weight.dtype not in (torch.uint8, torch.int8):
                packed_form = (f"packed int4 as uint8 {_shape(storage.weight_shape)} or "
                               if storage.packed else "")
                raise TypeError(f"weight: {where} expects {packed_form}unpacked int4 as int8 "
                                f"{_shape(unpacked_shape)}, got {weight.dtype}")
            raise ValueError(f"weight: {where} expects {kind} weights of shape {expected}, "
                             f"got {_shape(weight.shape)}")
        if weight.dtype == torch.int8:
            lo, hi = int(weight.min()), int(weight.max())
            if lo < -8 or hi > 7:
                raise ValueError(f"weight: int4 values stored as int8 must lie in [-8, 7], "
                                 f"got values in [{lo}, {hi}]")
    else:
        if weight.dtype != torch.int8:
            raise TypeError(f"weight: {where} expects int8 weights, got {weight.dtype}")
        if tuple(weight.shape) != unpacked_shape:
            raise ValueError(f"weight: {where} expects shape {_shape(unpacked_shape)}, "
                             f"got {_shape(weight.shape)}")

    layout = "[in/B, out]" if module.block_size != -1 else "[out]"
    for name, t in (("weight_scaler", weight_scaler), ("zero_point", zero_point)):
        if t is None:
            continue
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16 or "
                            f"float16), got {t.dtype}")
        if tuple(t.shape) != storage.scale_shape:
            raise ValueError(f"{name}: {where} expects shape {_shape(storage.scale_shape)} "
                             f"{layout}, got {_shape(t.shape)}")
    return needs_packing


def _float_weight(weight_format, where, weight, zero_point, storage) -> None:
    """fp8: float8_e4m3fn like int8's shapes; fp4: uint8 (or float4_e2m1fn_x2) packed."""
    if zero_point is not None:
        raise ValueError(f"zero_point: {where} holds a float format, which is symmetric "
                         f"(API.md section 7: zero_point None), got a tensor of shape "
                         f"{_shape(zero_point.shape)}")
    if weight_format == "fp8":
        if weight.dtype != torch.float8_e4m3fn:
            raise TypeError(f"weight: {where} expects torch.float8_e4m3fn weights, got "
                            f"{weight.dtype}")
    else:
        fp4_dtypes = (torch.uint8,) + ((FLOAT4_X2,) if FLOAT4_X2 is not None else ())
        if weight.dtype not in fp4_dtypes:
            raise TypeError(f"weight: {where} expects e2m1 codes packed two per byte as "
                            f"uint8 (or torch.float4_e2m1fn_x2), got {weight.dtype}")
    if tuple(weight.shape) != storage.weight_shape:
        raise ValueError(f"weight: {where} expects shape {_shape(storage.weight_shape)}, "
                         f"got {_shape(weight.shape)}")


def float_linear(linear) -> None:
    """Checks the module given to `XlaQuantizedLinear.from_float`."""
    if not isinstance(linear, torch.nn.Linear):
        raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
    if not linear.weight.dtype.is_floating_point:
        raise TypeError(f"linear: expected a floating weight, got {linear.weight.dtype}")
    if linear.weight.device.type == "meta":
        raise ValueError("linear: the weight is on the meta device (no values to quantize); "
                         "materialize the model first")
    n_bad = int((~torch.isfinite(linear.weight.detach())).sum())
    if n_bad:
        raise ValueError(f"linear: expected a finite weight, found {n_bad} NaN/inf entries")


def bits(value) -> int:
    if value not in (8, 4) or isinstance(value, bool):
        raise ValueError(f"bits: expected 8 or 4, got {value!r}")
    return value


def scheme(value) -> Scheme:
    """'w8a16' -> its `Scheme`."""
    if not isinstance(value, str) or value not in SCHEMES:
        ints = [n for n, s in SCHEMES.items() if s.format == "int" and "-" not in n]
        floats = [n for n in SCHEMES if n not in ints]
        raise ValueError(f"scheme: expected one of {', '.join(map(repr, ints))}, got {value!r} "
                         f"(or, with float element formats, one of "
                         f"{', '.join(map(repr, floats))})")
    return SCHEMES[value]


def block_size(value) -> int:
    if not _is_int(value):
        raise TypeError(f"block_size: expected an int, got {type(value).__name__}")
    if value != -1 and value <= 0:
        raise ValueError(f"block_size: expected -1 (per-channel) or a positive int, got {value}")
    return value


SMOOTHING = ("smoothquant", "hadamard")


def scheme_arguments(spec: Scheme, name: str, symmetric: bool, method: str,
                     block_size: int = -1) -> None:
    """quantize_model's `symmetric`, `method` and `block_size` for a float-format scheme
    (xla_qops.schemes.float_format_problem states the rules)."""
    problem = float_format_problem(spec.format, subject=f"scheme={name!r}",
                                   block_size=block_size, symmetric=symmetric, method=method)
    if problem:
        raise ValueError(problem)


def smoothing(value, alpha, scheme_name: str, quantize_activation: bool,
              calibration_given: bool, method: str = "rtn") -> None:
    """quantize_model's `smoothing` / `smoothing_alpha` (None: nothing to check)."""
    if value is None:
        return
    if value not in SMOOTHING:
        raise ValueError(f"smoothing: expected None, 'smoothquant' or 'hadamard', got {value!r}")
    if value == "hadamard":
        rotation.check_arguments(scheme_name, method)
        return
    if not quantize_activation:
        raise ValueError(f"smoothing: {value!r} is for schemes that quantize activations "
                         f"(w8a8, w4a8, w8a8-fp8, w4a8-fp8), got scheme={scheme_name!r}")
    if not calibration_given:
        raise ValueError("calibration: smoothing='smoothquant' needs calibration inputs, got None")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"smoothing_alpha: expected a number in [0, 1], got {alpha!r}")
