"""GPTQ: error-compensating rounding with the inverse Hessian of the inputs.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (2022). For a layer ``y = x W^T`` the output error
of a weight error D is ``tr(D H D^T)`` with ``H = X^T X`` (X the layer's
inputs, ``[n, in]``). Columns are rounded one at a time (in order of
decreasing ``H_jj`` with `act_order`: the most used features first); the
rounding error of column j, divided by the pivot of the upper Cholesky
factor U of ``H^-1``, is subtracted from the columns not yet rounded along
U's row j, which is the least-squares compensation for it.

Grid: each group's scale and zero point are round-to-nearest's, from the
original weight ("static groups"), so groups stay contiguous in API.md's
layout whatever the column order (act-order checkpoints elsewhere carry a
permutation instead). The float formats (`float_formats.FloatGrid`) round
each column to the nearest value of their element (e4m3 / e2m1, RNE,
saturating at 448 / 6) times the group's scale, so every value GPTQ stores is
a representable code. Dampening: ``H += damp * mean(diag H) * I``; features
no sample ever used (``H_jj = 0``) get ``H_jj = 1`` and weight 0 in the
compensation (their value cannot matter to the outputs); if the Cholesky
factorisation still fails (rank-deficient inputs), the dampening grows
tenfold until it succeeds.

Memory: H, its permuted copy and U are ``[in, in]`` float64 (the copy is
freed once U is made); the weight is processed in chunks of output rows
(the algorithm treats rows independently, so chunking changes no result),
each in float64.
"""

from __future__ import annotations

import numpy as np

from xla_qops.quantizers import grid

DAMP = 0.01
BLOCK = 128  # columns whose compensation within the block is applied eagerly


def hessian(x: np.ndarray) -> np.ndarray:
    """``X^T X`` (float64) of layer inputs ``[n, in]``."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return x.T @ x


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper U with ``U^T U = (H + damp * mean(diag H) * I)^-1``; H (float64, free of dead
    columns) is damped in place. The dampening grows tenfold while H stays singular.

    One factorisation: with J the reversal permutation and ``J H J = L L^T`` (L lower),
    ``H^-1 = (J L^-T J)(J L^-1 J)`` and ``J L^-1 J`` is upper, so it is U (the unique
    Cholesky factor: positive diagonal). One factorisation and one triangular inverse
    (LAPACK's trtri) instead of the reference's three cubic steps (factorise H, invert
    it, factorise the inverse): equal results up to float64 rounding."""
    from scipy.linalg import lapack  # scipy: a dependency of jax

    base = float(np.mean(np.diag(h)))
    base = base if base > 0 else 1.0
    diagonal = np.einsum("ii->i", h)  # a writable view of the diagonal
    added = 0.0
    for attempt in range(8):
        step = damp * 10 ** attempt * base
        diagonal += step - added
        added = step
        try:
            lower = np.linalg.cholesky(h[::-1, ::-1])  # raises unless positive definite
        except np.linalg.LinAlgError:
            continue
        inverse, info = lapack.dtrtri(lower, lower=1)  # L^-1, a third of a solve's work
        del lower  # at most two [in, in] arrays live here, as before
        if info == 0:
            return np.ascontiguousarray(inverse[::-1, ::-1])
    raise np.linalg.LinAlgError("calibration: the inputs' Hessian stays singular after "
                                "dampening; pass more (or less degenerate) samples")


def quantize(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, symmetric: bool, *,
             act_order: bool = True, damp: float = DAMP, group_grid=None, element_grid=None):
    """GPTQ of a float32 ``[out, in]`` with ``H = X^T X`` ``[in, in]``: (q, scale, zero_point),
    groups form (see grid). `group_grid`: (scale, zero_point or None) ``[G, out]`` to round
    onto instead of round-to-nearest's (e.g. AWQ's clipped grids, quantizers.awq_gptq).
    `element_grid`: the grid each column rounds onto (a `float_formats.FloatGrid`: the
    float formats' values, RNE and saturating; q then holds float32 values); None: the
    int grid of `bits` and `symmetric`."""
    out_features, in_features = w.shape
    element_grid = element_grid or grid.IntGrid(bits, symmetric)
    if group_grid is None:
        grouped = grid.to_groups(w, block_size)
        scale, zero_point = element_grid.params(grouped.min(axis=-1), grouped.max(axis=-1))
    else:
        scale, zero_point = group_grid
    diag = np.diag(h)
    dead = diag == 0
    diag = np.where(dead, 1.0, diag)  # a dead feature is ordered as if H_jj were 1
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(in_features)
    hp = np.asarray(h, np.float64)[np.ix_(order, order)]  # the one copy of H made here
    hp[dead[order], dead[order]] = 1.0
    u = inverse_cholesky(hp, damp)
    del hp
    group_of = (order // block_size) if block_size != -1 else np.zeros(in_features, np.int64)
    s = scale.astype(np.float64)  # [G, out]
    z = np.zeros_like(s) if zero_point is None else zero_point.astype(np.float64)
    q = np.empty((out_features, in_features), element_grid.q_dtype)
    rows = grid.rows_per_chunk(out_features, in_features)
    for r0 in range(0, out_features, rows):
        r1 = min(r0 + rows, out_features)
        wc = w[r0:r1][:, order].astype(np.float64)
        wc[:, dead[order]] = 0.0
        qc = _columns(wc, u, s[:, r0:r1], z[:, r0:r1], group_of, element_grid)
        q[r0:r1, order] = qc
    return grid.to_groups(q, block_size), scale, zero_point


def _columns(wc, u, s, z, group_of, element_grid):
    """The column loop on one chunk of rows (in processing order), in place on wc."""
    n = wc.shape[1]
    qc = np.empty(wc.shape, element_grid.q_dtype)
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        errors = np.empty((wc.shape[0], i2 - i1))
        for i in range(i1, i2):
            g = group_of[i]
            col = wc[:, i]
            qi = element_grid.round_column(col, s[g], z[g])
            qc[:, i] = qi
            err = (col - (s[g] * qi - z[g])) / u[i, i]
            wc[:, i + 1:i2] -= np.outer(err, u[i, i + 1:i2])
            errors[:, i - i1] = err
        wc[:, i2:] -= errors @ u[i1:i2, i2:]
    return qc
