"""GPTQ checkpoints (AutoGPTQ / GPTQModel "gptq" and "gptq_v2" formats).

Source convention, per output column n and input feature k in group
``g = g_idx[k]``::

    w[k, n] = scales[g, n] * (q[k, n] - z[g, n])      q, z unsigned in [0, 2**bits)

Tensors (K input features, N output features, G groups):

* ``qweight`` int32 ``[K * bits / 32, N]``: codes packed along K, value j of
  word i is input feature ``i * 32/bits + j`` at bits ``[j*bits, (j+1)*bits)``.
* ``qzeros`` int32 ``[G, N * bits / 32]``: zero codes packed the same way along N.
* ``scales`` float16 (or bfloat16/float32) ``[G, N]``.
* ``g_idx`` int32 ``[K]`` (optional): the group of each input feature.

Version 1 (AutoGPTQ's original format, the default) stores ``z - 1``; the
reader adds one back modulo ``2**bits``, as AutoGPTQ's kernels do. Version 2
(GPTQModel's ``gptq_v2``) stores ``z``.

Mapping (4-bit, ``target_bits=4``): ``q' = q - 8``, ``scale = s``,
``zero_point = s * (z - 8)``. This is exact whenever ``s * (z - 8)`` is a
float32 number, which holds for every float16 or bfloat16 scale (11- or
8-bit significand times a 4-bit integer). ``target_bits=8`` stores
``q - z`` (in [-15, 15]) with no zero point, exact for any scale.
"""

from __future__ import annotations

import numpy as np

from xla_qops.interop import _core

_BITS = (4, 8)


def subtract_zero_candidates(codes, zeros, scales, bits, group_size):
    """Reference and candidates for ``w = s * (q - z)`` (GPTQ, AWQ).

    Args:
      codes: int32 [K, N] unsigned codes.
      zeros: int32 [G, N] unsigned zero codes.
      scales: float [G, N].
    """
    k, n = codes.shape
    n_groups = k // group_size
    s32 = _core.f32(scales)
    grouped = codes.reshape(n_groups, group_size, n)
    # q - z is an exact integer; one float32 rounding for the product.
    reference = (s32[:, None, :] * (grouped - zeros[:, None, :]).astype(np.float32)).reshape(k, n)
    offset = 1 << (bits - 1)
    candidates = {bits: lambda: _core.offset_encoding(
        bits, codes, s32, _core.f64(scales) * (zeros - offset))}
    if bits == 4:
        candidates[8] = lambda: _core.Encoding(
            bits=8, q=(grouped - zeros[:, None, :]).reshape(k, n), scale=s32, zero_point=None)
    return reference, candidates


def from_gptq(qweight, qzeros, scales, g_idx=None, *, bits: int = 4, version: int = 1,
              target_bits: int | None = None, pack: bool = True, exact: bool = True,
              permute_act_order: bool = False):
    """Imports one GPTQ linear layer as a `QuantizedWeight`.

    Args:
      qweight: int32 ``[K * bits / 32, N]``.
      qzeros: int32 ``[G, N * bits / 32]``.
      scales: float ``[G, N]``; G must divide K (group size ``K / G``;
        ``G = 1`` is GPTQ's ``group_size=-1`` and becomes per-channel).
      g_idx: optional int ``[K]``. ``g_idx[k] == k // group_size`` is the plain
        layout. Any other order ("act-order" / ``desc_act``) has groups that are
        not contiguous along K; it raises unless `permute_act_order`.
      bits: 4 or 8.
      version: 1 (zeros stored minus one; AutoGPTQ and most published
        checkpoints) or 2 (GPTQModel's ``gptq_v2``).
      target_bits: 4 or 8 (default: `bits`). 8 for a 4-bit source stores
        ``q - z`` unpacked, exact for float32 scales too.
      pack: store 4-bit values two per byte.
      exact: raise if the result is not bit-exact (see the module docstring).
      permute_act_order: with act-order `g_idx`, sort the input features by
        group and return ``(weight, perm)``: then
        ``x @ W == quantized_matmul(x[..., perm], weight)``.

    Returns:
      `QuantizedWeight`, or ``(QuantizedWeight, perm)`` with `permute_act_order`.
    """
    if bits not in _BITS:
        raise ValueError(f"bits: expected 4 or 8, got {bits}")
    if version not in (1, 2):
        raise ValueError(f"version: expected 1 (AutoGPTQ, zeros stored minus one) or 2 "
                         f"(gptq_v2), got {version}")
    qweight = _core.check_array(qweight, "qweight", dtypes=("int32", "uint32"), ndim=2)
    per = 32 // bits
    k, n = qweight.shape[0] * per, qweight.shape[1]
    scales = _core.check_float(scales, "scales", ndim=2)
    if scales.shape[1] != n:
        raise ValueError(f"scales: expected shape [G, {n}] (N from qweight "
                         f"{_core.shape_str(qweight.shape)}), got {_core.shape_str(scales.shape)}")
    n_groups = scales.shape[0]
    group_size = _core.split_groups(k, n_groups, "scales")
    if n % per:
        raise ValueError(f"qweight: N={n} output features do not fill whole qzeros words "
                         f"({per} per int32)")
    qzeros = _core.check_array(qzeros, "qzeros", dtypes=("int32", "uint32"),
                               shape=(n_groups, n // per))
    codes = _core.unpack_words(qweight, bits, axis=0)  # [K, N]
    zeros = _core.unpack_words(qzeros, bits, axis=1)  # [G, N]
    if version == 1:
        zeros = (zeros + 1) & ((1 << bits) - 1)

    perm = None
    if g_idx is not None:
        g_idx = _core.check_array(g_idx, "g_idx", shape=(k,), dtypes=(
            "int32", "int64", "uint32")).astype(np.int64)
        perm = _core.act_order_permutation(g_idx, group_size, name="g_idx",
                                           permute=permute_act_order)
        if perm is not None:
            codes = codes[perm]

    reference, candidates = subtract_zero_candidates(codes, zeros, scales, bits, group_size)
    weight = _core.assemble(reference, candidates, group_size=group_size,
                            target_bits=bits if target_bits is None else target_bits,
                            exact=exact, pack=pack, source="GPTQ")
    if permute_act_order:
        return weight, (np.arange(k) if perm is None else perm)
    return weight
