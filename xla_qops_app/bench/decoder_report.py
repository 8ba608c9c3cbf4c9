"""Markdown tables, targets and the plot of the end-to-end decoder benchmark.

Every ratio goes through `report.ratio`: against the peer of the same scheme
and lm_head coverage, timed in the same turns (the JAX rows' eager peers are
timed again in the JAX group's turns: `decoder.companions`), with the min–max
of the per-turn ratios. The one comparison across schemes in the tables, our
symmetric W4A16 against torch's and torchao's asymmetric int4, is labelled in
every cell and target that makes it; so is every ratio against llama.cpp
(its own formats: `LLAMA_CPP_ACROSS`), published only for the NNX group's rows
and the compiled torch step, which take turns with it.
"""

from __future__ import annotations

from xla_qops_app.bench.report import UNQUANTIZED, fmt_range, ratio

PEERS = (("bf16", "bf16 torch (unquantized)"), ("torch_int4", "torch int4 g128 asym"),
         ("torchao_int4", "torchao int4 g128 asym"))

# Our symmetric W4A16 g128 against the peers' asymmetric int4: published only
# with this label (the cell says "sym vs asym").
SYM_VS_ASYM = ("ours symmetric, the peer asymmetric: torch's int4 kernel applies a zero "
               "point whatever the weights, ours skips it for symmetric ones")


# Which llama.cpp file each of our schemes is compared with, and the label of
# that comparison across formats.
LLAMA_CPP_PEER = {"w4a16": "Q4_0", "w4a8": "Q4_0", "w8a16": "Q8_0"}
LLAMA_CPP_ACROSS = ("llama.cpp's own format: Q4_0 / Q8_0 (blocks of 32, one fp16 scale each; "
                    "its arithmetic quantizes activations to int8 blocks; default mixture, "
                    "token embeddings and lm_head as llama-quantize writes them)")


def _rows(results):
    """The table's own rows (not the companions timed in another path's turns)."""
    return [r for r in results if not r.companion]


def _peer(results, kind, lm_head, batch, group):
    """The eager peer of `kind` timed in `group`'s turns (bf16 has no lm_head variant)."""
    for r in results:
        v = r.variant
        if (r.batch == batch and v.path == "eager" and v.kind == kind
                and (r.timed_with or "eager") == group
                and (kind == "bf16" or v.lm_head == lm_head)):
            return r
    return None


def _across(r, peer) -> str | None:
    """The label of a comparison across schemes that the reports publish, or
    None when they publish none for this pair."""
    if peer.variant.kind == "bf16":
        return UNQUANTIZED
    ours = r.variant
    if peer.variant.kind == "llama_cpp":
        return (LLAMA_CPP_ACROSS if ours.kind == "xla_qops" and ours.lm_head
                and LLAMA_CPP_PEER.get(ours.scheme) == peer.variant.scheme else None)
    if (ours.kind == "xla_qops" and ours.scheme == "w4a16" and ours.block_size == 128
            and ours.symmetric and ours.lm_head == peer.variant.lm_head):
        return SYM_VS_ASYM
    return None


def compare(r, peer, attr="decode"):
    """`report.Ratio` of r's tokens/s to the peer's (`attr`: "decode" or
    "prefill"), or None if there is no peer or no published comparison of
    these two schemes."""
    if peer is None:
        return None
    runs = lambda x: getattr(x, f"{attr}_runs") or [getattr(x, f"{attr}_tok_s")]
    if r.variant.scheme_key != peer.variant.scheme_key and _across(r, peer) is None:
        return None
    return ratio(runs(r), runs(peer), num_scheme=r.variant.scheme_key,
                 den_scheme=peer.variant.scheme_key, across=_across(r, peer))


def llama_cpp_peer(results, r):
    """The llama.cpp row `r` is compared with: same batch, same turns, the file
    `LLAMA_CPP_PEER` names for r's scheme; None if there is none."""
    v = r.variant
    kind = LLAMA_CPP_PEER.get(v.scheme) if v.kind == "xla_qops" else None
    for p in results:
        if (p.batch == r.batch and p.variant.kind == "llama_cpp" and p.variant.scheme == kind
                and p.timed_with == (r.timed_with or v.path)):
            return p
    return None


