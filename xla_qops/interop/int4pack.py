"""torch's tinygemm int4 format (``torch._weight_int4pack_mm`` and its CPU twin).

Source convention, weight ``[N, K]`` with unsigned 4-bit codes q::

    w[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n]          g = k // group_size

with ``scales_and_zeros`` ``[K / group_size, N, 2]`` (``[..., 0]`` = s,
``[..., 1]`` = z) in the activation dtype, group sizes 32, 64, 128 or 256.

Mapping: ``q' = q - 8`` (exactly the int4 range), ``scale = s``,
``zero_point = -z``. torch's CPU kernel evaluates ``(q - 8) * s + z`` as one
fused multiply-add (one rounding), while API.md's ``scale * q - zero_point``
rounds the product first. The two agree whenever ``(q - 8) * s`` is a
float32 number -- for every bfloat16 or float16 scale (at most 11
significant bits times a 4-bit integer), the dtypes tinygemm is used with --
and the import is then exact. Float32 scales with more than 21 significant
bits generally are not (about one weight in seven differs by one ulp from
torch's kernel); those are refused unless ``exact=False``. The reference is
the single rounding, as torch's kernel computes it.

Packed layouts (K input features, N output features):

* ``"cpu_avx512"``, ``"cpu_avx2"``, ``"cpu_default"``: what
  ``torch._convert_weight_to_int4pack_for_cpu(q int32 [N, K], inner_k_tiles)``
  returns, a uint8 ``[N, K/2]`` tensor whose byte order depends on the CPU
  capability torch dispatched to (aten/src/ATen/native/cpu/int4mm_kernel.cpp).
  N is cut into blocks of ``BLOCK_N`` (64 on AVX-512, 32 otherwise), each
  stored as ``[K, BLOCK_N/2]`` bytes. Within a full AVX-512 block byte
  ``d < 16`` holds features ``d`` (low nibble) and ``d+32`` (high), byte
  ``16+d`` holds ``d+16`` and ``d+48``; a full AVX2 block holds ``d`` and
  ``d+16``; the default (non-vectorized) form and partial last blocks hold
  neighbours ``2i`` (low) and ``2i+1`` (high). A CPU-packed tensor is only
  meaningful to a torch running with the same capability; `from_int4pack`
  assumes the local one unless told.
* ``"cuda"``: what ``torch._convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)``
  returns on an NVIDIA GPU, int32 ``[N/8, K/(inner_k_tiles*16), 32, inner_k_tiles/2]``
  in the m16n8k16 tensor-core B layout (aten/src/ATen/native/cuda/int4mm.cu,
  ``matrix_to_m16n8k16_Bint4_layout``). Word ``[nt, kt, t, j]`` covers output
  feature ``8 nt + t // 4`` and bytes ``b_i`` of that row of the uint8 input
  (``b_0 = (kt*ikt + 2j)*8 + t%4``, ``b_1 = b_0 + 4``, ``b_2 = b_0 + 8``,
  ``b_3 = b_0 + 12``); nibble i < 4 of the word is the high nibble of
  ``b_i`` (input feature ``2 b_i``), nibble 4 + i its low nibble (``2 b_i + 1``).
  Written from the kernel source; there is no GPU here to run the torch op.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from xla_qops.interop import _core

CPU_LAYOUTS = ("cpu_avx512", "cpu_avx2", "cpu_default")
LAYOUTS = CPU_LAYOUTS + ("cuda",)
GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = (2, 4, 8)


def local_cpu_layout() -> str:
    """The CPU layout torch uses on this machine (needs torch)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is optional
        raise ValueError("layout: torch is not installed, so the CPU capability that packed "
                         f"the weight is unknown; pass one of {CPU_LAYOUTS}") from e
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return {"AVX512": "cpu_avx512", "AVX2": "cpu_avx2"}.get(cap, "cpu_default")


