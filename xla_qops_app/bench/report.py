"""Markdown table and PNG plot of `xla-qops bench` results."""

from __future__ import annotations

import math

PEER_TITLES = {
    "torch_q": "torch int kernel",
    "torch_bf16": "bf16 torch mm",
    "xla": 'impl="xla"',
    "torch_xla": "torch_xla op",
}


def _ratio(row, peer):
    t = row["times"].get(peer)
    return None if t is None else t / row["times"]["ours"]


def _fmt_ratio(r):
    return "–" if r is None else (f"{r:.0f}x" if r >= 100 else f"{r:.2f}x")


def table(rows, read_bw) -> str:
    """One line per case: our time, GB/s (and its share of the read bandwidth
    measured alongside the case, else `read_bw`), and speed-ups (peer time / ours)."""
    head = ("| shape (in×out) | M | scheme | ours ms | GB/s (% of read BW) | "
            + " | ".join(f"vs {PEER_TITLES[p]}" for p in PEER_TITLES) + " |")
    lines = [head, "|" + "---|" * (5 + len(PEER_TITLES))]
    for r in rows:
        gbs = r["bytes"] / r["times"]["ours"] / 1e9
        lines.append(
            f"| {r['k']}×{r['n']} | {r['m']} | {r['scheme']} | {r['times']['ours'] * 1e3:.3f} | "
            f"{gbs:.1f} ({100 * gbs / r.get('read_bw', read_bw):.0f}%) | "
            + " | ".join(_fmt_ratio(_ratio(r, p)) for p in PEER_TITLES) + " |")
    return "\n".join(lines)


def bf16_peak(rows):
    """The bf16 arithmetic peak measured in the run: the best GFLOP/s of bf16
    torch.mm (oneDNN, vdpbf16ps) over the prefill cases, or None."""
    rates = [2 * r["m"] * r["k"] * r["n"] / r["times"]["torch_bf16"] / 1e9 for r in rows
             if r["m"] >= 64 and r["times"].get("torch_bf16")]
    return max(rates) if rates else None


def targets(rows, read_bw) -> str:
    """Issue K's targets (small batches), then the prefill targets kept from
    before, each with the measured figure and met / missed."""
    out = []

    def line(text, value, ok):
        out.append(f"- {text}: **{value}** — {'met' if ok else 'MISSED'}")

    peak = bf16_peak(rows)
    for r in rows:
        if not r["scheme"].startswith("w4a16-g128") or r["m"] not in (1, 4, 16):
            continue
        where = f"{r['scheme']} M={r['m']} {r['k']}×{r['n']}"
        q = _ratio(r, "torch_q")
        if r["m"] == 1:
            gbs = r["bytes"] / r["times"]["ours"] / 1e9
            bw = r.get("read_bw", read_bw)
            line(f"{where} ≥ 80% of the read bandwidth measured alongside",
                 f"{gbs:.1f} GB/s = {100 * gbs / bw:.0f}% of {bw:.1f}", gbs >= 0.8 * bw)
        elif r["m"] == 4 and q is not None:
            line(f"{where} ≥ 1.5x torch int4 kernel", f"{q:.2f}x", q >= 1.5)
        elif r["m"] == 16:
            if q is not None:
                line(f"{where} ≥ 2.0x torch int4 kernel", f"{q:.2f}x", q >= 2.0)
            if peak:
                rate = 2 * r["m"] * r["k"] * r["n"] / r["times"]["ours"] / 1e9
                line(f"{where} ≥ 50% of the bf16 peak ({peak:.0f} GFLOP/s, best bf16 torch.mm "
                     f"of this run)", f"{rate:.0f} GFLOP/s = {100 * rate / peak:.0f}%",
                     rate >= 0.5 * peak)
    for r in rows:
        if r["scheme"] == "w8a16" and r["m"] <= 4 and _ratio(r, "torch_q") is not None:
            q = _ratio(r, "torch_q")
            line(f"w8a16 M={r['m']} {r['k']}×{r['n']} vs torch int8 kernel (≥ 1.5x)", f"{q:.2f}x", q >= 1.5)
    out.append("")
    out.append("Prefill (earlier targets, kept for comparison):")
    out.append("")
    for r in rows:
        if r["m"] == 256 and _ratio(r, "torch_bf16") is not None:
            q = _ratio(r, "torch_bf16")
            need = 1.5 if r["scheme"] == "w8a8" else 1.0
            line(f"{r['scheme']} M=256 {r['k']}×{r['n']} vs bf16 torch mm (≥ {need}x)", f"{q:.2f}x", q >= need)
    worst = [(_ratio(r, "xla"), r) for r in rows if _ratio(r, "xla") is not None]
    if worst:
        q, r = min(worst, key=lambda t: t[0])
        line(f'every case vs impl="xla" (≥ 10x; worst: {r["scheme"]} M={r["m"]} {r["k"]}×{r["n"]})',
             f"{q:.1f}x", q >= 10)
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
            pts = [(r["m"], _ratio(r, "torch_bf16")) for r in sel if _ratio(r, "torch_bf16")]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colors[s], label=f"{s} (ours)")
            tq = [(r["m"], r["times"]["torch_bf16"] / r["times"]["torch_q"]) for r in sel
                  if r["times"].get("torch_q") and r["times"].get("torch_bf16")]
            if tq:
                ax.plot(*zip(*tq), "x--", color=colors[s], alpha=0.6, label=f"{s} (torch kernel)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="speed-up over bf16 torch mm",
               title=f"{k}×{n} (in×out)")
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
