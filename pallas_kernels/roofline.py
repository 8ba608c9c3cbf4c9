"""Roofline model behind the TPU block rule (tables in docs/pallas_kernels.md).

``python -m pallas_kernels.roofline`` prints the tables. Peak figures are the
published per-chip numbers (Cloud TPU system architecture pages:
https://cloud.google.com/tpu/docs/v5e and https://cloud.google.com/tpu/docs/v6e);
nothing here is measured.

Model of one kernel call with the tiles `block_sizes.tpu_blocks` picks:

    HBM bytes = weight bytes x (M tiles)       (the weight is re-streamed per row block)
              + activation bytes x (N tiles)   (x is re-read per column block)
              + scale / zero-point bytes x (M tiles) + output bytes
    t_hbm     = HBM bytes / HBM bandwidth
    t_mxu     = 2 M N K / peak (bf16 peak for A16, int8 peak for A8)
    t_steps   = grid steps x STEP_OVERHEAD_S
                + first step's input tiles / HBM bandwidth (its DMA is not overlapped)
    estimate  = max(t_hbm, t_mxu) + t_steps

Decode (small M) is bound by t_hbm ~ weight bytes / bandwidth, which the
quantized weight shrinks 2x (int8) or 4x (int4) against bf16; prefill turns
MXU-bound once M passes the ridge point ``M* = peak x bytes-per-weight /
(2 x bandwidth)``.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import block_sizes, shapes

# Assumed fixed cost of one grid step (DMA issue, semaphore waits, loop
# bookkeeping) -- an order of magnitude to calibrate on hardware, not a
# measurement.
STEP_OVERHEAD_S = 0.35e-6


@dataclasses.dataclass(frozen=True)
class Peak:
    name: str
    bf16_flops: float
    int8_ops: float
    hbm_bytes_per_s: float


PEAKS = {
    "v5e": Peak("v5e", 197e12, 393e12, 819e9),
    "v6e": Peak("v6e", 918e12, 1836e12, 1638e9),
}

# (name, bits, block_size, quantize_activation)
SCHEMES = [("W8A16 per-channel", 8, -1, False), ("W4A16 g128", 4, 128, False),
           ("W8A8 per-channel", 8, -1, True), ("W4A8 g128", 4, 128, True)]


def ridge_m(chip: str, bits: int, quantize_activation: bool) -> float:
    """Rows M at which MXU time equals the weight-streaming time."""
    p = PEAKS[chip]
    peak = p.int8_ops if quantize_activation else p.bf16_flops
    return peak * (bits / 8) / (2 * p.hbm_bytes_per_s)


def estimate(chip: str, m: int, k: int, n: int, bits: int, block_size: int,
             quantize_activation: bool, zero_point: bool = True) -> dict:
    """Roofline estimate of one call (seconds) with the rule's tiles."""
    p = PEAKS[chip]
    t = block_sizes.tpu_blocks(m, k, n, block_size=block_size, packed=bits == 4,
                               x_dtype="bfloat16", quantize_activation=quantize_activation,
                               chip=chip)
    gm, gn, gk = t.grid
    groups = 1 if block_size == -1 else k // block_size
    w_bytes = n * k * bits / 8
    s_bytes = n * groups * 4 * (2 if zero_point else 1)
    x_bytes = m * k * (1 if quantize_activation else 2)
    hbm = (w_bytes + s_bytes) * gm + x_bytes * gn + m * n * 2
    peak = p.int8_ops if quantize_activation else p.bf16_flops
    first_tiles = t.tn * t.tk * bits / 8 + t.tm * t.tk * (1 if quantize_activation else 2)
    t_hbm, t_mxu = hbm / p.hbm_bytes_per_s, 2 * m * n * k / peak
    t_steps = gm * gn * gk * STEP_OVERHEAD_S + first_tiles / p.hbm_bytes_per_s
    return dict(blocks=t, t_hbm=t_hbm, t_mxu=t_mxu, t_steps=t_steps,
                total=max(t_hbm, t_mxu) + t_steps,
                bound="HBM" if t_hbm >= t_mxu else "MXU")


_UP_PROJ = shapes.LLAMA3_8B[1]  # 4096 -> 14336, the MLP's gate/up projection


def markdown(k: int = _UP_PROJ.in_features, n: int = _UP_PROJ.out_features,
             ms=(1, 16, 256, 2048)) -> str:
    lines = ["| chip | scheme | ridge M* | M | tm x tn x tk (grid) | HBM us | MXU us | "
             "steps+bubble us | bound | est. us |",
             "|---|---|---:|---:|---|---:|---:|---:|---|---:|"]
    for chip in PEAKS:
        for name, bits, block, qa in SCHEMES:
            for m in ms:
                e = estimate(chip, m, k, n, bits, block, qa)
                b = e["blocks"]
                grid = "x".join(map(str, b.grid))
                lines.append(
                    f"| {chip} | {name} | {ridge_m(chip, bits, qa):.0f} | {m} | "
                    f"{b.tm} x {b.tn} x {b.tk} ({grid}) | {e['t_hbm'] * 1e6:.1f} | "
                    f"{e['t_mxu'] * 1e6:.1f} | {e['t_steps'] * 1e6:.1f} | {e['bound']} | "
                    f"{e['total'] * 1e6:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
