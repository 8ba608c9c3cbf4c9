"""Float-format checkpoints in: fp8 (e4m3fn) and fp4 (e2m1) weights, held as stored.

Every importer here returns a `QuantizedWeight` with ``format`` "fp8" (``w``
float8_e4m3fn, the checkpoint's own bytes re-laid out) or "fp4" (``w`` uint8,
the checkpoint's e2m1 codes re-paired as API.md section 7 says: two per byte
along ``in``, the even index in the low nibble), ``zero_point`` None and
float32 scales in section 2's layouts -- never a dequantized copy. The
scales are the source's, with the source's own arithmetic applied once
(documented per format), so ``qw.dequantize()`` equals the source's float32
dequantization bit for bit:

* `from_fp8_blocks`: native fp8 checkpoints (DeepSeek-V3/R1, Qwen3-FP8;
  ``quant_method: "fp8"``): ``w = float32(weight) * weight_scale_inv[i // 128,
  j // 128]`` (DeepSeek's ``weight_dequant``: the "inverse" scale is
  multiplied). Blockwise ``B = block[1]``; each block's scale is repeated over
  its ``block[0]`` output rows.
* `from_modelopt`: NVIDIA ModelOpt NVFP4 (``weight`` uint8 pairs,
  ``weight_scale`` e4m3 per 16, ``weight_scale_2`` float32, a multiplier:
  ``scale = float32(float32(weight_scale) * weight_scale_2)``, ModelOpt's
  ``NVFP4QTensor.dequantize`` order) and ModelOpt FP8 (per-tensor
  ``weight_scale``).
* compressed-tensors' float formats (`compressed_tensors.from_compressed_tensors`)
  and GGUF's MXFP4/NVFP4 (`ggml.from_gguf`) build on `fp8_weight` /
  `fp4_weight` below.

An ``input_scale`` (a static activation scale) is accepted and not used:
`quantized_matmul` scales activations dynamically per token.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from xla_qops.interop import _core
from xla_qops.quantize import QuantizedWeight

# e2m1 magnitudes by the low three code bits; bit 3 is the sign.
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
_SCALE_DTYPES = ("float32", "bfloat16", "float16")


def e2m1_values(codes: np.ndarray) -> np.ndarray:
    """e2m1 codes (low nibble) -> float32 values; code 8 is -0.0."""
    codes = np.asarray(codes).astype(np.uint8)
    magnitude = E2M1[codes & 7]
    return np.where(codes & 8, -magnitude, magnitude).astype(np.float32)


def unpack_pairs(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[..., K/2]`` -> codes ``[..., K]``, the even index from the low nibble
    (compressed-tensors', ModelOpt's, vLLM's and this project's order)."""
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(
        *packed.shape[:-1], packed.shape[-1] * 2).astype(np.uint8)


def pack_pairs(codes: np.ndarray, axis: int = -1) -> np.ndarray:
    """Inverse of `unpack_pairs` along `axis` (its length must be even)."""
    codes = np.moveaxis(np.asarray(codes, np.uint8), axis, -1)
    packed = (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)
    return np.ascontiguousarray(np.moveaxis(packed.astype(np.uint8), -1, axis))


def e8m0_scale(exponents, name: str) -> np.ndarray:
    """E8M0 biased exponents (uint8, or ml_dtypes float8_e8m0fnu) -> float32 ``2**(e - 127)``.

    255 is E8M0's NaN and is refused. e = 0 and 1 give float32 subnormals
    (exact; a flush-to-zero backend would lose them).
    """
    e = _core.to_numpy(exponents, name)
    if e.dtype == ml_dtypes.float8_e8m0fnu:
        e = e.view(np.uint8)
    if e.dtype != np.uint8:
        raise TypeError(f"{name}: expected uint8 E8M0 exponents, got {e.dtype.name}")
    if np.any(e == 255):
        raise ValueError(f"{name}: {int(np.sum(e == 255))} exponents are 255 (E8M0's NaN)")
    return np.ldexp(np.float32(1), e.astype(np.int32) - 127).astype(np.float32)


def check_fp8(a, name: str, *, ndim: int = 2) -> np.ndarray:
    """A float8_e4m3fn array (numpy/ml_dtypes, JAX or torch), checked: no NaN codes."""
    a = _core.to_numpy(a, name)
    if a.dtype != ml_dtypes.float8_e4m3fn:
        raise TypeError(f"{name}: expected dtype float8_e4m3fn, got {a.dtype.name}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected rank {ndim}, got shape {_core.shape_str(a.shape)}")
    nan = (a.view(np.uint8) & 0x7F) == 0x7F
    if nan.any():
        raise ValueError(f"{name}: {int(nan.sum())} values are e4m3fn NaN (0x7F/0xFF)")
    return a


