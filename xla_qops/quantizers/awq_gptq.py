"""AWQ's grid, GPTQ's rounding ("awq+gptq").

Lin et al., "AWQ" (2023), section 5 / table 7, and Frantar et al., "GPTQ"
(2022): AWQ's activation-aware scaling and clipping are orthogonal to GPTQ's
error-compensating rounding, and the two together beat either alone at 4 bits.
Here:

1. (quantize_model only) AWQ's per-input-channel scale s is searched and
   folded first (torch_bridge.calibrate, as for ``method="awq"``): the weight
   quantized is ``W diag(s)`` and H is that of the scaled inputs.
2. AWQ's clip search picks each group's grid (`awq.clip_search`: the clip
   ratio with the smallest output error ``tr(D H D^T)`` of its rounding).
3. GPTQ rounds onto those grids column by column, compensating each
   rounding error through the inverse Hessian (`gptq.quantize` with
   `group_grid`), with a stronger dampening than plain GPTQ's (`DAMP`): on
   a few hundred short sentences H is dominated by a few directions, and
   compensating along them fits the calibration set more than it helps new
   text (docs/quantizers.md: the held-out figures).
"""

from __future__ import annotations

import numpy as np

from xla_qops.quantizers import awq, gptq

DAMP = 0.1  # fraction of mean(diag H) added to H's diagonal (plain GPTQ: gptq.DAMP)


def quantize(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, symmetric: bool, *,
             damp: float | None = None):
    """(q, scale, zero_point), groups form (see grid), of a float32 ``[out, in]`` given
    ``H = X^T X`` of its inputs; `damp` defaults to `DAMP`."""
    _, scale, zero_point = awq.clip_search(w, h, bits, block_size, symmetric)
    return gptq.quantize(w, h, bits, block_size, symmetric, damp=DAMP if damp is None else damp,
                         group_grid=(scale, zero_point))
