"""AutoRound: rounding offsets and clipping learned by signed gradient descent ("autoround").

Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs" (2023, the AutoRound paper / intel/auto-round). Per
weight a rounding offset ``v`` in [-0.5, 0.5] and per group and output channel
two clipping factors ``a, b`` in [`MIN_CLIP`, 1] (of the group's min and max)
define the quantized weight

    scale, zero_point = minmax grid of [a * min, b * max]       (grid.minmax_params)
    q = clip(round((w + zero_point) / scale + v), qmin, qmax),  w_hat = scale * q - zero_point

so it starts at round to nearest (v = 0, a = b = 1), a weight moves at most
one step from its nearest code, and every value stored is a code of the grid.
The parameters minimise the layer's output error on the calibration inputs,
``tr(D H D^T)`` with ``D = w - w_hat`` and ``H = X^T X`` (as GPTQ and AWQ's
clip search do), with the rounding's gradient passed straight through.
The paper optimises each transformer block's output; here, as for the other
methods, the unit is the layer (quantize_model already quantizes layer by
layer on inputs from the layers quantized before).

Signed gradient descent (each step moves every parameter by ``lr`` times
the sign of its gradient, ``lr`` decaying linearly from `1 / steps`) bounds
how far the parameters go in total, to which the paper credits its
generalisation: it cannot fit the calibration inputs far beyond a better
rounding of each weight. (Measured per layer on MiniLM it does not beat
awq+gptq on held-out text, alone or started from awq+gptq's result:
docs/quantizers.md.) Each output row's loss is its own (``d_o H d_o^T``),
so each row keeps the parameters of its best step, round to nearest's
(step 0) included: on the calibration inputs it is never worse than round to
nearest, row by row. The optimisation runs in float32 under `jax.jit`; the
result is then rounded once more with numpy (`grid.minmax_params`,
`grid.round_to_grid` with the offsets), so scales and codes follow the same
float32 rules as every other method.
"""

from __future__ import annotations

import functools

import numpy as np

from xla_qops.quantizers import grid
from xla_qops.quantizers.awq import MIN_CLIP  # the smallest clipping factor of a group's range

STEPS = 200  # the paper's default number of iterations
# Weights optimised at once (output rows are independent): a layer up to 16M weights in one
# piece (~64 MiB per float32 copy, a few live per step), larger ones in row chunks.
ROW_ELEMENTS = 1 << 24
# |offset| at the start from another method's codes: below 0.5, so step 0 rounds to them.
START_OFFSET = 0.49


