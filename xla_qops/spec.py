"""The one place where `quantized_matmul` arguments are checked.

`check_args` turns the user's arguments into a `MatmulSpec`: a small, hashable,
static description of the problem that every backend receives. Backends never
re-validate; anything they are given has passed through here, so a bad input
fails at trace time with a message naming the argument, the expected and the
actual shape or dtype, instead of failing deep inside XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

ACTIVATION_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Scales and zero points: float64 (a numpy default) becomes float32 as JAX
# takes it; the 8- and 4-bit float types are refused, no path reads them.
SCALE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, np.float64)
WEIGHT_FORMATS = ("int8", "int4", "fp8", "fp4")
FLOAT_WEIGHT_FORMATS = ("fp8", "fp4")
ACTIVATION_FORMATS = ("int8", "fp8")


class WeightFormatFacts:
    """What a `weight_format` attribute implies; shared by MatmulSpec and the
    checkpoints' LayerScheme (xla_qops.checkpoint)."""

    weight_format: str

    @property
    def float_weight(self) -> bool:
        return self.weight_format in FLOAT_WEIGHT_FORMATS


@dataclasses.dataclass(frozen=True)
class MatmulSpec(WeightFormatFacts):
    """Static facts about one quantized matmul, shared by all backends.

    Attributes:
      in_features: K, the contraction size (x.shape[-1]).
      out_features: N.
      block_size: B for blockwise weights, -1 for per-channel.
      bits: 8 or 4.
      packed: int4 stored two per byte (uint8); False for int8 containers.
      has_zero_point: whether `zero_point` is given.
      quantize_activation: W8A8 / W4A8 (activations quantized per token).
      x_dtype: activation dtype name; the result has this dtype.
      weight_format: the weight's element format, "int8", "int4", "fp8" or
        "fp4" (API.md section 7); derived from `bits` when not given.
      activation_format: with `quantize_activation`, "int8" (int32
        accumulation) or "fp8" (e4m3fn, float32 accumulation); None otherwise.
        Derived from the weight format when not given.
    """

    in_features: int
    out_features: int
    block_size: int
    bits: int
    packed: bool
    has_zero_point: bool
    quantize_activation: bool
    x_dtype: str
    weight_format: str = ""
    activation_format: Optional[str] = None

    def __post_init__(self):
        # Specs built before the float formats existed name only `bits`.
        fill_formats(self)

    @property
    def float_format(self) -> bool:
        """Any operand in a float element format (the int-only kernels decline these)."""
        return self.float_weight or self.activation_format == "fp8"

    @property
    def blockwise(self) -> bool:
        return self.block_size != -1

    @property
    def n_blocks(self) -> int:
        return self.in_features // self.block_size if self.blockwise else 1

    @property
    def scheme(self) -> str:
        """'w8a16', 'w4a16', 'w8a8' or 'w4a8'; with a float format, the formats
        follow ('w8a16-fp8', 'w4a8-fp4/fp8', 'w4a8-int4/fp8')."""
        base = f"w{self.bits}a{8 if self.quantize_activation else 16}"
        if not self.float_format:
            return base
        if self.activation_format is None:
            return f"{base}-{self.weight_format}"
        return f"{base}-{self.weight_format}/{self.activation_format}"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        k, n = self.in_features, self.out_features
        k_stored = k // 2 if self.packed else k
        if self.blockwise:
            b = self.block_size
            return (k // b, b // 2 if self.packed else b, n)
        return (n, k_stored)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        if self.blockwise:
            return (self.n_blocks, self.out_features)
        return (self.out_features,)


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _dtype_name(a) -> str:
    return np.dtype(a.dtype).name


def check_format_names(weight_format, activation_format, quantize_activation) -> None:
    """The format arguments' names and their pairing with `quantize_activation`
    (shared by the op and torch_bridge's module configuration)."""
    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format: expected None or one of "
                         f"{', '.join(map(repr, WEIGHT_FORMATS))}, got {weight_format!r}")
    if activation_format is not None and activation_format not in ACTIVATION_FORMATS:
        raise ValueError(f"activation_format: expected None or one of "
                         f"{', '.join(map(repr, ACTIVATION_FORMATS))}, got {activation_format!r}")
    if activation_format is not None and not quantize_activation:
        raise ValueError(f"activation_format: applies with quantize_activation=True (the "
                         f"activations are quantized on the fly), got "
                         f"activation_format={activation_format!r} with quantize_activation=False")


