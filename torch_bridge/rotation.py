"""Hadamard rotation of a layer's inputs (quantize_model's ``smoothing="hadamard"``).

Per-token int8 activations lose most where a few channels carry values far
larger than the rest (LayerNorm outputs, GELU outputs): the token's one scale
is set by the outliers and every other channel gets a few levels. Rotating
the inputs by an orthogonal matrix spreads each outlier over many channels
(QuaRot, Ashkboos et al. 2024; QuIP#'s incoherence processing), and the
weight rotated by the same matrix undoes it exactly in real arithmetic:

    y = x W^T = (x H)(W H)^T          (H H^T = I)

The weight in the rotated basis is smoother too (its outlier input columns
are spread alike), so weight-only schemes gain as well, and AWQ's clips and
GPTQ fit the rotated problem (W H with the rotated inputs' H^T X^T X H)
better than the original: MiniLM held-out W4A16 g128 0.98675, per-channel
0.98501, W4A8 g128 0.98651, W8A8 0.99980 in 33-41 s each (docs/quantizers.md).

H here is block-diagonal: normalised Sylvester Hadamard blocks of `b`
features (b a power of two dividing `in`, at most `MAX_BLOCK`), applied to W
once, in float64, before it is quantized, and to x at run time: one 2-D
product [tokens * in / b, b] @ H_b (in * b multiply-adds per token, 1/6 of a
384 x 384 layer's at b = 64), or on the direct CPU path for small x a fast
Walsh-Hadamard transform in C++ (`KERNEL_ELEMENTS`). b = 64 = 4^3 makes every
entry +-1/8, exact in every float type.
"""

from __future__ import annotations

import numpy as np
import torch

# Up to this many elements of x, the direct CPU path rotates in C++ (a fast
# Walsh-Hadamard transform per row, `_cpu_ops.hadamard_rows`): at M=1 a torch mm's
# call cost more than its work (2048 -> 5632 W4A16, eager: +24 us in C++ against
# +34-100 us with torch.mm); above, torch's mm (M=128: +6-13% against the scalar
# transform's +25%).
KERNEL_ELEMENTS = 16 * 4096
MAX_BLOCK = 64  # MiniLM W8A8, held-out mean cosine: 0.99965 (b=64), 0.99964 (128), 0.99962 (512)


def block_for(in_features: int) -> int:
    """The rotation block of a layer with `in_features` inputs: the largest power of two
    dividing it, at most MAX_BLOCK; 1 (no rotation) for an odd `in`."""
    return min(MAX_BLOCK, in_features & -in_features)


def describe(block: int, in_features: int) -> str:
    """What quantization reports say of a layer's rotation."""
    if block > 1:
        return f"Hadamard rotation, blocks of {block}"
    return f"not rotated (in_features={in_features} is odd)"


def hadamard(block: int) -> np.ndarray:
    """The normalised Sylvester Hadamard matrix of order `block` (a power of two), float64:
    symmetric and orthogonal, so it is its own inverse."""
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(block)


def check_block(block, in_features: int) -> int:
    """`block` as an int: a power of two >= 2 dividing `in_features`."""
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise TypeError(f"block: expected an int, got {type(block).__name__}")
    block = int(block)
    if block < 2 or block & (block - 1) or in_features % block:
        raise ValueError(f"block: expected a power of two >= 2 dividing in_features="
                         f"{in_features}, got {block}")
    return block


def rotate_weight_array(w: np.ndarray, block: int) -> np.ndarray:
    """W H for a float numpy weight [out, in] (float64 products, float32 result)."""
    out_features, in_features = w.shape
    rotated = np.asarray(w, np.float64).reshape(out_features, -1, block) @ hadamard(block)
    return rotated.reshape(out_features, in_features).astype(np.float32)


def rotate_hessian(h_x: np.ndarray, block: int) -> np.ndarray:
    """H^T (X^T X) H: the second moment of the rotated inputs X H, from X's [in, in]
    (float64; H block-diagonal and symmetric, so one block on each side of every
    b x b tile: 2 in^2 b multiply-adds)."""
    n = h_x.shape[0]
    hb = hadamard(block)
    tiles = np.asarray(h_x, np.float64).reshape(n // block, block, n // block, block)
    left = np.einsum("ai,paqb->piqb", hb, tiles)
    return np.einsum("piqb,bj->piqj", left, hb).reshape(n, n)


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
