"""AWQ checkpoints, GEMM version (AutoAWQ's default ``WQLinear_GEMM``).

Source convention: ``w[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with
``g = k // group_size`` and 4-bit unsigned q, z.

Tensors (K input features, N output features, G = K / group_size):

* ``qweight`` int32 ``[K, N / 8]``: codes packed along N, eight per word,
  interleaved: nibble j of word c (bits ``[4j, 4j+4)``) holds output feature
  ``8c + ORDER[j]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``; equivalently
  output feature ``8c + i`` is nibble ``REVERSE_ORDER[i]`` with
  ``REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]``.
* ``qzeros`` int32 ``[G, N / 8]``: zero codes, packed the same way.
* ``scales`` float16 ``[G, N]``.

Zeros are stored as is (no GPTQ-v1 "minus one"). The mapping onto this
project's convention and its exactness are GPTQ's (see `gptq`).
"""

from __future__ import annotations

import numpy as np

from xla_qops.interop import _core
from xla_qops.interop.gptq import subtract_zero_candidates

REVERSE_ORDER = np.array([0, 4, 1, 5, 2, 6, 3, 7])


def _unpack_interleaved(words: np.ndarray) -> np.ndarray:
    nibbles = _core.unpack_words(words, 4, axis=1)  # nibble order
    rows, cols = nibbles.shape
    return nibbles.reshape(rows, cols // 8, 8)[:, :, REVERSE_ORDER].reshape(rows, cols)


def from_awq(qweight, qzeros, scales, *, target_bits: int | None = None, pack: bool = True,
             exact: bool = True):
    """Imports one AWQ (GEMM) linear layer as a `QuantizedWeight`.

    Args:
      qweight: int32 ``[K, N / 8]``.
      qzeros: int32 ``[G, N / 8]``.
      scales: float ``[G, N]``; the group size is ``K / G``.
      target_bits: 4 (default, packed int4) or 8 (``q - z`` unpacked, exact
        for float32 scales too).
      pack: store 4-bit values two per byte.
      exact: raise if the result is not bit-exact.
    """
    qweight = _core.check_array(qweight, "qweight", dtypes=("int32", "uint32"), ndim=2)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    scales = _core.check_float(scales, "scales", ndim=2)
    if scales.shape[1] != n:
        raise ValueError(f"scales: expected shape [G, {n}] (N = 8 * qweight.shape[1]), "
                         f"got {_core.shape_str(scales.shape)}")
    n_groups = scales.shape[0]
    group_size = _core.split_groups(k, n_groups, "scales")
    qzeros = _core.check_array(qzeros, "qzeros", dtypes=("int32", "uint32"),
                               shape=(n_groups, n // 8))
    codes = _unpack_interleaved(qweight)
    zeros = _unpack_interleaved(qzeros)
    reference, candidates = subtract_zero_candidates(codes, zeros, scales, 4, group_size)
    return _core.assemble(reference, candidates, group_size=group_size,
                          target_bits=4 if target_bits is None else target_bits,
                          exact=exact, pack=pack, source="AWQ")