def _cell(q) -> str:
    if q is None:
        return "–"
    return q.text() + (" sym vs asym" if q.across == SYM_VS_ASYM else "")


def table(results, batch: int) -> str:
    head = ("| path | variant | weights MiB/step | floor ms/step | decode tok/s (min–max) | "
            "% of floor | " + " | ".join(f"vs {title}" for _, title in PEERS)
            + " | vs llama.cpp (its format) | prefill tok/s (min–max) | "
            "prefill vs bf16 torch (unquantized) |")
    lines = [head, "|" + "---|" * (9 + len(PEERS))]
    for r in _rows(results):
        if r.batch != batch:
            continue
        v = r.variant
        peers = [_peer(results, kind, v.lm_head, batch, r.timed_with or v.path)
                 for kind, _ in PEERS]
        name = v.name.rsplit(" [", 1)[0]
        lines.append(
            f"| {v.path} | {name} | {r.step_bytes / 2**20:.0f} | {r.floor_s * 1e3:.2f} | "
            f"{r.decode_tok_s:.1f}{fmt_range(r.decode_runs, digits=1)} | "
            f"{100 * r.floor_share:.0f}% | "
            + " | ".join(_cell(compare(r, p)) for p in peers)
            + f" | {_llama_cell(results, r)}"
            + f" | {r.prefill_tok_s:.0f}{fmt_range(r.prefill_runs, digits=0)} | "
              f"{_cell(compare(r, peers[0], 'prefill'))} |")
    return "\n".join(lines)


def _llama_cell(results, r) -> str:
    peer = llama_cpp_peer(results, r)
    q = compare(r, peer)
    return "–" if q is None else f"{q.text()} vs {peer.variant.scheme}"


def _find(results, batch, path, kind, scheme=None, symmetric=True, lm_head=True, group=None):
    for r in results:
        v = r.variant
        if (r.batch == batch and v.path == path and v.kind == kind
                and (r.timed_with or v.path) == (group or path)
                and (scheme is None or (v.scheme == scheme and v.symmetric == symmetric))
                and (kind == "bf16" or v.lm_head == lm_head)):
            return r
    return None


