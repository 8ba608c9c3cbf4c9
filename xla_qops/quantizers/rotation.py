"""Hadamard rotation of a layer's inputs (``smoothing="hadamard"`` of both
`quantize_model` faces: `torch_bridge.quantize_model` and `xla_qops.nnx.quantize_model`).

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
once, in float64, before it is quantized, and to x at run time by the layer
(the torch module, `torch_bridge.rotation`; the NNX one, `rotate_rows`).
b = 64 = 4^3 makes every entry +-1/8, exact in every float type. What a
checkpoint stores is b (``<layer>.input_rotation``, an int64 scalar); H is
derived from it.

This module is numpy (the quantizers' side) but for `rotate_rows`, which
imports jax when called.
"""

from __future__ import annotations

import numpy as np

MAX_BLOCK = 64  # MiniLM W8A8, held-out mean cosine: 0.99965 (b=64), 0.99964 (128), 0.99962 (512)
# Methods that fit the rotated problem layer by layer (W H, X^T X as H^T X^T X H);
# AWQ there is its clip search alone: the rotation has already spread the input
# channels that its per-channel scale would balance.
METHODS = ("rtn", "hqq", "gptq", "awq", "awq+gptq")


def block_for(in_features: int) -> int:
    """The rotation block of a layer with `in_features` inputs: the largest power of two
    dividing it, at most MAX_BLOCK; 1 (no rotation) for an odd `in`."""
    return min(MAX_BLOCK, in_features & -in_features)


def describe(block: int, in_features: int) -> str:
    """What quantization reports say of a layer's rotation."""
    if block > 1:
        return f"Hadamard rotation, blocks of {block}"
    return f"not rotated (in_features={in_features} is odd)"


def rotated_count(rotated: int, layers: int) -> str:
    """How many of a model's quantized layers rotate their inputs, as reports say it
    (every layer with an even `in` does)."""
    return f"{rotated} of {layers} layers" + (
        " (the others have an odd in_features)" if rotated < layers else "")


def check_arguments(scheme_name: str, method: str) -> None:
    """`smoothing="hadamard"`'s rules for a scheme and a method (both faces)."""
    if "-" in scheme_name:  # the float element formats: w8a16-fp8, w4a16-nvfp4, ...
        raise ValueError(f"smoothing: 'hadamard' is for the integer schemes (w8a16, "
                         f"w4a16, w8a8, w4a8); with fp8 activations it measured worse "
                         f"than none (MiniLM w8a8-fp8: 0.99557 against 0.99757), got "
                         f"scheme={scheme_name!r}")
    if method not in METHODS:  # the others use input scales or whole blocks
        raise ValueError(f"method: smoothing='hadamard' takes one of "
                         f"{', '.join(map(repr, METHODS))}, got {method!r}")


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


def rotate_rows(x, block: int):
    """x H for a JAX array x [..., in] (in a multiple of `block`): products with H's
    entries in float32 (exact where `block` is a power of 4), summed in float32, rounded
    once to x's dtype -- torch_bridge's `rotate_input` arithmetic."""
    import jax
    import jax.numpy as jnp

    h = jnp.asarray(hadamard(block), jnp.float32)
    rows = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    out = jnp.matmul(rows, h, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(x.shape).astype(x.dtype)