def check_scale(a, name: str, *, shape=None, dtypes: Sequence[str] = _SCALE_DTYPES,
                positive: bool = False) -> np.ndarray:
    """A float scale array, checked, as float32 (exact for float32/bf16/fp16)."""
    a = _core.check_array(a, name, dtypes=dtypes)
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {_core.shape_str(shape)}, got "
                         f"{_core.shape_str(a.shape)}")
    a32 = a.astype(np.float32)
    if not np.all(np.isfinite(a32)):
        raise ValueError(f"{name}: {int(np.sum(~np.isfinite(a32)))} scales are not finite")
    if positive and np.any(a32 <= 0):
        raise ValueError(f"{name}: expected positive values, got minimum {float(a32.min())}")
    return a32


def scalar(a, name: str, dtypes: Sequence[str] = ("float32",)) -> np.float32:
    """One float (shape (), (1,) or (1, 1)) as float32."""
    a = _core.check_array(a, name, dtypes=dtypes)
    if a.size != 1:
        raise ValueError(f"{name}: expected one value (shape [] or [1]), got shape "
                         f"{_core.shape_str(a.shape)}")
    v = np.float32(a.reshape(()).astype(np.float32))
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a positive finite value, got {float(v)}")
    return v


def _layout(q_nk: np.ndarray, scale_ng: np.ndarray):
    """([N, K] stored values, [N, G] scales) -> (w, scale, block_size) in section 2's layout."""
    n, k = q_nk.shape
    g = scale_ng.shape[1]
    if g == 1:
        return q_nk, scale_ng[:, 0], -1
    block = k // g
    return q_nk.T.reshape(g, block, n), np.ascontiguousarray(scale_ng.T), block


def fp8_weight(values_nk: np.ndarray, scale_ng: np.ndarray) -> QuantizedWeight:
    """float8_e4m3fn ``[N, K]`` and float32 ``[N, G]`` scales (G = 1: per channel)
    -> an fp8 `QuantizedWeight` (``w = scale * value``), G dividing K."""
    n, k = values_nk.shape
    if scale_ng.shape[0] != n or k % scale_ng.shape[1]:
        raise AssertionError((values_nk.shape, scale_ng.shape))
    w, scale, block = _layout(values_nk, scale_ng.astype(np.float32))
    return QuantizedWeight(w=jnp.asarray(np.ascontiguousarray(w)),
                           scale=jnp.asarray(scale, jnp.float32), zero_point=None, bits=8,
                           block_size=block, packed=False, format="fp8")


def fp4_weight(codes_nk: np.ndarray, scale_ng: np.ndarray) -> QuantizedWeight:
    """e2m1 codes ``[N, K]`` (uint8, one per element) and float32 ``[N, G]`` scales
    -> an fp4 `QuantizedWeight`, codes packed in pairs along ``in`` (of each block)."""
    n, k = codes_nk.shape
    if scale_ng.shape[0] != n or k % scale_ng.shape[1]:
        raise AssertionError((codes_nk.shape, scale_ng.shape))
    w, scale, block = _layout(codes_nk, scale_ng.astype(np.float32))
    if (k if block == -1 else block) % 2:
        raise ValueError(f"in: e2m1 codes pair along the input features (of each block), "
                         f"got {'in' if block == -1 else 'block'} = {k if block == -1 else block}")
    w = pack_pairs(w, axis=-1 if block == -1 else 1)
    return QuantizedWeight(w=jnp.asarray(w), scale=jnp.asarray(scale, jnp.float32),
                           zero_point=None, bits=4, block_size=block, packed=True,
                           format="fp4")


