"""Round-to-nearest weight quantization and the `QuantizedWeight` container.

Convention (API.md section 1): ``w_float = scale * q - zero_point``.

* symmetric: ``scale = absmax / qmax`` per channel or block, no zero point.
* asymmetric: the group's [min, max] is mapped onto [qmin, qmax]:
  ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = scale * qmin - min``,
  so ``min`` dequantizes to itself and ``max`` to itself up to rounding.

Degenerate groups keep a finite scale: an all-zero group gets ``scale = 1``
(``q = 0``, ``zero_point = 0``, so it dequantizes to exact zeros), and a constant
non-zero group in asymmetric mode gets ``scale = |c| / qmax``.

Every step is one float32 IEEE operation, rounded once, computed with numpy
on the host (`_round_to_nearest`): ``q = round_half_even(w / scale)`` needs a
true division, and XLA rewrites a division by a broadcast scale into a
multiplication by its reciprocal (one ulp off, enough to move a .5 tie to the
other integer) and may fuse ``scale * qmin - lo`` into one FMA. On the host
the scales, zero points and integers are the same bits on every platform and
JAX version (tests/test_numerics.py pins them). Under `jax.jit` the same
numpy code runs through `jax.pure_callback`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import formats
from xla_qops import packing, quantizers, schemes
from xla_qops.quantizers import float_formats, heldout
from xla_qops.quantizers.grid import QRANGE as _QRANGE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized linear weight in API.md's layouts.

    Array leaves: `w`, `scale`, `zero_point` (None when symmetric).
    Static fields: `bits` (8 or 4), `block_size` (-1 per-channel), `packed`
    (4-bit values stored as uint8 pairs), `format` ("int", or the float
    element formats of API.md section 7: "fp8" with `w` float8_e4m3fn, "fp4"
    with `w` uint8 packed e2m1 codes; both symmetric).

    Layouts (`in` input features, `out` output features, B the block size):
      per-channel: w [out, in] (packed int4: [out, in/2]), scale/zero_point [out]
      blockwise:   w [in/B, B, out] (packed: [in/B, B/2, out]),
                   scale/zero_point [in/B, out]
    """

    w: jax.Array
    scale: jax.Array
    zero_point: Optional[jax.Array]
    bits: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    packed: bool = dataclasses.field(metadata=dict(static=True))
    format: str = dataclasses.field(default="int", metadata=dict(static=True))

    @property
    def int4_weight(self) -> bool:
        return self.bits == 4

    @property
    def weight_format(self) -> str:
        """`quantized_matmul`'s name for the element format: int8, int4, fp8 or fp4."""
        return f"int{self.bits}" if self.format == "int" else self.format

    @property
    def blockwise(self) -> bool:
        return self.block_size != -1

    @property
    def out_features(self) -> int:
        return self.w.shape[-1] if self.blockwise else self.w.shape[0]

    @property
    def in_features(self) -> int:
        axis = packing.input_axis(self.blockwise)
        stored = self.w.shape[0] * self.w.shape[1] if self.blockwise else self.w.shape[axis]
        return stored * 2 if self.packed else stored

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays held (weight, scale and zero point)."""
        arrays = [self.w, self.scale] + ([self.zero_point] if self.zero_point is not None else [])
        return int(sum(a.size * np.dtype(a.dtype).itemsize for a in arrays))

    def int_values(self) -> jax.Array:
        """The integer weight unpacked into int8, in the stored layout."""
        if self.format != "int":
            raise TypeError(f"int_values: a {self.format} weight holds float values; "
                            f"use values()")
        if self.packed:
            return packing.unpack_int4(self.w, packing.input_axis(self.blockwise))
        return self.w

    def values(self) -> jax.Array:
        """``value(q)`` (API.md section 7) as float32, unpacked, in the stored layout."""
        if self.format == "fp4":
            return formats.unpack_fp4(self.w, packing.input_axis(self.blockwise)).astype(
                jnp.float32)
        if self.format == "fp8":
            return self.w.astype(jnp.float32)
        return self.int_values().astype(jnp.float32)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight ``scale * value(q) - zero_point`` as ``[out, in]``."""
        q = self.values()
        scale = self.scale.astype(jnp.float32)
        zero = (0.0 if self.zero_point is None else self.zero_point.astype(jnp.float32))
        if self.blockwise:
            w = q * scale[:, None, :]
            if self.zero_point is not None:
                w = w - zero[:, None, :]
            w = w.reshape(-1, w.shape[-1]).T  # [in, out] -> [out, in]
        else:
            w = q * scale[:, None] - (zero[:, None] if self.zero_point is not None else 0.0)
        return w.astype(dtype)

    def pack(self) -> "QuantizedWeight":
        """The same weight with int4 values packed two per byte."""
        if self.packed or self.bits != 4:
            return self
        _check_pairs(self.w.shape[packing.input_axis(self.blockwise)], self.block_size)
        return dataclasses.replace(
            self, w=packing.pack_int4(self.w, packing.input_axis(self.blockwise)),
            packed=True)

    def unpack(self) -> "QuantizedWeight":
        """The same weight with int4 values in an int8 container (torch_xla's form)."""
        if self.format == "fp4":
            raise TypeError("unpack: fp4 codes are stored packed only (API.md section 7)")
        if not self.packed:
            return self
        return dataclasses.replace(self, w=self.int_values(), packed=False)


