"""The one place where `quantized_matmul` arguments are checked.

`check_args` turns the user's arguments into a `MatmulSpec`: a small, hashable,
static description of the problem that every backend receives. Backends never
re-validate; anything they are given has passed through here, so a bad input
fails at trace time with a message naming the argument, the expected and the
actual shape or dtype, instead of failing deep inside XLA.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

ACTIVATION_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class MatmulSpec:
    """Static facts about one quantized matmul, shared by all backends.

    Attributes:
      in_features: K, the contraction size (x.shape[-1]).
      out_features: N.
      block_size: B for blockwise weights, -1 for per-channel.
      bits: 8 or 4.
      packed: int4 stored two per byte (uint8); False for int8 containers.
      has_zero_point: whether `zero_point` is given.
      quantize_activation: W8A8 / W4A8 (int8 activations, int32 accumulation).
      x_dtype: activation dtype name; the result has this dtype.
    """

    in_features: int
    out_features: int
    block_size: int
    bits: int
    packed: bool
    has_zero_point: bool
    quantize_activation: bool
    x_dtype: str

    @property
    def blockwise(self) -> bool:
        return self.block_size != -1

    @property
    def n_blocks(self) -> int:
        return self.in_features // self.block_size if self.blockwise else 1

    @property
    def scheme(self) -> str:
        """'w8a16', 'w4a16', 'w8a8' or 'w4a8'."""
        return f"w{self.bits}a{8 if self.quantize_activation else 16}"

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


def check_args(x, w, scale, zero_point, block_size, int4_weight,
               quantize_activation) -> MatmulSpec:
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

    # w dtype decides the storage form.
    w_dtype = np.dtype(w.dtype)
    if w_dtype == np.uint8:
        if not int4_weight:
            raise TypeError("w: uint8 is the packed int4 form and needs int4_weight=True; "
                            "int8 weights must be int8, got uint8 with int4_weight=False")
        packed, bits = True, 4
    elif w_dtype == np.int8:
        packed, bits = False, (4 if int4_weight else 8)
    else:
        raise TypeError(f"w: expected int8 (int8 weights, or unpacked int4 with "
                        f"int4_weight=True) or uint8 (packed int4), got {w_dtype.name}")

    if packed:
        if in_features % 2:
            raise ValueError(f"x: packed int4 weights need an even number of input "
                             f"features, got in={in_features}")
        if blockwise and block_size % 2:
            raise ValueError(f"block_size: packed int4 weights pack pairs inside a "
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
                      x_dtype=_dtype_name(x))

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
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16 or "
                            f"float16), got {_dtype_name(arr)}")
        if tuple(arr.shape) != spec.scale_shape:
            what = "[in/B, out]" if blockwise else "[out]"
            raise ValueError(f"{name}: expected shape {_shape_str(spec.scale_shape)} "
                             f"{what} to match w {_shape_str(w.shape)}, got "
                             f"{_shape_str(arr.shape)}")
    return spec
