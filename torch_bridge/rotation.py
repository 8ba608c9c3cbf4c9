"""The torch side of the Hadamard rotation of a layer's inputs (quantize_model's
``smoothing="hadamard"``; what it is and why: `xla_qops.quantizers.rotation`, whose
weight, Hessian and matrix functions are re-exported here).

At run time `XlaQuantizedLinear` rotates x by one 2-D product [tokens * in / b, b] @ H_b
(in * b multiply-adds per token, 1/6 of a 384 x 384 layer's at b = 64), or on the direct
CPU path for small x by a fast Walsh-Hadamard transform in C++ (`KERNEL_ELEMENTS`).
"""

from __future__ import annotations

import torch

from xla_qops.quantizers.rotation import (  # noqa: F401  (re-exported)
    block_for, check_block, describe, hadamard, rotate_hessian, rotate_weight_array,
    rotated_count)

# Up to this many elements of x, the direct CPU path rotates in C++ (a fast
# Walsh-Hadamard transform per row, `_cpu_ops.hadamard_rows`): at M=1 a torch mm's
# call cost more than its work (2048 -> 5632 W4A16, eager: +24 us in C++ against
# +34-100 us with torch.mm); above, torch's mm (M=128: +6-13% against the scalar
# transform's +25%).
KERNEL_ELEMENTS = 16 * 4096


def rotate_input(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x H for x [..., in] and one block `h` [b, b] float32: products with h's entries
    (exact where b is a power of 4) summed in float32, rounded once to x's dtype.

    One 2-D product [tokens * in / b, b] @ [b, b] (a batched one broadcasting h ran 2.5x
    slower on MiniLM's layers). bf16 x with h exact in bf16 (b a power of 4: entries
    +-2^-k) multiplies in bf16 -- the same exact products, float32 sums rounded to bf16 --
    at about 4x the float32 product's speed (1536 x 1536 at b = 64: 0.28 against 1.2 ms,
    2 threads)."""
    block = h.shape[0]
    rows = x.reshape(-1, block)
    if x.dtype == torch.bfloat16 and block & 0x5555555555555555:  # a power of 4
        return torch.mm(rows, h.to(torch.bfloat16)).reshape(x.shape)
    return torch.mm(rows.float(), h).reshape(x.shape).to(x.dtype)