def _check_pairs(pairing_features: int, block_size: int) -> None:
    """int4 packs pairs along the input features (of each block): their count must be even."""
    if pairing_features % 2:
        what = "in" if block_size == -1 else "block_size"
        raise ValueError(f"pack: int4 values pack in pairs along the input features, but "
                         f"{what}={pairing_features} is odd; pass pack=False (int8 container)")


def _check_weight(w, bits, block_size, pack=False):
    if bits not in _QRANGE:
        raise ValueError(f"bits: expected 8 or 4, got {bits}")
    if not hasattr(w, "ndim") or w.ndim != 2:
        shape = getattr(w, "shape", None)
        raise ValueError(f"w: expected a float weight [out, in] (nn.Linear "
                         f"orientation), got shape {shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w: expected a floating dtype, got {np.dtype(w.dtype).name}")
    in_features = w.shape[1]
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if block_size != -1 and (block_size <= 0 or in_features % block_size):
        raise ValueError(f"block_size: expected -1 or a positive divisor of "
                         f"in={in_features}, got {block_size}")
    if not isinstance(w, jax.core.Tracer):
        # Only concrete weights can be inspected; under jit the check is skipped.
        finite = np.isfinite(np.asarray(w, np.float32))
        if not finite.all():
            raise ValueError(f"w: expected finite values, found {int((~finite).sum())} "
                             f"NaN/inf entries")
    if pack and bits == 4:
        _check_pairs(in_features if block_size == -1 else block_size, block_size)


