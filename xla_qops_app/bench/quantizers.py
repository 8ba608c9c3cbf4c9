"""The quantizers on a real model: all-MiniLM-L6-v2, every scheme x method.

`xla-qops bench --quantizers` writes docs/quantizers_table.md: the mean (and
min) cosine similarity of the quantized model's sentence embeddings to the
float model's, and the time `quantize_model` took. Each row is one scheme x
method, calibrated on each of two sets and evaluated on each of two
(xla_qops.data):

- in-distribution: calibrated on the templated 400 (`calibration`), evaluated
  on the templated 200 (`evaluation`), made from the same templates and word
  lists;
- held-out: calibrated on the natural 500 (`natural_calibration`), evaluated
  on the natural 345 (`natural_evaluation`), written independently of the
  templates and of each other -- what a user sees; the targets are judged
  on this figure;
- the cross: templated -> natural and natural -> templated.

Methods that see no data (rtn, hqq) are quantized once and evaluated on both
sets. Each quantization is one `torch_bridge.quantize_model` call, the public
surface a user calls; its time and peak resident memory are reported too.

On a busy machine the whole table takes hours: `run(calibrations=("natural",),
log=path)` calibrates on the natural set only (the held-out and natural →
templated figures, half the work) and appends each row to `path` as it is
done, so rows from runs in parallel or from a stopped run can be joined
(`read_log`) and written (`markdown`), which lists the rows not measured.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import time

import xla_qops
from xla_qops import data
from xla_qops.quantizers import needs_data
from xla_qops.schemes import FLOAT_METHODS
from xla_qops_app.calibration import BATCH, tokenized_batches

# (scheme, block_size, method, smoothing); None smoothing = none.
ROWS = [(scheme, block, method, None)
        for scheme, block in (("w4a16", 128), ("w4a16", -1), ("w4a8", 128), ("w8a8", -1))
        for method in ("rtn", "hqq", "awq", "gptq", "awq+gptq")]
# Issue V section 2: AutoRound's learned rounding, alone and started from awq+gptq.
ROWS += [(scheme, block, method, None)
         for scheme, block in (("w4a16", 128), ("w4a16", -1), ("w4a8", 128))
         for method in ("autoround", "awq+gptq+autoround")]
# Issue 26: AutoRound's real objective, each transformer block's output (torch_bridge.blockround).
ROWS += [(scheme, block, "awq+gptq+blockround", None)
         for scheme, block in (("w4a16", 128), ("w4a16", -1), ("w4a8", 128), ("w8a8", -1))]
ROWS += [("w8a8", -1, "awq+gptq+blockround", "smoothquant")]
ROWS += [("w8a8", -1, method, "smoothquant") for method in ("rtn", "gptq")]
# W8A8 with blockwise weights: API.md's activations then get one scale per token and block
# (not per token), which is what closes W8A8's gap (docs/quantizers.md).
ROWS += [("w8a8", block, "rtn", None) for block in (128, 32)]
ROWS += [("w4a8", 128, method, "smoothquant") for method in ("rtn", "gptq")]
# Issue 26: the inputs rotated by Hadamard blocks (torch_bridge.rotation), then rtn, GPTQ,
# or AWQ's clips and GPTQ.
ROWS += [(scheme, block, method, "hadamard")
         for scheme, block in (("w4a16", 128), ("w4a16", -1), ("w4a8", 128), ("w8a8", -1))
         for method in ("rtn", "gptq", "awq+gptq")]
# Float element formats (issue 24 sections 2 and 5): float weights round onto their grid
# with the methods that apply to them (xla_qops.schemes.FLOAT_METHODS), SmoothQuant for the
# A8-fp8 scheme; w4a8-fp8 has int4 weights, so the int methods apply.
ROWS += [(scheme, block, method, None)
         for scheme, block in (("w8a16-fp8", -1), ("w4a16-mxfp4", 32), ("w4a16-nvfp4", 16),
                               ("w8a8-fp8", -1))
         for method in FLOAT_METHODS]
ROWS += [("w8a8-fp8", -1, method, "smoothquant") for method in ("rtn", "gptq")]
ROWS += [("w4a8-fp8", 128, method, None) for method in ("rtn", "gptq", "awq", "awq+gptq")]
# Issue V's targets: mean cosine on the held-out (natural) evaluation set.
TARGETS = {("w4a16", 128): 0.985, ("w4a16", -1): 0.975, ("w4a8", 128): 0.98,
           ("w8a8", -1): 0.9995}
# label -> xla_qops.data kind, for calibration and for evaluation.
CALIBRATIONS = {"templated": "calibration", "natural": "natural_calibration"}
EVALUATIONS = {"templated": "evaluation", "natural": "natural_evaluation"}
IN_DISTRIBUTION = ("templated", "templated")
HELD_OUT = ("natural", "natural")
# (calibration, evaluation) pairs in the table's column order: held-out first.
PAIRS = (HELD_OUT, IN_DISTRIBUTION, ("templated", "natural"), ("natural", "templated"))
PAIR_NAMES = {HELD_OUT: "held-out", IN_DISTRIBUTION: "in-distribution",
              ("templated", "natural"): "templated → natural",
              ("natural", "templated"): "natural → templated"}


@dataclasses.dataclass
class Row:
    scheme: str
    block: int
    method: str
    smoothing: str | None
    cos: dict  # (calibration, evaluation) -> (mean, min)
    seconds: dict  # calibration -> seconds of quantize_model
    peak_mib: dict = dataclasses.field(default_factory=dict)  # calibration -> MiB (see run)

    @property
    def calibrated(self) -> bool:
        return needs_data(self.method, self.smoothing)

    @property
    def target(self):
        return TARGETS.get((self.scheme, self.block))

    def met(self, pair=HELD_OUT):
        """True/False against the scheme's target, None where it has none."""
        return None if self.target is None else self.cos[pair][0] >= self.target