def default_activation_format(weight_format, activation_format, quantize_activation):
    """API.md section 7: None means int8 for int weights, fp8 for float ones."""
    if not quantize_activation:
        return None
    if activation_format is None:
        return "fp8" if weight_format in FLOAT_WEIGHT_FORMATS else "int8"
    return activation_format


def fill_formats(record) -> None:
    """Completes a frozen dataclass's `weight_format` (empty: int8/int4 from
    `bits`, as records made before the float formats) and `activation_format`
    (`default_activation_format`); MatmulSpec and checkpoint.LayerScheme."""
    if not record.weight_format:
        object.__setattr__(record, "weight_format", f"int{record.bits}")
    object.__setattr__(record, "activation_format", default_activation_format(
        record.weight_format, record.activation_format, record.quantize_activation))


def _check_formats(w, int4_weight, quantize_activation, zero_point, weight_format,
                   activation_format) -> tuple[str, Optional[str]]:
    """(weight_format, activation_format) after API.md section 7's inference rules."""
    check_format_names(weight_format, activation_format, quantize_activation)
    w_dtype = np.dtype(w.dtype)
    is_fp8_storage = w_dtype == np.dtype(jnp.float8_e4m3fn)
    if weight_format is None and not (is_fp8_storage or w_dtype in (np.int8, np.uint8)):
        raise TypeError(f"w: expected int8 (int8 weights, or unpacked int4 with "
                        f"int4_weight=True), float8_e4m3fn (fp8) or uint8 (packed int4), "
                        f"got {w_dtype.name}")
    named = weight_format is not None
    if not named:
        weight_format = "fp8" if is_fp8_storage else ("int4" if int4_weight else "int8")
    expected_dtype = {"int8": "int8", "int4": "int8 (unpacked) or uint8 (packed)",
                      "fp8": "float8_e4m3fn", "fp4": "uint8 (two e2m1 codes per byte)"}
    fits = {"int8": w_dtype == np.int8, "int4": w_dtype in (np.int8, np.uint8),
            "fp8": is_fp8_storage, "fp4": w_dtype == np.uint8}
    if named and not fits[weight_format]:  # an inferred int format: check_args' dtype rules
        raise TypeError(f"w: weight_format={weight_format!r} is stored as "
                        f"{expected_dtype[weight_format]}, got {w_dtype.name}")
    if weight_format == "int8" and int4_weight:
        raise ValueError("int4_weight: True says int4 values, but weight_format='int8'; "
                         "pass weight_format='int4' or int4_weight=False")
    if weight_format == "fp8" and int4_weight:
        raise ValueError("int4_weight: fp8 weights hold e4m3fn values, not int4; "
                         "pass int4_weight=False")
    if weight_format in FLOAT_WEIGHT_FORMATS and zero_point is not None:
        raise ValueError(f"zero_point: the float formats are symmetric (API.md section 7: "
                         f"zero_point None), got an array with weight_format={weight_format!r}")
    return weight_format, default_activation_format(weight_format, activation_format,
                                                    quantize_activation)