def block_scales(scale_2d: np.ndarray, n: int, k: int, block: Sequence[int],
                 name: str) -> np.ndarray:
    """2-D block scales ``[ceil(N/rows), ceil(K/cols)]`` -> ``[N, K/cols]`` (each
    block's scale repeated over its rows), checked."""
    if len(tuple(block)) != 2 or any(int(b) <= 0 for b in block):
        raise ValueError(f"block: expected [rows, cols] of positive ints, got {list(block)}")
    rows, cols = (int(b) for b in block)
    if k % cols:
        raise ValueError(f"{name}: block scales are {cols} input features wide, and in={k} "
                         f"is not a multiple of {cols}: the last column block would be "
                         f"partial, which blockwise B={cols} cannot hold")
    expected = (-(-n // rows), k // cols)
    if tuple(scale_2d.shape) != expected:
        raise ValueError(f"{name}: expected shape {_core.shape_str(expected)} "
                         f"(ceil(out/{rows}), in/{cols}) for weight [{n}, {k}], got "
                         f"{_core.shape_str(scale_2d.shape)}")
    return np.repeat(scale_2d, rows, axis=0)[:n]


def from_fp8_blocks(weight, weight_scale_inv, block=(128, 128)) -> QuantizedWeight:
    """Imports one native-fp8 linear layer (``quant_method: "fp8"``, DeepSeek-V3 style).

    Args:
      weight: float8_e4m3fn ``[out, in]`` (numpy/ml_dtypes, JAX or torch).
      weight_scale_inv: float32/bf16/fp16 ``[ceil(out/block[0]), in/block[1]]``;
        despite its name it is multiplied: ``w[i, j] = float32(weight[i, j]) *
        weight_scale_inv[i // block[0], j // block[1]]`` (DeepSeek's
        ``weight_dequant``).
      block: the config's ``weight_block_size`` ``[rows, cols]``.

    Returns:
      fp8 `QuantizedWeight`, blockwise ``B = block[1]`` (per-channel when one
      block spans ``in``). ``out`` need not divide by ``block[0]``.

    Raises:
      ValueError: ``in`` not a multiple of ``block[1]``, a scale shape that does
        not match, NaN weights or non-finite scales.
    """
    w = check_fp8(weight, "weight")
    n, k = w.shape
    s = check_scale(weight_scale_inv, "weight_scale_inv")
    if s.ndim != 2:
        raise ValueError(f"weight_scale_inv: expected a 2-D block scale [ceil(out/rows), "
                         f"in/cols], got shape {_core.shape_str(s.shape)}")
    return fp8_weight(w, block_scales(s, n, k, block, "weight_scale_inv"))


MODELOPT_ALGOS = ("NVFP4", "FP8")


def from_modelopt(tensors: Mapping, *, quant_algo: str = "NVFP4",
                  group_size: int = 16) -> QuantizedWeight:
    """Imports one NVIDIA ModelOpt (TensorRT Model Optimizer) linear layer.

    Args:
      tensors: the layer's tensors by name: for "NVFP4" ``weight`` (uint8
        ``[out, in/2]``, e2m1 pairs, even index low), ``weight_scale``
        (float8_e4m3fn ``[out, in/16]``), ``weight_scale_2`` (float32, one
        value: a multiplier), optional ``input_scale`` (not used); for "FP8"
        ``weight`` (float8_e4m3fn ``[out, in]``) and ``weight_scale`` (one
        float32, or ``[out]``/``[out, 1]`` per channel).
      quant_algo: the config's ``quant_algo``, "NVFP4" or "FP8".
      group_size: NVFP4's block (16).

    Returns:
      fp4 `QuantizedWeight` with ``scale = float32(float32(weight_scale) *
      weight_scale_2)`` per block (ModelOpt's dequantization: then ``value *
      scale``), or an fp8 one.
    """
    if quant_algo not in MODELOPT_ALGOS:
        raise ValueError(f"quant_algo: expected one of {', '.join(MODELOPT_ALGOS)}, got "
                         f"{quant_algo!r}")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors: expected a mapping of tensor names to arrays, got "
                        f"{type(tensors).__name__}")
    for name in ("weight", "weight_scale"):
        if name not in tensors:
            raise KeyError(f"tensors: expected a {name!r} entry, got keys {sorted(tensors)}")
    if quant_algo == "FP8":
        w = check_fp8(tensors["weight"], "weight")
        n, k = w.shape
        s = check_scale(tensors["weight_scale"], "weight_scale")
        if s.size == 1:
            s = np.broadcast_to(s.reshape(1, 1), (n, 1))
        elif s.shape in ((n,), (n, 1)):
            s = s.reshape(n, 1)
        else:
            raise ValueError(f"weight_scale: expected one value or [{n}] / [{n}, 1], got "
                             f"{_core.shape_str(s.shape)}")
        return fp8_weight(w, s)
    if "weight_scale_2" not in tensors:
        raise KeyError("tensors: NVFP4 needs its per-tensor 'weight_scale_2' (the global "
                       f"multiplier), got keys {sorted(tensors)}")
    packed = _core.check_array(tensors["weight"], "weight", dtypes=("uint8",), ndim=2)
    n, k = packed.shape[0], packed.shape[1] * 2
    if not isinstance(group_size, (int, np.integer)) or group_size <= 0 or group_size % 2 \
            or k % group_size:
        raise ValueError(f"group_size: expected an even divisor of in={k}, got {group_size!r}")
    s = check_fp8(tensors["weight_scale"], "weight_scale")
    if s.shape != (n, k // group_size):
        raise ValueError(f"weight_scale: expected shape {_core.shape_str((n, k // group_size))}"
                         f" (in/{group_size}), got {_core.shape_str(s.shape)}")
    s2 = scalar(tensors["weight_scale_2"], "weight_scale_2")
    if "input_scale" in tensors:
        _core.check_float(tensors["input_scale"], "input_scale")
    scale = (s.astype(np.float32) * s2).astype(np.float32)  # one rounding
    return fp4_weight(unpack_pairs(packed), scale)