@dataclasses.dataclass
class Report:
    rows: list
    info: dict = dataclasses.field(default_factory=dict)  # set name -> (sentences, tokens)


def measure(rows, quantize, score, calibrations=tuple(CALIBRATIONS),
            evaluations=tuple(EVALUATIONS), report=print, on_row=None) -> list[Row]:
    """The loop of `run`, model-free: `quantize(scheme, block, method, smoothing,
    calibration label or None) -> model` and `score(model, evaluation label) ->
    (mean, min)`. A method that sees no data is quantized once, for every
    calibration label. `on_row(row)` is called as each row is done."""
    out = []
    for scheme, block, method, smoothing in rows:
        cos, seconds, peak = {}, {}, {}
        labels = calibrations if needs_data(method, smoothing) else (None,)
        for label in labels:
            start = time.perf_counter()
            with PeakMemory() as memory:
                model = quantize(scheme, block, method, smoothing, label)
            elapsed = time.perf_counter() - start
            for cal in (calibrations if label is None else (label,)):
                seconds[cal], peak[cal] = elapsed, memory.peak_mib
                for ev in evaluations:
                    cos[cal, ev] = score(model, ev)
            del model
        row = Row(scheme, block, method, smoothing, cos, seconds, peak)
        out.append(row)
        if report:
            report(f"{_name(row)}: " + ", ".join(
                f"{PAIR_NAMES.get(p, p)} {row.cos[p][0]:.5f}" for p in PAIRS if p in row.cos)
                + " (" + ", ".join(f"{s:.1f} s" for s in dict.fromkeys(seconds.values()))
                + f", peak +{max(peak.values()):.0f} MiB)")
        if on_row:
            on_row(row)
    return out


