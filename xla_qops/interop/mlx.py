"""MLX checkpoints (``mx.quantize``, affine mode, bits 4 or 8).

Source convention, weight ``[N, K]`` (MLX ``Linear`` keeps torch's
orientation), groups of ``group_size`` along K::

    w[n, k] = scales[n, g] * q[n, k] + biases[n, g]      g = k // group_size

Tensors:

* ``wq`` uint32 ``[N, K * bits / 32]``: codes packed little end first along
  K, value j of word i is input feature ``i * 32/bits + j`` at bits
  ``[j*bits, (j+1)*bits)``.
* ``scales``, ``biases`` float ``[N, K / group_size]``.

Mapping: ``target_bits=4``: ``q' = q - 8``, ``scale = s``,
``zero_point = -(b + 8 s)`` rounded to float32: exact when ``b + 8 s`` is a
float32 number (for float16/bfloat16 ``s`` and ``b``: when their exponents
differ by less than about 13). ``target_bits=8`` for a 4-bit source stores
``q`` unshifted with ``zero_point = -b``: the same two roundings as MLX
(``s * q``, then ``+ b``), so it is exact for any float32 ``s`` and ``b``.
8-bit sources use ``q' = q - 128``, ``zero_point = -(b + 128 s)``.
"""

from __future__ import annotations

import numpy as np

from xla_qops.interop import _core


def from_mlx(wq, scales, biases, *, group_size: int = 64, bits: int = 4,
             target_bits: int | None = None, pack: bool = True, exact: bool = True):
    """Imports one MLX-quantized linear weight as a `QuantizedWeight`.

    Args:
      wq: uint32 ``[N, K * bits / 32]``.
      scales, biases: float ``[N, K / group_size]``.
      group_size: MLX's group size (default 64, like ``mx.quantize``).
      bits: 4 or 8.
      target_bits: 4 or 8 (default `bits`).
      pack: store 4-bit values two per byte.
      exact: raise if the result is not bit-exact.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits}")
    wq = _core.check_array(wq, "wq", dtypes=("uint32",), ndim=2)
    n, k = wq.shape[0], wq.shape[1] * (32 // bits)
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size: expected a divisor of K={k}, got {group_size}")
    n_groups = k // group_size
    scales = _core.check_float(scales, "scales", shape=(n, n_groups))
    biases = _core.check_float(biases, "biases", shape=(n, n_groups))
    codes = _core.unpack_words(wq, bits, axis=1).T  # [K, N]
    s32, b32 = _core.f32(scales).T, _core.f32(biases).T  # [G, N]
    s64, b64 = s32.astype(np.float64), b32.astype(np.float64)
    reference = (codes.reshape(n_groups, group_size, n).astype(np.float32) * s32[:, None, :]
                 + b32[:, None, :]).reshape(k, n)
    offset = 1 << (bits - 1)
    candidates = {bits: lambda: _core.offset_encoding(bits, codes, s32, -(b64 + offset * s64))}
    if bits == 4:
        candidates[8] = lambda: _core.Encoding(bits=8, q=codes, scale=s32, zero_point=-b32)
    return _core.assemble(reference, candidates, group_size=group_size,
                          target_bits=bits if target_bits is None else target_bits,
                          exact=exact, pack=pack, source="MLX")