def targets(results) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for issue G's targets, batch 1 unless stated.
    Each ratio is against the peer timed in the same turns, with the min–max
    of the per-turn ratios; the symmetric W4A16 rows against torch's
    asymmetric int4 say so."""
    out = []
    for path in ("eager", "jax"):
        bf16 = _find(results, 1, "eager", "bf16", group=path)
        int4 = _find(results, 1, "eager", "torch_int4", lm_head=True, group=path)
        for sym in (False, True):
            ours = _find(results, 1, path, "xla_qops", "w4a16", sym)
            if ours is None:
                continue
            label = f"W4A16 g128 {'sym' if sym else 'asym'} +lm_head [{path}]"
            q = compare(ours, int4)
            if q is not None:
                what = ("torch int4 +lm_head (sym vs asym: NOT like for like, ours "
                        "symmetric, torch's asymmetric)"
                        if q.across else "torch int4 +lm_head (both asymmetric)")
                out.append((f"{label} decode ≥ 1.3x {what}", q.text(), q.value >= 1.3))
            q = compare(ours, bf16)
            if q is not None:
                out.append((f"{label} decode ≥ 2.5x bf16 torch (unquantized)", q.text(),
                            q.value >= 2.5))
            out.append((f"{label} ≥ 70% of the bytes-per-token floor",
                        f"{100 * ours.floor_share:.0f}%", ours.floor_share >= 0.7))
        for lm_head in (True, False):
            ours = _find(results, 1, path, "xla_qops", "w8a16", lm_head=lm_head)
            q = None if ours is None else compare(ours, bf16)
            if q is not None:
                head = " +lm_head" if lm_head else ""
                out.append((f"W8A16 pc{head} [{path}] decode ≥ 1.6x bf16 torch (unquantized)",
                            q.text(), q.value >= 1.6))
        for batch in (1, 4):
            ours = _find(results, batch, path, "xla_qops", "w8a8", lm_head=True)
            bf16b = _find(results, batch, "eager", "bf16", group=path)
            q = None if ours is None else compare(ours, bf16b, "prefill")
            if q is not None:
                out.append((f"W8A8 pc +lm_head [{path}] prefill ≥ 1.5x bf16 torch (unquantized; "
                            f"batch {batch})", q.text(), q.value >= 1.5))
    return out


def peer_targets(results) -> list[tuple[str, str, bool]]:
    """(target, measured, met: None where a row is reported without a target)
    for issue 28 section 3 (the NNX decoder against
    llama.cpp), issue 25 section 4 (the compiled torch step against llama.cpp)
    and issue 24 section 4 (fp8 weights against bf16 torch), batch 1, each
    against the peer timed in the same turns (min–max of the per-turn ratios)."""
    out = []
    for path, scheme, block, goal in (("nnx", "w4a16", 128, 1.0), ("nnx", "w8a16", -1, 1.0),
                                      ("nnx", "w4a8", 128, None),
                                      ("compile", "w4a16", 128, 0.9),
                                      ("compile-cpp", "w4a16", 128, 0.9)):
        ours = next((r for r in results if r.batch == 1 and r.variant.path == path
                     and r.variant.scheme == scheme and r.variant.block_size == block
                     and r.variant.lm_head and not r.companion), None)
        q = None if ours is None else compare(ours, llama_cpp_peer(results, ours))
        if q is None:
            continue
        layout = "pc" if block == -1 else f"g{block}"
        peer = LLAMA_CPP_PEER[scheme]
        if goal is None:
            out.append((f"{scheme.upper()} {layout} +lm_head [{path}] decode vs llama.cpp "
                        f"{peer} (reported, no target)", q.text(), None))
        else:
            out.append((f"{scheme.upper()} {layout} +lm_head [{path}] decode ≥ {goal}x "
                        f"llama.cpp {peer}", q.text(), q.value >= goal))
    for lm_head in (False, True):
        ours = _find(results, 1, "eager", "xla_qops", "w8a16-fp8", lm_head=lm_head)
        q = None if ours is None else compare(ours, _find(results, 1, "eager", "bf16"))
        if q is not None:
            head = " +lm_head" if lm_head else ""
            out.append((f"W8A16-fp8 pc{head} [eager] decode ≥ 1.8x bf16 torch (unquantized)",
                        q.text(), q.value >= 1.8))
    return out


def targets_markdown(results) -> str:
    verdict = {True: " — met", False: " — MISSED", None: ""}
    return "\n".join(f"- {text}: **{value}**{verdict[ok]}"
                      for text, value, ok in targets(results) + peer_targets(results))


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

    results = _rows(results)
    batches = sorted({r.batch for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 0.32 * len(results) + 2),
                             squeeze=False)
    colors = {"eager": "#4c72b0", "jax": "#dd8452", "nnx": "#55a868", "compile": "#8172b3", "compile-cpp": "#da8bc3",
              "llama.cpp": "#937860"}
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in results if r.batch == batch][::-1]
        ax.barh([r.variant.name for r in rows], [r.decode_tok_s for r in rows],
                color=[colors[r.variant.path] for r in rows])
        for i, r in enumerate(rows):
            if len(r.decode_runs) > 1:  # the min–max over the turns
                ax.plot([min(r.decode_runs), max(r.decode_runs)], [i, i], color="k", lw=1)
            ax.text(r.decode_tok_s, i, f" {r.decode_tok_s:.1f}", va="center", fontsize=7)
        ax.set_xlabel("decode tokens/s (higher is better; bars: min–max over the turns)")
        ax.set_title(f"batch {batch}")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
