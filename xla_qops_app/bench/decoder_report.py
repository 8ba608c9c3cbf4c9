"""Markdown tables, targets and the plot of the end-to-end decoder benchmark."""

from __future__ import annotations

PEERS = (("bf16", "bf16 torch"), ("torch_int4", "torch int4"), ("torchao_int4", "torchao int4"))


def _peer(results, kind, lm_head, batch):
    """The eager peer of `kind` (bf16 has no lm_head variant)."""
    for r in results:
        v = r.variant
        if (r.batch == batch and v.path == "eager" and v.kind == kind
                and (kind == "bf16" or v.lm_head == lm_head)):
            return r
    return None


def _ratio(r, peer, attr="decode_tok_s"):
    return None if peer is None else getattr(r, attr) / getattr(peer, attr)


def _fmt(ratio):
    return "–" if ratio is None else f"{ratio:.2f}x"


def table(results, batch: int) -> str:
    head = ("| path | variant | weights MiB/step | floor ms/step | decode tok/s | % of floor | "
            + " | ".join(f"vs {title}" for _, title in PEERS)
            + " | prefill tok/s | prefill vs bf16 torch |")
    lines = [head, "|" + "---|" * (8 + len(PEERS))]
    for r in results:
        if r.batch != batch:
            continue
        v = r.variant
        peers = [_peer(results, kind, v.lm_head, batch) for kind, _ in PEERS]
        bf16 = peers[0]
        name = v.name.rsplit(" [", 1)[0]
        lines.append(
            f"| {v.path} | {name} | {r.step_bytes / 2**20:.0f} | {r.floor_s * 1e3:.2f} | "
            f"{r.decode_tok_s:.1f} | {100 * r.floor_share:.0f}% | "
            + " | ".join(_fmt(_ratio(r, p)) if p is not r else "1.00x" for p in peers)
            + f" | {r.prefill_tok_s:.0f} | {_fmt(_ratio(r, bf16, 'prefill_tok_s'))} |")
    return "\n".join(lines)


def _find(results, batch, path, kind, scheme=None, symmetric=True, lm_head=True):
    for r in results:
        v = r.variant
        if (r.batch == batch and v.path == path and v.kind == kind
                and (scheme is None or (v.scheme == scheme and v.symmetric == symmetric))
                and (kind == "bf16" or v.lm_head == lm_head)):
            return r
    return None


def targets(results) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for issue G's targets, batch 1 unless stated."""
    out = []
    for path in ("eager", "jax"):
        bf16 = _find(results, 1, "eager", "bf16")
        int4 = _find(results, 1, "eager", "torch_int4", lm_head=True)
        for sym in (True, False):
            ours = _find(results, 1, path, "xla_qops", "w4a16", sym)
            if ours is None:
                continue
            label = f"W4A16 g128 {'sym' if sym else 'asym'} +lm_head [{path}]"
            if int4 is not None:
                q = _ratio(ours, int4)
                out.append((f"{label} decode ≥ 1.3x torch int4 +lm_head", f"{q:.2f}x", q >= 1.3))
            if bf16 is not None:
                q = _ratio(ours, bf16)
                out.append((f"{label} decode ≥ 2.5x bf16 torch", f"{q:.2f}x", q >= 2.5))
            out.append((f"{label} ≥ 70% of the bytes-per-token floor",
                        f"{100 * ours.floor_share:.0f}%", ours.floor_share >= 0.7))
        for lm_head in (True, False):
            ours = _find(results, 1, path, "xla_qops", "w8a16", lm_head=lm_head)
            if ours is not None and bf16 is not None:
                q = _ratio(ours, bf16)
                head = " +lm_head" if lm_head else ""
                out.append((f"W8A16 pc{head} [{path}] decode ≥ 1.6x bf16 torch", f"{q:.2f}x",
                            q >= 1.6))
        for batch in (1, 4):
            ours = _find(results, batch, path, "xla_qops", "w8a8", lm_head=True)
            bf16b = _find(results, batch, "eager", "bf16")
            if ours is not None and bf16b is not None:
                q = _ratio(ours, bf16b, "prefill_tok_s")
                out.append((f"W8A8 pc +lm_head [{path}] prefill ≥ 1.5x bf16 torch (batch {batch})",
                            f"{q:.2f}x", q >= 1.5))
    return out


def targets_markdown(results) -> str:
    return "\n".join(f"- {text}: **{value}** — {'met' if ok else 'MISSED'}"
                     for text, value, ok in targets(results))


def xla_table(rows) -> str:
    """The torch_xla-device section: compilations and times of two generations."""
    lines = ["| variant | first generate: compilations, s | repeat: compilations, s | "
             "repeat decode tok/s | tokens = CPU tensors' |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.variant.name.rsplit(' [', 1)[0]} | {r.compiles_first}, "
                     f"{r.first_s:.1f} | {r.compiles_repeat}, {r.repeat_s:.1f} | "
                     f"{r.decode_tok_s:.1f} | {'yes' if r.same_tokens else 'NO'} |")
    return "\n".join(lines)


def plot(results, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 0.32 * len(results) + 2),
                             squeeze=False)
    colors = {"eager": "#4c72b0", "jax": "#dd8452"}
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in results if r.batch == batch][::-1]
        ax.barh([r.variant.name for r in rows], [r.decode_tok_s for r in rows],
                color=[colors[r.variant.path] for r in rows])
        for i, r in enumerate(rows):
            ax.text(r.decode_tok_s, i, f" {r.decode_tok_s:.1f}", va="center", fontsize=7)
        ax.set_xlabel("decode tokens/s (higher is better)")
        ax.set_title(f"batch {batch}")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