def quantize(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, symmetric: bool, *,
             steps: int = STEPS, start=None):
    """(q, scale, zero_point), groups form (see grid), of a float32 ``[out, in]`` given
    ``H = X^T X`` ``[in, in]`` of its inputs, after `steps` signed-gradient steps.

    `start`: (q, scale, zero_point) groups of another method to start from instead of
    round to nearest (`awq_gptq`'s: "awq+gptq+autoround"): its dequantized weight is what
    the offsets round and its grid's clipping (``scale`` against the group's range) the
    clip factors' start. Each offset starts where the float weight lies between the
    start's codes (`start_offsets`: within +-`START_OFFSET`, so step 0
    reproduces the start's codes), and moves at most 0.5 from there: started at 0, a
    weight sits exactly on its code and the steps (0.5 in all) could never carry it
    across a rounding boundary (torch_bridge.blockround found this first)."""
    w = np.asarray(w, np.float32)
    h32 = np.asarray(h, np.float32)
    grouped_all = grid.to_groups(w, block_size)
    if start is None:
        base_all = grouped_all
        clip_all = np.ones(grouped_all.shape[:2], np.float32)
        offsets_all = np.zeros_like(grouped_all)
    else:
        base_all = grid.dequantize(*start)
        clip_all = _clip_of(grouped_all, start[1], bits, symmetric)
        offsets_all = start_offsets(grouped_all, *start)

    def learn_and_round(rows):
        grouped = np.ascontiguousarray(grouped_all[:, rows])
        base = np.ascontiguousarray(base_all[:, rows])
        lo, hi = grouped.min(axis=-1), grouped.max(axis=-1)
        offsets, clip_lo, clip_hi = _learn(grouped, base, h32, lo, hi, clip_all[:, rows],
                                           np.ascontiguousarray(offsets_all[:, rows]), bits,
                                           symmetric, int(steps))
        scale, zero_point = grid.minmax_params(lo * clip_lo, hi * clip_hi, bits, symmetric)
        if start is not None:  # where the clipping did not move, the start's grid exactly
            kept = (clip_lo == clip_all[:, rows]) & (clip_hi == clip_all[:, rows])
            scale = np.where(kept, start[1][:, rows], scale)
            if zero_point is not None:
                zero_point = np.where(kept, start[2][:, rows], zero_point)
        return grid.round_to_grid(base, scale, zero_point, bits, offsets), scale, zero_point

    out_features = grouped_all.shape[1]
    chunk = max(1, ROW_ELEMENTS // w.shape[1])
    return grid.join_row_chunks([learn_and_round(slice(r, r + chunk))
                                 for r in range(0, out_features, chunk)])


def start_offsets(grouped, q, scale, zero_point):
    """Rounding offsets ``[G, out, B]`` (float32) that start from codes `q` on the grid
    (`scale`, `zero_point` or None) of groups `grouped`: where each float weight lies
    between the codes, ``(w + z) / s - q``, kept within +-`START_OFFSET` so that rounding
    at the start gives `q` exactly (also torch_bridge.blockround's start)."""
    shifted = grouped if zero_point is None else grouped + zero_point[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.nan_to_num(shifted / scale[..., None] - q)
    return np.clip(between, -START_OFFSET, START_OFFSET).astype(np.float32)


def _clip_of(grouped, scale, bits, symmetric):
    """The clip factor ``r`` ``[G, out]`` with which `grid.minmax_params` of ``r * [min, max]``
    gives `scale` (AWQ's clip search clips both ends by the same r), in [MIN_CLIP, 1]."""
    qmin, qmax = grid.QRANGE[bits]
    lo, hi = grouped.min(axis=-1), grouped.max(axis=-1)
    full = np.maximum(np.abs(lo), np.abs(hi)) / qmax if symmetric else (hi - lo) / (qmax - qmin)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(full > 0, scale / full, 1.0)
    return np.clip(ratio, MIN_CLIP, 1.0).astype(np.float32)


def _learn(grouped, base, h, lo, hi, clip, offsets, bits, symmetric, steps):
    """(offsets ``[G, out, B]``, clip factors of lo and hi ``[G, out]``) as float32 numpy,
    each output row's best over `steps` signed-gradient steps (step 0: the start, `clip`
    and `offsets`, which each offset leaves by at most 0.5)."""
    import jax
    import jax.numpy as jnp

    if steps <= 0:
        return offsets, clip, clip
    step = _step_function(bits, symmetric)
    w, base, h, lo, hi, clip, offsets = (jnp.asarray(a) for a in
                                         (grouped, base, h, lo, hi, clip, offsets))
    bounds = (offsets - 0.5, offsets + 0.5)
    params = (offsets, clip, clip)
    best = params
    best_loss = jnp.full(w.shape[1], jnp.inf, jnp.float32)
    lr0 = 1.0 / steps  # the paper's default learning rate
    for i in range(steps + 1):  # the last pass only scores the last step's parameters
        lr = jnp.float32(lr0 * (1.0 - i / steps))  # linear decay, as the paper's
        params, best, best_loss = step(params, best, best_loss, w, base, h, lo, hi, bounds, lr)
    return tuple(np.asarray(jax.device_get(a), np.float32) for a in best)


@functools.lru_cache(maxsize=None)
def _step_function(bits: int, symmetric: bool):
    """The jitted step: (params, best, best_loss, w, base, h, lo, hi, offset bounds, lr) -> the
    next three; the
    loss and gradient are those of the parameters passed in, which `best` keeps per row
    where they beat its loss."""
    import jax
    import jax.numpy as jnp

    qmin, qmax = grid.QRANGE[bits]

    def dequantized(params, base, lo, hi):
        offsets, clip_lo, clip_hi = params
        lo_c, hi_c = lo * clip_lo, hi * clip_hi  # grid.minmax_params, differentiably
        absmax = jnp.maximum(jnp.abs(lo_c), jnp.abs(hi_c))
        safe_absmax = jnp.where(absmax == 0, 1.0, absmax)
        if symmetric:
            scale = jnp.where(absmax == 0, 1.0, safe_absmax / qmax)
            zero_point = jnp.zeros_like(scale)
        else:
            spread = hi_c - lo_c
            scale = jnp.where(spread > 0, jnp.where(spread > 0, spread, 1.0) / (qmax - qmin),
                              jnp.where(absmax == 0, 1.0, safe_absmax / qmax))
            zero_point = jnp.where(absmax == 0, 0.0, scale * qmin - lo_c)
        x = (base + zero_point[..., None]) / scale[..., None] + offsets
        rounded = x + jax.lax.stop_gradient(jnp.round(x) - x)  # straight-through rounding
        return scale[..., None] * jnp.clip(rounded, qmin, qmax) - zero_point[..., None]

    def losses_and_grads(params, w, base, h, lo, hi):
        """Per output row ``d_o H d_o^T`` and the gradient of their sum. The gradient
        with respect to the dequantized weight is ``-2 D H`` (H symmetric), so one
        ``[out, in] x [in, in]`` product serves the loss and the gradient (autodiff of
        the loss would multiply by H a second time)."""
        w_hat, pullback = jax.vjp(lambda p: dequantized(p, base, lo, hi), params)
        groups, out, block = w.shape
        d = jnp.transpose(w - w_hat, (1, 0, 2)).reshape(out, groups * block)  # [out, in]
        dh = d @ h
        losses = jnp.sum(dh * d, axis=1)
        (grads,) = pullback(jnp.transpose((-2.0 * dh).reshape(out, groups, block), (1, 0, 2)))
        return losses, grads

    @jax.jit
    def step(params, best, best_loss, w, base, h, lo, hi, bounds, lr):
        losses, grads = losses_and_grads(params, w, base, h, lo, hi)
        better = losses < best_loss  # [out]
        best = (jnp.where(better[None, :, None], params[0], best[0]),
                jnp.where(better[None, :], params[1], best[1]),
                jnp.where(better[None, :], params[2], best[2]))
        best_loss = jnp.where(better, losses, best_loss)
        offsets = jnp.clip(params[0] - lr * jnp.sign(grads[0]), *bounds)
        clip_lo = jnp.clip(params[1] - lr * jnp.sign(grads[1]), MIN_CLIP, 1.0)
        clip_hi = jnp.clip(params[2] - lr * jnp.sign(grads[2]), MIN_CLIP, 1.0)
        return (offsets, clip_lo, clip_hi), best, best_loss

    return step