def _cpu_index(layout: str, n: int, k: int):
    """(byte index into the flat [N*K/2] buffer, high-nibble flag), each [N, K]."""
    block_n = 64 if layout == "cpu_avx512" else 32
    rows = np.arange(n)[:, None]
    cols = np.arange(k)[None, :]
    start = rows // block_n * block_n
    size = np.minimum(block_n, n - start)
    r = rows - start
    if layout == "cpu_avx512":
        lane, d = r // 16, r % 16
        full_byte, full_high = d + 16 * (lane % 2), lane // 2
    elif layout == "cpu_avx2":
        full_byte, full_high = r % 16, r // 16
    else:
        full_byte, full_high = r // 2, r % 2
    full = (size == block_n) & (layout != "cpu_default")
    in_row = np.where(full, full_byte, r // 2)
    high = np.where(full, full_high, r % 2)
    byte = start * (k // 2) + cols * (size // 2) + in_row
    return np.broadcast_to(byte, (n, k)), np.broadcast_to(high, (n, k)).astype(bool)


def _cuda_index(n: int, k: int, inner_k_tiles: int):
    """(flat int32 word index, nibble position 0..7), each [N, K]."""
    n_tiles, k_outer, half = n // 8, k // (inner_k_tiles * 16), inner_k_tiles // 2
    nt, kt, t, j, p = np.meshgrid(np.arange(n_tiles), np.arange(k_outer), np.arange(32),
                                  np.arange(half), np.arange(8), indexing="ij")
    byte = (kt * inner_k_tiles + 2 * j) * 8 + t % 4 + 4 * (p % 4)
    feature_k = 2 * byte + (p >= 4)
    feature_n = nt * 8 + t // 4
    word = ((nt * k_outer + kt) * 32 + t) * half + j
    word_of = np.empty((n, k), np.int64)
    nibble_of = np.empty((n, k), np.int64)
    word_of[feature_n, feature_k] = word
    nibble_of[feature_n, feature_k] = p
    return word_of, nibble_of


def _codes(weight: np.ndarray, layout: str, n: int, k: int, inner_k_tiles: int) -> np.ndarray:
    """Unsigned codes [N, K] of a packed weight."""
    if layout == "cuda":
        words = weight.reshape(-1).view(np.uint32)
        word_of, nibble_of = _cuda_index(n, k, inner_k_tiles)
        return ((words[word_of] >> (4 * nibble_of).astype(np.uint32)) & 0xF).astype(np.int32)
    flat = weight.reshape(-1)
    byte, high = _cpu_index(layout, n, k)
    b = flat[byte]
    return np.where(high, b >> 4, b & 0xF).astype(np.int32)


def from_int4pack(weight, scales_and_zeros, *, group_size: int | None = None,
                  layout: str | None = None, pack: bool = True, exact: bool = True):
    """Imports a tinygemm int4-packed weight as a `QuantizedWeight`.

    Args:
      weight: uint8 ``[N, K/2]`` (a CPU layout) or int32
        ``[N/8, K/(ikt*16), 32, ikt/2]`` ("cuda").
      scales_and_zeros: float ``[K / group_size, N, 2]``.
      group_size: default ``K / scales_and_zeros.shape[0]``.
      layout: one of `LAYOUTS`; default "cuda" for a 4-D int32 weight and
        this machine's CPU layout (`local_cpu_layout`) for a uint8 one.
      pack: store the int4 values two per byte (this project's form).
      exact: raise if the result is not bit-exact against torch's kernel
        (always exact for bfloat16/float16 scales; see the module docstring).
    """
    weight = _core.to_numpy(weight, "weight")
    if layout is None:
        layout = "cuda" if weight.ndim == 4 else local_cpu_layout()
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    inner_k_tiles = 0
    if layout == "cuda":
        weight = _core.check_array(weight, "weight", dtypes=("int32",), ndim=4)
        if weight.shape[2] != 32 or 2 * weight.shape[3] not in INNER_K_TILES:
            raise ValueError(f"weight: expected the cuda layout [N/8, K/(ikt*16), 32, ikt/2] "
                             f"with ikt in {INNER_K_TILES}, got {_core.shape_str(weight.shape)}")
        inner_k_tiles = 2 * weight.shape[3]
        n, k = 8 * weight.shape[0], weight.shape[1] * inner_k_tiles * 16
    else:
        weight = _core.check_array(weight, "weight", dtypes=("uint8",), ndim=2)
        n, k = weight.shape[0], 2 * weight.shape[1]
    sz = _core.check_float(scales_and_zeros, "scales_and_zeros", ndim=3)
    if sz.shape[1:] != (n, 2):
        raise ValueError(f"scales_and_zeros: expected shape [K/group_size, {n}, 2], got "
                         f"{_core.shape_str(sz.shape)}")
    inferred = _core.split_groups(k, sz.shape[0], "scales_and_zeros")
    if group_size is not None and group_size != inferred:
        raise ValueError(f"group_size: scales_and_zeros {_core.shape_str(sz.shape)} for K={k} "
                         f"implies {inferred}, got {group_size}")
    group_size = inferred
    codes = _codes(weight, layout, n, k, inner_k_tiles).T  # [K, N]
    s32, z32 = _core.f32(sz[..., 0]), _core.f32(sz[..., 1])  # [G, N]
    n_groups = k // group_size
    # One rounding of the exact (q - 8) * s + z, as torch's kernel (fused
    # multiply-add): the float64 product is exact (24 + 4 bits) and so is the
    # sum unless z lies more than 25 binades from it.
    reference = ((codes - 8).reshape(n_groups, group_size, n).astype(np.float64)
                 * s32.astype(np.float64)[:, None, :] + z32.astype(np.float64)[:, None, :]
                 ).reshape(k, n).astype(np.float32)
    candidates = {4: lambda: _core.Encoding(bits=4, q=codes - 8, scale=s32, zero_point=-z32)}
    return _core.assemble(reference, candidates, group_size=group_size, target_bits=4,
                          exact=exact, pack=pack, source="int4pack")


class Int4Pack(NamedTuple):
    """Arguments for ``torch._weight_int4pack_mm[_for_cpu](x, weight, group_size, scales_and_zeros)``."""

    weight: "object"
    group_size: int
    scales_and_zeros: "object"


def _tinygemm_group(qw) -> int:
    span = qw.in_features if qw.block_size == -1 else qw.block_size
    for g in sorted(GROUP_SIZES, reverse=True):
        if span % g == 0:
            return g
    what = "in_features" if qw.block_size == -1 else "block_size"
    raise ValueError(f"weight: tinygemm group sizes are {GROUP_SIZES}; {what}={span} is not a "
                     f"multiple of any of them")


def to_int4pack(qw, *, layout: str = "cpu", inner_k_tiles: int = 2, dtype=None) -> Int4Pack:
    """Exports a 4-bit `QuantizedWeight` to torch's tinygemm format (needs torch).

    Args:
      qw: a `QuantizedWeight` with bits=4 (packed or not, any zero point).
      layout: "cpu" (``torch._convert_weight_to_int4pack_for_cpu`` on this
        machine, for ``torch._weight_int4pack_mm_for_cpu``) or "cuda" (the
        GPU tensor-core layout, built here in numpy).
      inner_k_tiles: 2, 4 or 8.
      dtype: torch dtype of `scales_and_zeros`, which must equal the
        activation dtype of the mm; default float32 for "cpu" (exact) and
        bfloat16 for "cuda" (the only one the CUDA kernel takes; rounds the
        scale and zero point unless they are bfloat16 numbers).

    Returns:
      `Int4Pack(weight, group_size, scales_and_zeros)`. The group size is the
      block size (or, for per-channel weights and blocks larger than 256, the
      largest tinygemm group size dividing it, with the scale repeated).
    """
    import torch

    if getattr(qw, "bits", None) != 4:
        raise ValueError(f"qw: expected a 4-bit QuantizedWeight, got bits={getattr(qw, 'bits', None)}")
    if layout not in ("cpu", "cuda"):
        raise ValueError(f"layout: expected 'cpu' or 'cuda', got {layout!r}")
    if inner_k_tiles not in INNER_K_TILES:
        raise ValueError(f"inner_k_tiles: expected one of {INNER_K_TILES}, got {inner_k_tiles}")
    n, k = qw.out_features, qw.in_features
    group = _tinygemm_group(qw)
    q = np.asarray(qw.int_values(), np.int32)
    if qw.block_size == -1:
        codes = q + 8  # [N, K]
        scale = np.repeat(np.asarray(qw.scale, np.float32)[None, :], k // group, axis=0)
        zero = (None if qw.zero_point is None else
                np.repeat(np.asarray(qw.zero_point, np.float32)[None, :], k // group, axis=0))
    else:
        codes = q.reshape(k, n).T + 8
        rep = qw.block_size // group
        scale = np.repeat(np.asarray(qw.scale, np.float32), rep, axis=0)
        zero = None if qw.zero_point is None else np.repeat(
            np.asarray(qw.zero_point, np.float32), rep, axis=0)
    zero = np.zeros_like(scale) if zero is None else -zero
    if dtype is None:
        dtype = torch.float32 if layout == "cpu" else torch.bfloat16
    sz = torch.from_numpy(np.stack([scale, zero], axis=-1)).to(dtype)
    codes = np.ascontiguousarray(codes, np.int32)
    if layout == "cpu":
        if n % 16:
            raise ValueError(f"qw: the CPU int4pack layout needs out_features divisible by 16, "
                             f"got {n}")
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(codes), inner_k_tiles)
    else:
        if n % 8 or k % (inner_k_tiles * 16):
            raise ValueError(f"qw: the cuda int4pack layout needs out_features % 8 == 0 and "
                             f"in_features % {inner_k_tiles * 16} == 0, got N={n}, K={k}")
        word_of, nibble_of = _cuda_index(n, k, inner_k_tiles)
        words = np.zeros(n * k // 8, np.uint32)
        np.bitwise_or.at(words, word_of.reshape(-1),
                         (codes.astype(np.uint32) << (4 * nibble_of).astype(np.uint32)).reshape(-1))
        weight = torch.from_numpy(words.view(np.int32).reshape(
            n // 8, k // (inner_k_tiles * 16), 32, inner_k_tiles // 2))
    return Int4Pack(weight=weight, group_size=group, scales_and_zeros=sz)