def _round_to_nearest(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """(q int8, scale float32, zero_point float32 or None) of a float32 [out, in].

    numpy, so that each step is one correctly rounded float32 operation (see
    the module docstring). Layouts: per-channel q [out, in], scale [out];
    blockwise q [in/B, B, out], scale [in/B, out].
    """
    return quantizers.quantize(w, bits, block_size, symmetric, "rtn")


def _round_to_nearest_traced(w, bits: int, block_size: int, symmetric: bool):
    """`_round_to_nearest` under jit/vmap: the same numpy code, via a host callback."""
    out_features, in_features = w.shape
    groups = (out_features,) if block_size == -1 else (in_features // block_size, out_features)
    q_shape = ((out_features, in_features) if block_size == -1
               else (in_features // block_size, block_size, out_features))
    shapes = [jax.ShapeDtypeStruct(q_shape, jnp.int8), jax.ShapeDtypeStruct(groups, jnp.float32)]
    if not symmetric:
        shapes.append(jax.ShapeDtypeStruct(groups, jnp.float32))

    def host(w):
        q, scale, zero_point = _round_to_nearest(np.asarray(w, np.float32), bits, block_size,
                                                 symmetric)
        return (q, scale) if symmetric else (q, scale, zero_point)

    result = jax.pure_callback(host, tuple(shapes), w, vmap_method="sequential")
    return result if not symmetric else (*result, None)


def check_method(method, calibration_given: bool, allow_unused: bool = False,
                 calibration_is: str = "a float [n, in] sample of the layer's inputs",
                 methods: tuple = quantizers.METHODS) -> None:
    """`method` is one of `methods` (a whole model's callers pass
    `quantizers.MODEL_METHODS`), and calibration is given when (and, unless
    `allow_unused` because something else uses it, only when) it needs it;
    `calibration_is` says what the caller's calibration argument holds."""
    if not isinstance(method, str) or method not in methods:
        whole_model = (f" ({method!r} refines a torch model's blocks: "
                       f"torch_bridge.quantize_model or `xla-qops quantize`)"
                       if method in quantizers.BLOCK_METHODS else "")
        raise ValueError(f"method: expected one of {', '.join(map(repr, methods))}, "
                         f"got {method!r}{whole_model}")
    if method in quantizers.CALIBRATED and not calibration_given:
        raise ValueError(f"calibration: method={method!r} needs calibration inputs "
                         f"({calibration_is}), got None")
    if method not in quantizers.CALIBRATED and calibration_given and not allow_unused:
        raise ValueError(f"calibration: method={method!r} uses no calibration inputs; "
                         f"pass calibration=None (or method='gptq' / 'awq')")


def _check_calibration(calibration, in_features: int) -> np.ndarray:
    if isinstance(calibration, jax.core.Tracer):
        raise TypeError("calibration: expected concrete values (quantize outside jit), "
                        "got a tracer")
    x = np.asarray(calibration)
    if x.ndim < 2 or x.shape[-1] != in_features:
        raise ValueError(f"calibration: expected a float [n, in={in_features}] sample of the "
                         f"layer's inputs, got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) and x.dtype != jnp.bfloat16:
        raise TypeError(f"calibration: expected a floating dtype, got {x.dtype.name}")
    x = x.astype(np.float32).reshape(-1, in_features)
    if x.shape[0] == 0:
        raise ValueError("calibration: expected at least one sample row, got 0")
    if not np.isfinite(x).all():
        raise ValueError("calibration: expected finite values, found NaN/inf entries")
    return x


def quantize_with_hessian(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
                          method: str, hessian: np.ndarray | None,
                          pack: bool = True) -> QuantizedWeight:
    """`quantize_weight` of a concrete float32 ``[out, in]`` given ``X^T X`` of its inputs
    instead of the inputs (callers that accumulate it over many batches; inputs checked
    by the caller)."""
    q, scale, zero_point = (None if a is None else jnp.asarray(a) for a in quantizers.quantize(
        np.asarray(w, np.float32), bits, int(block_size), symmetric, method, hessian))
    return _quantized_weight(q, scale, zero_point, bits, block_size, pack)


def quantize_with_holdout(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
                          method: str, fit_hessian: np.ndarray,
                          holdout_hessian: np.ndarray | None, pack: bool = True):
    """(QuantizedWeight, HeldOutCheck or None): `quantize_with_hessian` with the per-layer
    fallback to round to nearest judged on held-out inputs (xla_qops.quantizers.heldout)."""
    (q, scale, zero_point), check = heldout.quantize_checked(
        np.asarray(w, np.float32), bits, int(block_size), symmetric, method, fit_hessian,
        holdout_hessian)
    q, scale, zero_point = (None if a is None else jnp.asarray(a) for a in (q, scale, zero_point))
    return _quantized_weight(q, scale, zero_point, bits, block_size, pack), check


def _quantized_weight(q, scale, zero_point, bits: int, block_size: int,
                      pack: bool) -> QuantizedWeight:
    """The unpacked result as a `QuantizedWeight`, int4 packed when `pack`."""
    result = QuantizedWeight(w=q, scale=scale, zero_point=zero_point, bits=bits,
                             block_size=int(block_size), packed=False)
    return result.pack() if (pack and bits == 4) else result


QUANTIZE_FORMATS = ("int",) + float_formats.FLOAT_FORMATS


def _check_format(fmt, bits, block_size, symmetric, pack, method) -> int:
    """Checks a float `format`'s arguments; returns its block size (MX/NV defaults)."""
    if not isinstance(fmt, str) or fmt not in QUANTIZE_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(map(repr, QUANTIZE_FORMATS))}, "
                         f"got {fmt!r}")
    width = 8 if fmt == "fp8" else 4
    # bits keeps its default (8) for the float formats; a contradicting width is refused.
    if bits not in (8, width):
        raise ValueError(f"bits: format={fmt!r} is {width}-bit, got bits={bits}")
    problem = schemes.float_format_problem(fmt, subject=f"format={fmt!r}", block_size=block_size,
                                           symmetric=symmetric, method=method)
    if problem:
        raise ValueError(problem)
    if width == 4 and not pack:
        raise ValueError(f"pack: format={fmt!r} stores e2m1 codes packed two per byte "
                         f"(API.md section 7), got pack=False")
    return schemes.format_block_size(fmt, block_size)


def quantize_float(w, fmt: str, block_size: int, method: str = "rtn", hessian=None, *,
                   nvfp4_divisor: bool = False) -> QuantizedWeight:
    """`quantize_weight` for the float formats of a concrete float32 ``[out, in]``, given
    ``X^T X`` of its inputs for the calibrated methods (arguments checked by the caller;
    block size resolved). `nvfp4_divisor`: NVFP4's tensor factor in compressed-tensors'
    divisor form (`xla_qops.quantizers.float_formats`), for an exact export there."""
    values, scale = quantizers.quantize_float(np.asarray(w, np.float32), fmt, int(block_size),
                                              method, hessian, nvfp4_divisor)
    q = float_formats.to_storage(values, fmt)
    if fmt == "fp8":
        return QuantizedWeight(w=jnp.asarray(q), scale=jnp.asarray(scale), zero_point=None,
                               bits=8, block_size=block_size, packed=False, format="fp8")
    codes = packing.pack_int4(q, packing.input_axis(block_size != -1))
    return QuantizedWeight(w=codes, scale=jnp.asarray(scale), zero_point=None, bits=4,
                           block_size=block_size, packed=True, format="fp4")


def quantize_weight(w, *, bits: int = 8, block_size: int = -1, symmetric: bool = True,
                    pack: bool = True, method: str = "rtn", calibration=None,
                    format: str = "int") -> QuantizedWeight:
    """Quantizes a float `[out, in]` weight (round-to-nearest unless `method` says otherwise).

    Args:
      w: float weight in torch `nn.Linear` orientation `[out, in]`.
      bits: 8 or 4.
      block_size: -1 for one scale per output channel, or B (dividing `in`)
        for one scale per output channel and block of B input features.
      symmetric: absmax scaling without zero point; otherwise min/max with a
        float zero point (``w = scale * q - zero_point``).
      pack: for bits=4, store two values per byte (uint8); needs an even `in`
        (per-channel) or B (blockwise), else pass False. Ignored for bits=8.
      method: "rtn" (round to nearest), "hqq" (half-quadratic optimisation
        of the grid, no data), "gptq" (error-compensating rounding with the
        inputs' Hessian) or "awq" (activation-aware clipping of each group's
        grid); see xla_qops.quantizers and docs/quantizers.md.
      calibration: for "gptq" and "awq", a float `[n, in]` sample of the
        layer's inputs (required); None otherwise.
      format: "int" (bits 8 or 4), or a float element format (API.md section
        7), symmetric, round to nearest even onto its grid: "fp8" (e4m3fn,
        scale amax / 448 per channel or block), "mxfp4" (e2m1, B defaults to
        32, power-of-two scales 2 ** (floor(log2(amax)) - 2)) or "nvfp4"
        (e2m1, B = 16, e4m3-representable block scales times one float32
        per-tensor factor, stored as one float32 per block); see
        `xla_qops.quantizers.float_formats`. The result's `format` is "int",
        "fp8" or "fp4". Float formats take method "rtn", "gptq" (each column
        rounded onto the format's grid) or "awq" (the format's scale of each
        clipped range); `xla_qops.schemes.float_format_problem` states the rules.

    Returns:
      A `QuantizedWeight`; scales and zero points are float32. Every method
      gives a plain weight in API.md's convention (AWQ's per-input-channel
      scaling, which needs a place for the inverse scale, is
      `torch_bridge.quantize_model`'s).
    """
    if format != "int":
        block_size = _check_format(format, bits, block_size, symmetric, pack, method)
        _check_weight(w, 8, block_size, pack)
        check_method(method, calibration is not None)
        if block_size == -1 and w.shape[1] % 2 and format != "fp8":
            raise ValueError(f"pack: e2m1 codes pack in pairs along the input features, but "
                             f"in={w.shape[1]} is odd")
        if isinstance(w, jax.core.Tracer):
            raise TypeError(f"w: format={format!r} quantizes concrete weights (outside jit); "
                            f"got a tracer")
        hessian = None
        if calibration is not None:
            hessian = quantizers.calibration_hessian(_check_calibration(calibration, w.shape[1]))
        return quantize_float(w, format, block_size, method, hessian)
    _check_weight(w, bits, block_size, pack)
    check_method(method, calibration is not None)
    if not isinstance(w, jax.core.Tracer):
        hessian = None
        if calibration is not None:
            hessian = quantizers.calibration_hessian(_check_calibration(calibration, w.shape[1]))
        return quantize_with_hessian(np.asarray(w, np.float32), bits=bits,
                                     block_size=int(block_size), symmetric=symmetric,
                                     method=method, hessian=hessian, pack=pack)
    if method != "rtn":
        raise TypeError(f"w: method={method!r} runs on concrete weights (outside jit); got a "
                        f"tracer")
    q, scale, zero_point = _round_to_nearest_traced(w.astype(jnp.float32), bits, int(block_size),
                                                    symmetric)
    return _quantized_weight(q, scale, zero_point, bits, block_size, pack)
