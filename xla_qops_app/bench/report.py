"""Markdown table and PNG plot of `xla-qops bench` results, and the one way
every benchmark here turns two measurements into a ratio (`ratio`).

The rules every published figure follows are docs/benchmarks.md's; what code
can enforce of them is here: `ratio` refuses to compare measurements of two
different quantization schemes unless the caller says which differs and why
(`across`), and every ratio carries the spread of its per-turn ratios.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence


class SchemeMismatch(ValueError):
    """A ratio between measurements of two different schemes, with no label
    saying which differs and why."""


@dataclasses.dataclass(frozen=True)
class Ratio:
    """median(num) / median(den) over the turns both took, and the range of the
    per-turn ratios.

    low, high: min and max of num[i] / den[i] over the turns both sides were
    timed in (paired by turn: the implementations took turns within every
    repetition); turns: how many. across: None when both sides ran the same
    scheme, else the label that says which differs and why."""

    value: float
    low: float
    high: float
    turns: int
    across: str | None = None

    def text(self, spread: bool = True) -> str:
        """'1.23x', with ' (1.10–1.31)' when more than one turn was paired."""
        out = fmt_ratio(self.value)
        if spread and self.turns > 1:
            out += f" ({_fmt_bound(self.low)}–{_fmt_bound(self.high)})"
        return out


def ratio(num: Sequence[float], den: Sequence[float], *, num_scheme: str, den_scheme: str,
          across: str | None = None) -> Ratio:
    """The ratio of two implementations' measurements from the same turns.

    num, den: the per-turn measurements (seconds, or tokens/s), in turn order;
    over the first min(len(num), len(den)) turns (both sides took those), the
    value is median(num) / median(den) and the spread that of num[i] / den[i]. num_scheme, den_scheme: what each side computes
    (quantization scheme and coverage, e.g. "w4a16-g128-asym +lm_head", or
    "bf16"). Raises SchemeMismatch if they differ and `across` does not say how
    and why; a label given for two equal schemes is dropped."""
    if num_scheme != den_scheme and not across:
        raise SchemeMismatch(
            f"ratio: {num_scheme!r} against {den_scheme!r} is a comparison across schemes; "
            "pass across='<which differs and why>' to publish it labelled")
    if not num or not den:
        raise ValueError("ratio: no measurements on one side")
    n = min(len(num), len(den))  # the turns both sides took (a slow peer takes fewer)
    paired = [a / b for a, b in zip(num[:n], den[:n])]
    # median(num) >= low * median(den) as num[i] >= low * den[i] for every i: the
    # value always lies within its range.
    return Ratio(statistics.median(num[:n]) / statistics.median(den[:n]), min(paired),
                 max(paired), n, across if num_scheme != den_scheme else None)


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else (f"{r:.0f}x" if r >= 100 else f"{r:.2f}x")


def _fmt_bound(r: float) -> str:
    return f"{r:.0f}" if r >= 100 else f"{r:.2f}"


def fmt_range(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """' (lo–hi)' of `values` times `scale`, or '' for fewer than two values."""
    if len(values) < 2:
        return ""
    return f" ({min(values) * scale:.{digits}f}–{max(values) * scale:.{digits}f})"


# ---------------------------------------------------------------------------
# `xla-qops bench`: one row per case, ratios = peer time / our time

UNQUANTIZED = "bf16 weights, unquantized: what quantizing replaces"

SAME_BYTES = ("integer elements (weights, and activations for A8) instead of the float "
              "format's, the same bytes (bits, block size, scales) from the same float "
              "weights: what the float format costs")

# peer -> (column title, the peer's scheme: None = the row's own, and the label
# when it differs). torch's int kernel and torch_xla's op are given the very
# weights ours reads (same scheme); bf16 torch mm is the unquantized layer;
# "twin" is the row's `twin_scheme` (a float format's integer counterpart,
# xla_qops_app.bench.peers.Scheme.int_twin); torchao quantizes the same float
# weights with the row's scheme (W8A16-fp8).
PEERS = {
    "torch_q": ("torch int kernel, same weights", None, None),
    "torch_bf16": ("bf16 torch mm (unquantized)", "bf16", UNQUANTIZED),
    "torch_xla": ("torch_xla op, same weights (one, reused)", None, None),
    "int_twin": ("ours on the int scheme of the same bytes (float formats)", "twin", SAME_BYTES),
    "torchao_fp8": ("torchao float8 weight-only, same scheme", None, None),
}


def peer_ratio(row, peer) -> Ratio | None:
    """Peer time / our time for a case (None if the peer did not run), with
    the spread of the per-turn ratios."""
    samples = row.get("samples", {})
    if not samples.get(peer) or not samples.get("ours"):
        return None
    _, scheme, across = PEERS[peer]
    scheme = row.get("twin_scheme") if scheme == "twin" else scheme
    return ratio(samples[peer], samples["ours"], num_scheme=scheme or row["scheme"],
                 den_scheme=row["scheme"], across=across)


def float_over_int(row) -> Ratio | None:
    """A float-format row's time over its integer twin's from the same turns
    (fp8 / int8, fp4 / int4; <= 1.10 is issue F's target), or None."""
    samples = row.get("samples", {})
    if not samples.get("int_twin") or not samples.get("ours"):
        return None
    return ratio(samples["ours"], samples["int_twin"], num_scheme=row["scheme"],
                 den_scheme=row["twin_scheme"], across=SAME_BYTES)


def _ratio_value(row, peer):
    r = peer_ratio(row, peer)
    return None if r is None else r.value


def _peer_cell(row, peer) -> str:
    r = peer_ratio(row, peer)
    if r is None:
        return "–"
    text = r.text()
    if row.get("compiles", {}).get(peer):
        text += f", includes compilation ({row['compiles'][peer]} in its turns)"
    return text


def table(rows, read_bw) -> str:
    """One line per case: our time (median, and min–max over the turns), GB/s
    (and its share of the read bandwidth measured alongside the case, else
    `read_bw`), and speed-ups (peer time / ours, and the min–max of the
    per-turn ratios)."""
    head = ("| shape (in×out) | M | scheme | ours ms (min–max) | GB/s (% of read BW) | "
            + " | ".join(f"vs {title}" for title, _, _ in PEERS.values()) + " |")
    lines = [head, "|" + "---|" * (5 + len(PEERS))]
    for r in rows:
        gbs = r["bytes"] / r["times"]["ours"] / 1e9
        lines.append(
            f"| {r['k']}×{r['n']} | {r['m']} | {r['scheme']} | {r['times']['ours'] * 1e3:.3f}"
            f"{fmt_range(r.get('samples', {}).get('ours', []), 1e3)} | "
            f"{gbs:.1f} ({100 * gbs / r.get('read_bw', read_bw):.0f}%) | "
            + " | ".join(_peer_cell(r, p) for p in PEERS) + " |")
    return "\n".join(lines)


def bf16_peak(rows):
    """The bf16 arithmetic peak measured in the run: the best GFLOP/s of bf16
    torch.mm (oneDNN, vdpbf16ps) over the prefill cases, or None."""
    rates = [2 * r["m"] * r["k"] * r["n"] / r["times"]["torch_bf16"] / 1e9 for r in rows
             if r["m"] >= 64 and r["times"].get("torch_bf16")]
    return max(rates) if rates else None


def targets(rows, read_bw) -> str:
    """Issue K's targets (small batches), then the prefill targets kept from
    before, each with the measured figure (ratios with their per-turn range)
    and met / missed. Every ratio against torch's kernels is same weights,
    same scheme; the prefill targets are against the unquantized bf16 layer."""
    out = []

    def line(text, value, ok):
        out.append(f"- {text}: **{value}** — {'met' if ok else 'MISSED'}")

    peak = bf16_peak(rows)
    for r in rows:
        if not r["scheme"].startswith("w4a16-g128") or r["m"] not in (1, 4, 16):
            continue
        where = f"{r['scheme']} M={r['m']} {r['k']}×{r['n']}"
        q = peer_ratio(r, "torch_q")
        if r["m"] == 1:
            gbs = r["bytes"] / r["times"]["ours"] / 1e9
            bw = r.get("read_bw", read_bw)
            line(f"{where} ≥ 80% of the read bandwidth measured alongside",
                 f"{gbs:.1f} GB/s = {100 * gbs / bw:.0f}% of {bw:.1f}", gbs >= 0.8 * bw)
        elif r["m"] == 4 and q is not None:
            line(f"{where} ≥ 1.5x torch int4 kernel (same weights)", q.text(), q.value >= 1.5)
        elif r["m"] == 16:
            if q is not None:
                line(f"{where} ≥ 2.0x torch int4 kernel (same weights)", q.text(),
                     q.value >= 2.0)
            if peak:
                rate = 2 * r["m"] * r["k"] * r["n"] / r["times"]["ours"] / 1e9
                line(f"{where} ≥ 50% of the bf16 peak ({peak:.0f} GFLOP/s, best bf16 torch.mm "
                     f"of this run)", f"{rate:.0f} GFLOP/s = {100 * rate / peak:.0f}%",
                     rate >= 0.5 * peak)
    for r in rows:
        q = peer_ratio(r, "torch_q")
        if r["scheme"] == "w8a16" and r["m"] <= 4 and q is not None:
            line(f"w8a16 M={r['m']} {r['k']}×{r['n']} vs torch int8 kernel, same weights "
                 f"(≥ 1.5x)", q.text(), q.value >= 1.5)
    for r in rows:
        f = float_over_int(r)
        if f is not None and r["m"] <= 16:
            line(f"{r['scheme']} M={r['m']} {r['k']}×{r['n']}: time / {r['twin_scheme']}'s "
                 f"(same bytes, same turns) ≤ 1.10", f.text(), f.value <= 1.10)
    out.append("")
    out.append("Prefill (earlier targets, kept for comparison; against the unquantized bf16 "
               "layer):")
    out.append("")
    for r in rows:
        q = peer_ratio(r, "torch_bf16")
        if r["m"] == 256 and q is not None:
            need = 1.5 if r["scheme"] == "w8a8" else 1.0  # w8a8-fp8 (issue F): not slower
            line(f"{r['scheme']} M=256 {r['k']}×{r['n']} vs bf16 torch mm (≥ {need}x)", q.text(),
                 q.value >= need)
    return "\n".join(out)


def plot(rows, read_bw, path) -> None:
    """Per shape: speed-up over bf16 torch mm vs M for ours and torch's kernels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({(r["k"], r["n"]) for r in rows})
    schemes = sorted({r["scheme"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5.2 * (len(shapes) + 1), 4.4), squeeze=False)
    colors = dict(zip(schemes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (k, n) in zip(axes[0], shapes):
        for s in schemes:
            sel = sorted((r for r in rows if (r["k"], r["n"], r["scheme"]) == (k, n, s)), key=lambda r: r["m"])
            pts = [(r["m"], _ratio_value(r, "torch_bf16")) for r in sel if _ratio_value(r, "torch_bf16")]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colors[s], label=f"{s} (ours)")
            tq = [(r["m"], r["times"]["torch_bf16"] / r["times"]["torch_q"]) for r in sel
                  if r["times"].get("torch_q") and r["times"].get("torch_bf16")]
            if tq:
                ax.plot(*zip(*tq), "x--", color=colors[s], alpha=0.6, label=f"{s} (torch kernel)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)",
               ylabel="speed-up over bf16 torch mm (unquantized)", title=f"{k}×{n} (in×out)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    dec = [r for r in rows if r["m"] == 1]
    labels = [f"{r['scheme']}\n{r['k']}×{r['n']}" for r in dec]
    vals = [r["bytes"] / r["times"]["ours"] / 1e9 for r in dec]
    ax.barh(range(len(dec)), vals, color=[colors[r["scheme"]] for r in dec])
    ax.set_yticks(range(len(dec)), labels, fontsize=6)
    ax.axvline(read_bw, color="k", ls="--", label=f"measured read BW {read_bw:.1f} GB/s")
    ax.axvline(0.7 * read_bw, color="k", ls=":", label="70%")
    ax.set(xlabel="effective GB/s at M=1 (weights rotated past the LLC)", title="decode bandwidth")
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None