class PeakMemory:
    """The process's peak resident memory above its level on entry, in MiB (`peak_mib`),
    sampled every `interval` seconds by a thread (torch's and numpy's allocations alike)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mib = interval, 0.0

    def __enter__(self):
        import threading

        import psutil
        process = psutil.Process()
        self._base = self._peak = process.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = (self._peak - self._base) / 2 ** 20
        return False


def row_to_json(row: Row) -> dict:
    """A JSON-able dict of a row (the `--log` lines of `run`)."""
    data_ = dataclasses.asdict(row)
    data_["cos"] = {f"{c}|{e}": v for (c, e), v in row.cos.items()}
    return data_


def row_from_json(data_: dict) -> Row:
    cos = {tuple(k.split("|")): tuple(v) for k, v in data_["cos"].items()}
    return Row(**{**data_, "cos": cos})


def read_log(path) -> list[Row]:
    """The rows a `run(log=path)` wrote, one JSON line each (the last of a repeated row)."""
    import json
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = row_from_json(json.loads(line))
                rows[row.scheme, row.block, row.method, row.smoothing] = row
    return list(rows.values())


def _name(row) -> str:
    return (f"{row.scheme} {'pc' if row.block == -1 else f'g{row.block}'} {row.method}"
            f"{' +' + row.smoothing if row.smoothing else ''}")


def embeddings(model, tokenizer, sentences):
    import torch

    from xla_qops_app.minilm import mean_pool
    out = []
    with torch.no_grad():
        for batch in tokenized_batches(tokenizer, sentences, 50):
            out.append(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(out)


def run(rows=ROWS, progress: bool = False, calibrations=tuple(CALIBRATIONS),
        log: str | None = None) -> Report:
    """Every row, calibrated on each of `calibrations` (labels of CALIBRATIONS; the
    natural one alone gives the held-out and natural → templated figures at half the
    time), evaluated on both sets; with `log`, each row is appended to that file as a
    JSON line as soon as it is done (`read_log` reads them back). Peak memory: the
    process's resident memory during the quantize_model call above its level before
    (`PeakMemory`), which includes the model's copy being quantized."""
    import json

    import torch_bridge
    from xla_qops_app.minilm import load_model

    def append(row):
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(row_to_json(row)) + "\n")

    model, tokenizer = load_model()
    calibration = {label: tokenized_batches(tokenizer, data.sentences(CALIBRATIONS[label]))
                   for label in calibrations}
    evaluation = {label: data.sentences(kind) for label, kind in EVALUATIONS.items()}
    reference = {label: embeddings(model, tokenizer, s) for label, s in evaluation.items()}
    info = {CALIBRATIONS[label]: (len(data.sentences(CALIBRATIONS[label])),
                                  sum(int(b["attention_mask"].sum()) for b in calibration[label]))
            for label in calibrations}
    info.update({kind: (len(evaluation[label]), None) for label, kind in EVALUATIONS.items()})

    def quantize(scheme, block, method, smoothing, label):
        return torch_bridge.quantize_model(
            copy.deepcopy(model), scheme=scheme, block_size=block, symmetric=True,
            method=method, smoothing=smoothing, progress=progress,
            calibration=None if label is None else calibration[label])

    def score(quantized, label):
        cos = (embeddings(quantized, tokenizer, evaluation[label]) * reference[label]).sum(-1)
        return float(cos.mean()), float(cos.min())

    return Report(measure(rows, quantize, score, calibrations=calibrations,
                          report=lambda line: print(line, flush=True), on_row=append), info)


def _layout(block) -> str:
    return "per-channel" if block == -1 else f"g{block}"


def _status(row) -> str:
    met = row.met()
    return "" if met is None else f"≥ {row.target}: " + ("met" if met else "**missed**")


def _seconds(row, figures=None) -> str:
    figures = row.seconds if figures is None else figures
    if not row.calibrated:
        return f"{next(iter(figures.values())):.1f}"
    return " / ".join(f"{figures[c]:.1f}" for c in CALIBRATIONS if c in figures)


def _cos(row, pair) -> str:
    """The row's mean cosine for a (calibration, evaluation) pair; "–" where this run
    did not calibrate on that set (a method that sees no data has one figure per
    evaluation set, whatever the calibration label)."""
    if pair not in row.cos and not row.calibrated:
        pair = next((p for p in row.cos if p[1] == pair[1]), pair)
    return f"{row.cos[pair][0]:.5f}" if pair in row.cos else "–"


def _name_of(row) -> str:
    return f"{row.method}{' + ' + row.smoothing if row.smoothing else ''}"


def summary(rows) -> list[str]:
    """Per scheme with a target: the best held-out figure, its method, met or missed;
    and how far the in-distribution figure overstated it."""
    lines = ["| scheme | layout | target (held-out mean) | best held-out | method | met? | "
             "its in-distribution figure | best without calibration |",
             "|---|---|---|---|---|---|---|---|"]
    for (scheme, block), target in TARGETS.items():
        mine = [r for r in rows if (r.scheme, r.block) == (scheme, block)]
        if not mine:
            continue
        best = max(mine, key=lambda r: r.cos[HELD_OUT][0])
        plain = [r for r in mine if not r.calibrated]
        free = max(plain, key=lambda r: r.cos[HELD_OUT][0]) if plain else None
        lines.append(
            f"| {scheme} | {_layout(block)} | ≥ {target} | {best.cos[HELD_OUT][0]:.5f} | "
            f"{_name_of(best)} | "
            f"{'met' if best.met() else '**missed**'} | {_cos(best, IN_DISTRIBUTION)} | "
            + (f"{free.cos[HELD_OUT][0]:.5f} ({_name_of(free)})" if free else "–") + " |")
    return lines


