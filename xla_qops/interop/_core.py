"""Shared machinery of the importers: codes + group parameters -> `QuantizedWeight`.

Every importer reduces its format to the same intermediate form:

* ``reference``: float32 ``[K, N]`` (input features major), the source format's
  own dequantization computed with numpy in float32, in the source's order of
  operations (one IEEE rounding per operation, no fused multiply-add).
* one or more candidate `Encoding`s in this project's convention
  ``w = scale * q - zero_point`` with per-group ``scale``/``zero_point``
  ``[G, N]`` (G = K / group_size groups along K).

`assemble` builds the candidate for the requested width, evaluates it with
numpy float32 (``scale * q`` rounded, then ``- zero_point`` rounded, exactly
what `QuantizedWeight.dequantize` computes) and compares it with
``reference`` everywhere; on a mismatch it evaluates the other widths only to
say which one would be exact. So "exact" is checked on the actual weight,
never assumed.

Everything here runs on the host with numpy: importing happens once, at load
time, and exact IEEE float32 semantics are easiest to pin down there.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from xla_qops import packing
from xla_qops.quantize import QuantizedWeight

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Encoding:
    """One candidate representation in API.md's convention.

    Attributes:
      bits: 4 or 8, the `QuantizedWeight.bits` it becomes.
      q: signed integers ``[K, N]`` within the range of `bits`.
      scale: float32 ``[G, N]``.
      zero_point: float32 ``[G, N]`` or None.
    """

    bits: int
    q: np.ndarray
    scale: np.ndarray
    zero_point: Optional[np.ndarray]


# torch dtypes numpy lacks -> the ml_dtypes (or uint8) dtype holding the same bits.
_TORCH_BIT_VIEWS = {"torch.float8_e4m3fn": "float8_e4m3fn", "torch.float8_e5m2": "float8_e5m2",
                    "torch.float8_e8m0fnu": "float8_e8m0fnu", "torch.float4_e2m1fn_x2": "uint8"}


def to_numpy(a, name: str) -> np.ndarray:
    """numpy view of a numpy/JAX/torch array (torch bfloat16, float8 and
    ``float4_e2m1fn_x2`` included: the same bits in ml_dtypes' types, the
    packed fp4 pairs as uint8). Never imports torch."""
    if a is None:
        raise TypeError(f"{name}: expected an array, got None")
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor, without importing torch
        t = a.detach().cpu()
        dtype = str(t.dtype)
        if dtype == "torch.bfloat16":
            # numpy has no bfloat16: widen (exact) and narrow with ml_dtypes (exact).
            import ml_dtypes  # ships with jax
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        if dtype in _TORCH_BIT_VIEWS:
            import sys

            import ml_dtypes  # ships with jax
            torch = sys.modules["torch"]  # loaded: `a` is one of its tensors
            bits = t.contiguous().view(torch.uint8).numpy()
            target = _TORCH_BIT_VIEWS[dtype]
            return bits if target == "uint8" else bits.view(getattr(ml_dtypes, target))
        return t.numpy()
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
    return np.asarray(a)


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def check_array(a, name: str, *, shape=None, dtypes: Sequence[str] = None, ndim=None) -> np.ndarray:
    """Converts and checks an input array; errors name the argument, expected and actual."""
    a = to_numpy(a, name)
    if dtypes is not None and a.dtype.name not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(dtypes)}, got {a.dtype.name}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected rank {ndim}, got shape {shape_str(a.shape)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {shape_str(shape)}, got {shape_str(a.shape)}")
    return a


def check_float(a, name: str, *, shape=None, ndim=None) -> np.ndarray:
    return check_array(a, name, shape=shape, ndim=ndim, dtypes=_FLOAT_DTYPES)


def f32(a: np.ndarray) -> np.ndarray:
    """float16/bfloat16/float32 -> float32 (exact); float64 is rounded once."""
    return np.asarray(a).astype(np.float32)


def f64(a: np.ndarray) -> np.ndarray:
    """The float32 value of `a` as float64 (exact), for exact intermediate products."""
    return f32(a).astype(np.float64)


def unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned `bits`-wide fields of 32-bit words, little end first, along `axis`.

    Value j of word i lands at index ``i * (32 // bits) + j`` of `axis`
    (field j occupies bits ``[j*bits, (j+1)*bits)``). int32 words are read as
    their unsigned bit pattern.
    """
    u = np.ascontiguousarray(words).view(np.uint32) if words.dtype == np.int32 else words.astype(np.uint32)
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
    u = np.moveaxis(u, axis, -1)
    fields = (u[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    fields = fields.reshape(*u.shape[:-1], u.shape[-1] * per)
    return np.moveaxis(fields, -1, axis).astype(np.int32)


def split_groups(k: int, n_groups: int, what: str) -> int:
    if n_groups <= 0 or k % n_groups:
        raise ValueError(f"{what}: {n_groups} groups do not divide the {k} input features")
    return k // n_groups


def _evaluate(enc: Encoding, group_size: int) -> np.ndarray:
    """`QuantizedWeight.dequantize`'s arithmetic in numpy float32, as [K, N]."""
    k, n = enc.q.shape
    q = enc.q.reshape(k // group_size, group_size, n).astype(np.float32)
    w = q * enc.scale[:, None, :]
    if enc.zero_point is not None:
        w = w - enc.zero_point[:, None, :]
    return w.reshape(k, n)


def _mismatch(ours: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    bad = ours != reference
    if not bad.any():
        return 0, 0.0
    return int(bad.sum()), float(np.max(np.abs(ours[bad].astype(np.float64) - reference[bad])))


def assemble(reference: np.ndarray, candidates: dict[int, Callable[[], Encoding]], *,
             group_size: int, target_bits: int, exact: bool, pack: bool,
             source: str) -> QuantizedWeight:
    """Builds the `QuantizedWeight` for `target_bits`, verified against `reference`.

    Args:
      reference: float32 [K, N], the source format's own dequantization.
      candidates: target bits -> a function making that `Encoding`.
      group_size: input features per group (G = K / group_size).
      target_bits: which candidate to build.
      exact: raise unless the result dequantizes to `reference` bit for bit
        (+0.0 and -0.0 count as equal); the message says whether the other
        width would be exact.
      pack: store 4-bit values two per byte (uint8).
      source: format name for messages.
    """
    if target_bits not in candidates:
        raise ValueError(f"target_bits: expected one of {sorted(candidates)} for {source} "
                         f"weights of this width, got {target_bits}")
    if not np.all(np.isfinite(reference)):
        raise ValueError(f"{source}: the source weight dequantizes to "
                         f"{int(np.sum(~np.isfinite(reference)))} non-finite values")
    enc = candidates[target_bits]()
    n_bad, worst = _mismatch(_evaluate(enc, group_size), reference)
    if n_bad and exact:
        others = []
        for bits, make in candidates.items():
            if bits != target_bits and _mismatch(_evaluate(make(), group_size), reference)[0] == 0:
                others.append(f"target_bits={bits} is exact for this weight")
        hint = "; ".join(others + ["exact=False accepts the difference"])
        raise ValueError(
            f"{source}: {n_bad} of {reference.size} weights cannot be represented bit-exactly "
            f"as {target_bits}-bit `scale * q - zero_point` in float32 (largest difference "
            f"{worst:.3g}; the zero point the format implies is not a float32 number — "
            f"see docs/interop.md); {hint}")
    return to_quantized_weight(enc, group_size, pack=pack)


def to_quantized_weight(enc: Encoding, group_size: int, *, pack: bool) -> QuantizedWeight:
    """Lays an `Encoding` out as API.md section 2 says.

    One group spanning all of K becomes the per-channel layout (block_size -1);
    an all-zero zero point is dropped (symmetric).
    """
    k, n = enc.q.shape
    n_groups = k // group_size
    zero = enc.zero_point
    if zero is not None and not np.any(zero):
        zero = None
    if n_groups == 1:
        w = enc.q.T.astype(np.int8)
        scale, zero = enc.scale[0], (None if zero is None else zero[0])
        block_size = -1
    else:
        w = enc.q.reshape(n_groups, group_size, n).astype(np.int8)
        scale = enc.scale
        block_size = group_size
    packed = bool(pack and enc.bits == 4)
    if packed:
        if k % 2:
            raise ValueError(f"pack: packed int4 needs an even number of input features, got {k}")
        w = packing.pack_int4(jnp.asarray(w), packing.input_axis(block_size != -1))
    return QuantizedWeight(
        w=jnp.asarray(w), scale=jnp.asarray(scale, jnp.float32),
        zero_point=None if zero is None else jnp.asarray(zero, jnp.float32),
        bits=enc.bits, block_size=block_size, packed=packed)


def offset_encoding(bits: int, codes: np.ndarray, scale32: np.ndarray,
                    zero_exact: np.ndarray) -> Encoding:
    """Codes shifted into the signed range: ``q = codes - 2**(bits-1)``.

    `zero_exact` is the float64 zero point that makes the convention equal the
    source in real arithmetic; it is rounded once to float32 here, which is
    where exactness can be lost (checked by `assemble`).
    """
    offset = 1 << (bits - 1)
    return Encoding(bits=bits, q=codes - offset, scale=scale32,
                    zero_point=zero_exact.astype(np.float32))


def act_order_permutation(g_idx: np.ndarray, group_size: int, *, name: str,
                          permute: bool) -> Optional[np.ndarray]:
    """The input-feature order for a group index ``g_idx`` [K] (GPTQ's desc_act,
    compressed-tensors' actorder="group").

    None when ``g_idx[k] == k // group_size`` (contiguous groups). Otherwise
    the features sorted by group (stable), after checking every group holds
    `group_size` of them -- or, unless `permute`, a ValueError: blockwise
    layouts need contiguous groups, and the caller must feed ``x[..., perm]``.
    """
    k = g_idx.shape[0]
    n_groups = k // group_size
    plain = np.arange(k) // group_size
    if np.array_equal(g_idx, plain):
        return None
    if not permute:
        raise ValueError(
            f"{name}: act-order checkpoint: input features are not grouped contiguously "
            f"along K ({name}[k] != k // {group_size} at {int(np.sum(g_idx != plain))} of "
            f"{k} positions); pass permute_act_order=True to get (weight, perm) and feed "
            f"x[..., perm]")
    counts = np.bincount(g_idx.clip(0), minlength=n_groups)
    if g_idx.min() < 0 or len(counts) != n_groups or np.any(counts != group_size):
        raise ValueError(f"{name}: expected each of the {n_groups} groups to hold "
                         f"{group_size} input features, got counts {counts.tolist()}")
    return np.argsort(g_idx, kind="stable")