def check_args(x, w, scale, zero_point, block_size, int4_weight,
               quantize_activation, weight_format=None,
               activation_format=None) -> MatmulSpec:
    """Validates the arguments of `quantized_matmul` and returns their spec.

    Raises:
      TypeError: an argument has the wrong dtype or type.
      ValueError: an argument has the wrong rank or shape, or `block_size`
        does not fit the input features.
    """
    for name, arr in (("x", x), ("w", w), ("scale", scale)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise TypeError(f"{name}: expected an array, got {type(arr).__name__}")
    if zero_point is not None and not (hasattr(zero_point, "shape")
                                       and hasattr(zero_point, "dtype")):
        raise TypeError(
            f"zero_point: expected an array or None, got {type(zero_point).__name__}")
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    block_size = int(block_size)
    for name, flag in (("int4_weight", int4_weight),
                       ("quantize_activation", quantize_activation)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")

    # x: [..., in] floating.
    if x.ndim < 1:
        raise ValueError(f"x: expected rank >= 1 with shape [..., in], got shape {_shape_str(x.shape)}")
    if np.dtype(x.dtype) not in [np.dtype(d) for d in ACTIVATION_DTYPES]:
        raise TypeError(
            f"x: expected dtype bfloat16, float16 or float32, got {_dtype_name(x)}")
    in_features = int(x.shape[-1])

    # block_size.
    if block_size != -1:
        if block_size <= 0:
            raise ValueError(f"block_size: expected -1 (per-channel) or a positive "
                             f"divisor of in={in_features}, got {block_size}")
        if in_features % block_size:
            raise ValueError(f"block_size: expected a divisor of in={in_features} "
                             f"(x.shape[-1]), got {block_size}")
    blockwise = block_size != -1

    weight_format, activation_format = _check_formats(
        w, int4_weight, quantize_activation, zero_point, weight_format, activation_format)

    # w dtype decides the storage form.
    w_dtype = np.dtype(w.dtype)
    if weight_format == "fp8":
        packed, bits = False, 8
    elif weight_format == "fp4":
        packed, bits = True, 4
    elif w_dtype == np.uint8:
        if weight_format != "int4":
            raise TypeError("w: uint8 is the packed int4 form and needs int4_weight=True "
                            "(or weight_format='fp4' for e2m1 codes); int8 weights must be "
                            "int8, got uint8 with int4_weight=False")
        packed, bits = True, 4
    elif w_dtype == np.int8:
        packed, bits = False, (4 if weight_format == "int4" else 8)
    else:
        raise TypeError(f"w: expected int8 (int8 weights, or unpacked int4 with "
                        f"int4_weight=True) or uint8 (packed int4), got {w_dtype.name}")

    if packed:
        what = "fp4 (e2m1)" if weight_format == "fp4" else "int4"
        if in_features % 2:
            raise ValueError(f"x: packed {what} weights need an even number of input "
                             f"features, got in={in_features}")
        if blockwise and block_size % 2:
            raise ValueError(f"block_size: packed {what} weights pack pairs inside a "
                             f"block, so block_size must be even, got {block_size}")

    expected_rank = 3 if blockwise else 2
    layout = ("[in/B, B/2, out]" if packed else "[in/B, B, out]") if blockwise else (
        "[out, in/2]" if packed else "[out, in]")
    if w.ndim != expected_rank:
        raise ValueError(f"w: expected rank {expected_rank} {layout} for "
                         f"block_size={block_size}, got shape {_shape_str(w.shape)}")
    out_features = int(w.shape[-1] if blockwise else w.shape[0])

    spec = MatmulSpec(in_features=in_features, out_features=out_features,
                      block_size=block_size, bits=bits, packed=packed,
                      has_zero_point=zero_point is not None,
                      quantize_activation=bool(quantize_activation),
                      x_dtype=_dtype_name(x), weight_format=weight_format,
                      activation_format=activation_format)

    if tuple(w.shape) != spec.weight_shape:
        hint = ""
        if not packed and int4_weight:
            packed_form = dataclasses.replace(spec, packed=True).weight_shape
            if tuple(w.shape) == packed_form:
                hint = (" (this is the packed int4 shape: packed int4 must be stored "
                        "as uint8, int8 with int4_weight=True is the unpacked form)")
        raise ValueError(f"w: expected shape {_shape_str(spec.weight_shape)} {layout} "
                         f"for in={in_features} (x.shape[-1]), got "
                         f"{_shape_str(w.shape)}{hint}")

    for name, arr in (("scale", scale), ("zero_point", zero_point)):
        if arr is None:
            continue
        if np.dtype(arr.dtype) not in [np.dtype(d) for d in SCALE_DTYPES]:
            raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16 or "
                            f"float16), got {_dtype_name(arr)}")
        if tuple(arr.shape) != spec.scale_shape:
            what = "[in/B, out]" if blockwise else "[out]"
            raise ValueError(f"{name}: expected shape {_shape_str(spec.scale_shape)} "
                             f"{what} to match w {_shape_str(w.shape)}, got "
                             f"{_shape_str(arr.shape)}")
    return spec