def _missing(rows) -> list:
    """The ROWS entries a (stopped or partial) run has no row for."""
    done = {(r.scheme, r.block, r.method, r.smoothing) for r in rows}
    return [r for r in ROWS if r not in done]


def markdown(report: Report, threads: int | None = None, notes: tuple = ()) -> str:
    """The table's page; `notes`: lines on how this run was made (added to the list
    above the tables)."""
    if threads is None:
        try:
            import torch
            threads = torch.get_num_threads()
        except ImportError:
            threads = 0
    rows = report.rows if isinstance(report, Report) else report
    info = report.info if isinstance(report, Report) else {}
    order = {row: i for i, row in enumerate(ROWS)}
    rows = sorted(rows, key=lambda r: order.get((r.scheme, r.block, r.method, r.smoothing),
                                                len(order)))
    natural_only = any(r.calibrated and "templated" not in r.seconds for r in rows)

    def described(kind):
        count, tokens = info.get(kind, (len(data.sentences(kind)), None))
        return (f"`sentences('{kind}')` ({count}"
                + (f" sentences, {tokens} tokens" if tokens else " sentences") + ")")

    lines = [
        "# Quantizers on all-MiniLM-L6-v2 (`xla-qops bench --quantizers`)", "",
        f"Machine: {platform.machine()}, {threads} threads; xla_qops "
        f"{getattr(xla_qops, '__version__', '')}. cos = cosine similarity of each sentence "
        "embedding (mean pooling, L2-normalised) to the float model's, mean (and min) over "
        "an evaluation set; time = the whole `torch_bridge.quantize_model` call. Symmetric "
        "weights.", "",
        f"Sets (`xla_qops.data`): templated calibration {described('calibration')} and "
        f"evaluation {described('evaluation')}, made from the same templates and word lists "
        "(scripts/make_sentences.py); natural calibration "
        f"{described('natural_calibration')} and evaluation "
        f"{described('natural_evaluation')}, written by hand, independently of the templates "
        f"and of each other. Calibration inputs: {BATCH} sentences each.", "",
        "- **held-out** = calibrated on the natural calibration set, evaluated on the natural "
        "evaluation set: what a user sees on text the quantizer never saw. The targets "
        "(issue V) are judged on it.",
        "- **in-distribution** = templated → templated (the figure this table reported "
        "before).",
        "- **cross** = templated calibration → natural evaluation, and natural calibration "
        "→ templated evaluation.",
        "- rtn and hqq see no data: one quantization, evaluated on both sets (its two cross "
        "figures equal its held-out and in-distribution ones).",
        "- Cosines are deterministic; times are wall-clock on a shared machine (noisy). Time "
        "s: templated / natural calibration. Peak MiB: the process's resident memory during "
        "the call above its level before (the model copy being quantized included).",
        *(["- This run calibrated on the natural set only (half the time): the calibrated "
           "rows' in-distribution and templated → natural figures are \"–\"."]
          if natural_only else []), *notes, "",
        "## Targets, on the held-out figures", "",
        *(["Best among the rows this run measured (those it did not are listed below the "
           "table).", ""] if _missing(rows) else []),
        *summary(rows), "",
        "## Every scheme x method", "",
        "| scheme | layout | method | smoothing | held-out mean | held-out min | target "
        "(held-out) | in-distribution | templated → natural | natural → templated | time s |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        held, low = row.cos[HELD_OUT]
        lines.append(
            f"| {row.scheme} | {_layout(row.block)} | {row.method} | {row.smoothing or '–'} | "
            f"{held:.5f} | {low:.5f} | {_status(row)} | {_cos(row, IN_DISTRIBUTION)} | "
            f"{_cos(row, ('templated', 'natural'))} | {_cos(row, ('natural', 'templated'))} | "
            f"{_seconds(row)} |")
    missing = _missing(rows)
    if missing:
        lines += ["", f"Not measured by this run ({len(missing)} of {len(ROWS)} rows): "
                  + ", ".join(_name(Row(*r, {}, {})) for r in missing) + "."]
    measured = [row for row in rows if row.peak_mib]
    if measured:
        lines += ["", "## Time and peak memory of each quantize_model call", "",
                  "Time: wall-clock seconds (they depend on the machine's load); peak: the "
                  "process's resident memory during the call above its level before, MiB "
                  "(templated / natural calibration where both ran).", "",
                  "| row | time s | peak MiB |", "|---|---|---|"]
        lines += [f"| {_name(row)} | {_seconds(row)} | {_seconds(row, row.peak_mib)} |"
                  for row in measured]
    return "\n".join(lines) + "\n"
