"""HQQ checkpoints (``HQQLinear``, ``axis=1``, 4-bit ``4bit_u8`` or 8-bit packing).

Source convention: the weight ``[N, K]`` (torch orientation) is flattened
row-major and cut into R = N * K / group_size rows of ``group_size``
consecutive values (``axis=1``), each with a float scale and a float zero::

    W_r[r, :] = (W_q[r, :] - zero[r]) * scale[r]        W_q unsigned in [0, 2**nbits)

(``scale`` here is the multiplier HQQ keeps in ``meta["scale"]``.) 4-bit
packing "4bit_u8" packs *halves*: byte ``[r, j]`` of the packed ``[R/2, g]``
array holds row ``r`` in its high nibble and row ``r + R/2`` in its low nibble.
8-bit is stored unpacked as uint8 ``[R, g]``.

With ``K % group_size == 0`` (required here) row r is output feature
``r // (K/g)``, input block ``r % (K/g)``: exactly this project's blockwise
layout.

Mapping: ``target_bits=4``: ``q' = q - 8``, ``scale = s``,
``zero_point = s * (z - 8)`` rounded to float32. Unlike GPTQ the zero is a
float, so ``s * (z - 8)`` is exact only when its significand fits float32: for
float16 ``s`` and ``z`` that holds when ``z - 8`` needs at most 13 significant
bits (in particular for every float16 ``z`` with ``|z| >= 1``, HQQ's usual
range). ``target_bits=8`` stores ``q`` unshifted with ``zero_point = s * z``,
exact for every float16/bfloat16 ``s`` and ``z`` (11 + 11 bits < 24). The
source's own ``W_q - zero`` must itself be exact in float32 for either to
match, which holds for float16 zeros with ``|z| >= 2**-10``. The importer
checks the actual weight and says which width is exact.
"""

from __future__ import annotations

import numpy as np

from xla_qops.interop import _core


def from_hqq(W_q, scale, zero, *, shape, group_size: int, nbits: int = 4, axis: int = 1,
             target_bits: int | None = None, pack: bool = True, exact: bool = True):
    """Imports one HQQ linear layer as a `QuantizedWeight`.

    Args:
      W_q: uint8 ``[R/2, group_size]`` (nbits=4, "4bit_u8") or ``[R, group_size]``
        (nbits=8), R = N * K / group_size.
      scale, zero: float ``[R, 1]`` or ``[R]`` (HQQ's ``meta["scale"]``,
        ``meta["zero"]``).
      shape: ``(N, K)``, the float weight's shape (``meta["shape"]``).
      group_size: HQQ's group size; must divide K.
      nbits: 4 or 8.
      axis: must be 1 (``axis=0`` groups along output features, which this
        layout cannot express).
      target_bits: 4 or 8 (default `nbits`).
      pack: store 4-bit values two per byte.
      exact: raise if the result is not bit-exact.
    """
    if axis != 1:
        raise ValueError(f"axis: only HQQ axis=1 (groups along input features) maps onto "
                         f"this layout, got axis={axis}")
    if nbits not in (4, 8):
        raise ValueError(f"nbits: expected 4 or 8, got {nbits}")
    if len(shape) != 2:
        raise ValueError(f"shape: expected (N, K), got {tuple(shape)}")
    n, k = (int(d) for d in shape)
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size: expected a divisor of K={k} (HQQ groups that straddle "
                         f"rows have no blockwise equivalent), got {group_size}")
    rows = n * k // group_size
    packed_rows = rows // 2 if nbits == 4 else rows
    if nbits == 4 and rows % 2:
        raise ValueError(f"shape: 4bit_u8 packing needs an even row count, got R={rows}")
    W_q = _core.check_array(W_q, "W_q", dtypes=("uint8",), shape=(packed_rows, group_size))
    params = []
    for name, a in (("scale", scale), ("zero", zero)):
        a = _core.check_float(a, name)
        if a.shape not in ((rows, 1), (rows,)):
            raise ValueError(f"{name}: expected shape [{rows}, 1] (R = N*K/group_size), "
                             f"got {_core.shape_str(a.shape)}")
        params.append(a.reshape(rows))
    scale, zero = params
    if nbits == 4:
        codes_rows = np.concatenate([W_q >> 4, W_q & 0xF], axis=0).astype(np.int32)
    else:
        codes_rows = W_q.astype(np.int32)

    # rows [R, g] -> [N, K/g, g] -> ours [K/g, g, N] -> [K, N]
    n_groups = k // group_size

    def to_kn(a):  # [R, g] -> [K, N]
        return a.reshape(n, n_groups, group_size).transpose(1, 2, 0).reshape(k, n)

    def to_gn(a):  # [R] -> [G, N]
        return a.reshape(n, n_groups).T

    codes = to_kn(codes_rows)
    s32, z32 = to_gn(_core.f32(scale)), to_gn(_core.f32(zero))
    s64, z64 = s32.astype(np.float64), z32.astype(np.float64)
    reference = ((codes.reshape(n_groups, group_size, n).astype(np.float32) - z32[:, None, :])
                 * s32[:, None, :]).reshape(k, n)
    offset = 1 << (nbits - 1)
    candidates = {nbits: lambda: _core.offset_encoding(nbits, codes, s32, s64 * (z64 - offset))}
    if nbits == 4:
        candidates[8] = lambda: _core.Encoding(bits=8, q=codes, scale=s32,
                                               zero_point=(s64 * z64).astype(np.float32))
    return _core.assemble(reference, candidates, group_size=group_size,
                          target_bits=nbits if target_bits is None else target_bits,
                          exact=exact, pack=pack, source="HQQ")
