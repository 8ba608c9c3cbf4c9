"""How `xla-qops bench` times its peers, and how `--quantizers` pairs its calibration
and evaluation sets (the figures themselves are not tested)."""

import re

import pytest

from xla_qops_app.commands import bench


def test_peers_take_turns_with_untimed_warm_calls():
    calls = []
    steps = {name: (lambda i, name=name: calls.append((name, i))) for name in ("ours", "torch")}
    medians = bench._interleaved_medians(steps, reps=3, warm=2, warm_seconds=0,
                                         timed_seconds=0)
    assert set(medians) == {"ours", "torch"} and all(t >= 0 for t in medians.values())
    # Turns alternate within every repetition, three calls (two untimed) per turn,
    # and every call gets a fresh index (decode cases rotate weights by it).
    assert [name for name, _ in calls] == (["ours"] * 3 + ["torch"] * 3) * 3
    assert [i for _, i in calls] == list(range(18))


def test_untimed_calls_last_at_least_warm_seconds():
    """The previous peer's threads (torch's spinning OpenMP workers) go quiet first."""
    import time
    starts = {}

    def step(name):
        def call(i):
            starts.setdefault(name, []).append(time.perf_counter())
        return call

    bench._interleaved_medians({"ours": step("ours"), "torch": step("torch")}, reps=2, warm=3,
                               warm_seconds=0.003, timed_seconds=0)
    for name, ts in starts.items():
        assert len(ts) > 8, name  # more than 3 + 1 per turn: the time, not the count, ruled
    # within a turn, the timed call comes >= 3 ms after the turn's first call
    first_turn = [t for t in starts["ours"] if t < starts["torch"][0]]
    assert first_turn[-1] - first_turn[0] >= 0.0028  # (its first call starts just after the clock)


def test_a_turns_figure_is_the_mean_of_its_timed_calls(monkeypatch):
    """Timed calls run for at least timed_seconds (a slow peer: one), and the turn's
    figure is their mean per call, not one call's time. On a virtual clock (no load on
    the machine changes the counts): the fast peer's calls take u and 2u alternately
    (u = 2^-12 s: sums of them are exact), the slow one's u."""
    import types
    clock = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    u = 2.0 ** -12
    calls = {"fast": 0, "torch_xla": 0}

    def step(name):
        def call(i):
            clock[0] += u if name == "torch_xla" or calls[name] % 2 == 0 else 2 * u
            calls[name] += 1
        return call
    times = bench._interleaved_times({"fast": step("fast"), "torch_xla": step("torch_xla")},
                                     reps=2, warm=1, warm_seconds=0, timed_seconds=16 * u,
                                     slow={"torch_xla": 2})
    # Per turn: one untimed call (u), then 2u, u, 2u, ... until 16u have passed: 11 calls
    # in 17u.
    assert calls["fast"] == 2 * (1 + 11)
    assert times["fast"] == [17 * u / 11] * 2
    assert calls["torch_xla"] == 2 * 2  # one untimed, one timed per turn
    assert times["torch_xla"] == [u] * 2


@pytest.mark.torch
def test_read_peer_reads_the_requested_bytes():
    step, nbytes = bench.read_peer(1 << 20)
    assert nbytes == 1 << 20
    assert float(step(0)) == float(nbytes // 4)  # a sum over that many float32 ones


def test_slow_peers_take_their_turns_in_the_same_rounds():
    """torch_xla's op (slow) takes one untimed and one timed call in each of the
    first `slow` rounds, between the fast peers' turns, not in a loop of its own."""
    calls = []
    steps = {name: (lambda i, name=name: calls.append(name)) for name in ("ours", "torch_xla")}
    times = bench._interleaved_times(steps, reps=3, warm=2, warm_seconds=0,
                                     slow={"torch_xla": 2}, timed_seconds=0)
    assert [len(times["ours"]), len(times["torch_xla"])] == [3, 2]
    assert calls == ["ours"] * 3 + ["torch_xla"] * 2 + ["ours"] * 3 + ["torch_xla"] * 2 + ["ours"] * 3


# --- ratios: same scheme, or labelled; with their spread -------------------------

def test_ratio_refuses_two_schemes_unless_labelled():
    from xla_qops_app.bench import report
    with pytest.raises(report.SchemeMismatch, match="across schemes"):
        report.ratio([1.0], [1.0], num_scheme="w4a16-g128-sym", den_scheme="w4a16-g128-asym")
    r = report.ratio([2.0, 4.0, 3.0], [1.0, 2.0, 2.0], num_scheme="w4a16-g128-sym",
                     den_scheme="w4a16-g128-asym", across="ours symmetric, theirs asymmetric")
    assert r.across == "ours symmetric, theirs asymmetric"
    # median 3 / median 2; per-turn ratios 2, 2, 1.5
    assert (r.value, r.low, r.high, r.turns) == (1.5, 1.5, 2.0, 3)
    assert r.text() == "1.50x (1.50–2.00)"
    same = report.ratio([2.0], [1.0], num_scheme="w8a16", den_scheme="w8a16", across="ignored")
    assert same.across is None and same.text() == "2.00x"
    # A slow peer's fewer turns: both sides over the turns both took, and the
    # value inside the range of the per-turn ratios.
    slow = report.ratio([0.5, 0.6], [1.0, 2.0, 1.0], num_scheme="w8a16", den_scheme="w8a16")
    assert slow.turns == 2 and slow.low <= slow.value <= slow.high
    assert slow.value == pytest.approx(0.55 / 1.5)


def _row(scheme="w4a16-g128-sym", m=4, compiles=0):
    ours, torch_q, bf16, txla = [1e-3, 2e-3, 1e-3], [2e-3, 3e-3, 2e-3], [4e-3] * 3, [0.5, 0.6]
    samples = dict(ours=ours, torch_q=torch_q, torch_bf16=bf16, torch_xla=txla)
    import statistics
    return dict(k=4096, n=4096, m=m, scheme=scheme, bytes=4096 * 4096 // 2,
                times={k: statistics.median(v) for k, v in samples.items()},
                samples=samples, compiles={"torch_xla": compiles}, read_bw=50.0)


def test_kernel_bench_table_gives_each_ratio_its_spread_and_says_what_it_compares():
    from xla_qops_app.bench import report
    text = report.table([_row()], 80.0)
    head, _, line = text.splitlines()
    assert 'impl="xla"' not in text  # the project's own fallback is no peer
    assert "torch int kernel, same weights" in head and "bf16 torch mm (unquantized)" in head
    assert "steady state" not in line and "compilation" not in line
    # ours 1 ms (1.000–2.000); torch_q median 2 / 1 = 2x, per turn 2, 1.5, 2
    assert "| 1.000 (1.000–2.000) |" in line and "| 2.00x (1.50–2.00) |" in line
    assert report.peer_ratio(_row(), "torch_bf16").across == report.UNQUANTIZED
    assert report.peer_ratio(_row(), "torch_q").across is None
    compiled = report.table([_row(compiles=2)], 80.0).splitlines()[-1]
    assert "includes compilation (2 in its turns)" in compiled


def test_kernel_bench_targets_have_no_impl_xla_target():
    from xla_qops_app.bench import report
    text = report.targets([_row(m=4), _row(m=256)], 80.0)
    assert "impl" not in text and "≥ 10x" not in text
    assert "≥ 1.5x torch int4 kernel (same weights): **2.00x (1.50–2.00)**" in text


# --- generated documents hold only what their run measured ---------------------

_FIGURE = re.compile(r"\d+(?:\.\d+)?\s?(?:ms|µs|s|tok/s|GB/s|GFLOP/s|MiB|x|%)(?![\w/])")


def _static_figures(render):
    """Figures in the lines that stay the same when every measurement and
    setting changes: text the generator writes whatever the run measured."""
    one, two = render(1.0), render(1.37)
    static = set(one.splitlines()) & set(two.splitlines())
    return [f for line in static for f in _FIGURE.findall(line)]


def test_bench_markdown_holds_only_this_runs_figures(monkeypatch):
    import os
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))

    def render(scale):
        monkeypatch.setattr(bench, "WARM_SECONDS", 0.004 * scale)
        rows = []
        for m in (1, 4, 16, 256):
            r = _row(m=m)
            r["samples"]["ours"] = [t * scale for t in r["samples"]["ours"]]
            r["times"]["ours"] *= scale  # so every ratio changes too
            rows.append(r)
        module_rows = [dict(k=2048, n=2048, scheme="w4a16-g128-sym", copies=8,
                            kernel=5e-5 * scale, module=6e-5 * scale, torch_int4=7e-5,
                            samples=dict(module=[6e-5 * scale] * 2, torch_int4=[7e-5] * 2))]
        reps = 9 if scale == 1 else 7
        return bench.markdown(f"machine {scale}", rows, 80.0 * scale, module_rows, reps, reps - 6)
    assert _static_figures(render) == []


def test_a_slow_peer_that_fails_loses_only_its_own_times():
    calls = []

    def broken(i):
        calls.append(i)
        raise RuntimeError("no device")
    step = bench._failing_quietly(broken)
    times = bench._interleaved_times({"ours": lambda i: None, "torch_xla": step}, reps=3,
                                     warm=1, warm_seconds=0, slow={"torch_xla": 2})
    assert len(times["ours"]) == 3 and isinstance(step.error, RuntimeError)
    assert len(calls) == 1  # no further calls once it failed


# --- --quantizers: which model is calibrated on what and evaluated on what, and
# its table (model-free: the figures themselves are not tested) ---------------

from xla_qops_app.bench import quantizers as q  # noqa: E402

HELD, INSIDE = q.HELD_OUT, q.IN_DISTRIBUTION
T2N, N2T = ("templated", "natural"), ("natural", "templated")


def fake_measure(rows, figures):
    """Runs `measure` with a fake model: quantize returns its arguments, score looks
    the (method, calibration, evaluation) figure up in `figures` (default 0.5)."""
    calls = []

    def quantize(scheme, block, method, smoothing, label):
        calls.append((method, smoothing, label))
        return (method, smoothing, label)

    def score(model, evaluation):
        method, _, label = model
        mean = figures.get((method, label, evaluation), 0.5)
        return mean, mean - 0.01

    return q.measure(rows, quantize, score, report=None), calls


def test_calibrated_methods_are_quantized_once_per_set_the_others_once():
    rows = [("w4a16", 128, "rtn", None), ("w4a16", 128, "gptq", None),
            ("w8a8", -1, "rtn", "smoothquant")]
    out, calls = fake_measure(rows, {})
    assert calls == [("rtn", None, None),
                     ("gptq", None, "templated"), ("gptq", None, "natural"),
                     ("rtn", "smoothquant", "templated"), ("rtn", "smoothquant", "natural")]
    for row in out:  # every pair has a figure, every calibration a time
        assert set(row.cos) == {HELD, INSIDE, T2N, N2T}
        assert set(row.seconds) == {"templated", "natural"}
    assert [r.calibrated for r in out] == [False, True, True]


def test_each_pair_is_scored_on_the_model_calibrated_on_its_first_set():
    figures = {("gptq", "templated", "templated"): 0.99, ("gptq", "templated", "natural"): 0.97,
               ("gptq", "natural", "natural"): 0.98, ("gptq", "natural", "templated"): 0.96,
               ("rtn", None, "templated"): 0.94, ("rtn", None, "natural"): 0.93}
    out, _ = fake_measure([("w4a16", 128, "gptq", None), ("w4a16", 128, "rtn", None)], figures)
    gptq, rtn = out
    assert {p: gptq.cos[p][0] for p in gptq.cos} == {INSIDE: 0.99, T2N: 0.97, HELD: 0.98,
                                                     N2T: 0.96}
    # uncalibrated: the same model behind both calibration labels
    assert rtn.cos[HELD] == rtn.cos[T2N] and rtn.cos[INSIDE] == rtn.cos[N2T]
    assert rtn.cos[HELD][0] == 0.93 and rtn.cos[INSIDE][0] == 0.94


def test_targets_are_issue_v_s_and_judged_on_the_held_out_figure():
    assert q.TARGETS == {("w4a16", 128): 0.985, ("w4a16", -1): 0.975, ("w4a8", 128): 0.98,
                         ("w8a8", -1): 0.9995}
    # in-distribution above the target, held-out below: missed
    row = q.Row("w4a16", 128, "gptq", None,
                {HELD: (0.975, 0.9), INSIDE: (0.995, 0.99), T2N: (0.97, 0.9), N2T: (0.99, 0.9)},
                {"templated": 1.0, "natural": 2.0})
    assert row.met() is False and row.met(INSIDE) is True
    row.cos[HELD] = (0.985, 0.9)  # the bound itself meets it
    assert row.met() is True
    assert q.Row("w8a16", 128, "rtn", None, {HELD: (1.0, 1.0)}, {}).met() is None


def _quantizer_table(figures, rows=None):
    rows = rows or [("w4a16", 128, "rtn", None), ("w4a16", 128, "gptq", None),
                    ("w8a8", -1, "gptq", "smoothquant")]
    out, _ = fake_measure(rows, figures)
    info = {"calibration": (400, 5000), "natural_calibration": (500, 9000),
            "evaluation": (200, None), "natural_evaluation": (345, None)}
    return q.markdown(q.Report(out, info), threads=2)


def _quantizer_row(text, method, smoothing="–"):
    lines = [line for line in text.splitlines() if line.startswith("| w")
             and f"| {method} | {smoothing} |" in line]
    assert len(lines) == 1, lines
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def test_table_reports_held_out_first_then_in_distribution_and_the_cross():
    figures = {("gptq", "natural", "natural"): 0.975, ("gptq", "templated", "templated"): 0.995,
               ("gptq", "templated", "natural"): 0.974, ("gptq", "natural", "templated"): 0.99,
               ("rtn", None, "natural"): 0.945, ("rtn", None, "templated"): 0.944}
    text = _quantizer_table(figures)
    header = next(line for line in text.splitlines()
                  if line.startswith("| scheme | layout | method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "scheme", "layout", "method", "smoothing", "held-out mean", "held-out min",
        "target (held-out)", "in-distribution", "templated → natural", "natural → templated",
        "time s"]
    gptq = _quantizer_row(text, "gptq")
    assert gptq[4:10] == ["0.97500", "0.96500", "≥ 0.985: **missed**", "0.99500", "0.97400",
                          "0.99000"]
    assert " / " in gptq[10]  # two calibrations, two times
    rtn = _quantizer_row(text, "rtn")
    assert rtn[4] == rtn[8] == "0.94500" and rtn[7] == rtn[9] == "0.94400"
    assert " / " not in rtn[10]
    # the set sizes and token counts are stated
    assert "(345 sentences)" in text and "(500 sentences, 9000 tokens)" in text
    assert "deterministic" in text and "noisy" in text


def test_every_row_with_a_target_says_met_or_missed():
    figures = {("gptq", "natural", "natural"): 0.9996, ("gptq", "templated", "templated"): 0.1}
    text = _quantizer_table(figures)
    assert _quantizer_row(text, "gptq", "smoothquant")[6] == "≥ 0.9995: met"
    assert _quantizer_row(text, "rtn")[6] == "≥ 0.985: **missed**"


def test_summary_names_the_best_held_out_method_per_scheme():
    figures = {("gptq", "natural", "natural"): 0.986, ("gptq", "templated", "templated"): 0.995,
               ("rtn", None, "natural"): 0.95, ("hqq", None, "natural"): 0.96,
               ("awq", "natural", "natural"): 0.97, ("awq", "templated", "templated"): 0.999}
    rows = [("w4a16", 128, m, None) for m in ("rtn", "hqq", "awq", "gptq")]
    lines = q.summary(fake_measure(rows, figures)[0])
    assert len(lines) == 3  # header, rule, the one scheme measured
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # awq's in-distribution figure is the highest, but gptq wins held-out
    assert cells == ["w4a16", "g128", "≥ 0.985", "0.98600", "gptq", "met", "0.99500",
                     "0.96000 (hqq)"]


def test_decode_rows_rotate_beyond_the_llc_as_far_as_memory_holds(monkeypatch):
    """Decode cases rotate through copies reading more than twice the LLC, but
    never more than 40% of the available memory holds (a 480 MiB LLC got the
    bench OOM-killed), and never fewer than 2."""
    from xla_qops_app.bench import peers
    mib = 1 << 20
    monkeypatch.setattr(peers, "available_memory", lambda: 10_000 * mib)
    # 32 MiB LLC, 8 MiB copies: 8 copies read 64 MiB; memory is no limit.
    assert peers.rotation_copies(32 * mib, 8 * mib, 100 * mib) == 8
    assert peers.rotation_copies(32 * mib, 7 * mib, 100 * mib) == 10  # 70 MiB > 64
    # 480 MiB LLC: 120 copies wanted, 4000 MiB / 168 MiB a copy = 23 fit.
    assert peers.rotation_copies(480 * mib, 8 * mib, 168 * mib) == 23
    monkeypatch.setattr(peers, "available_memory", lambda: 100 * mib)
    assert peers.rotation_copies(480 * mib, 8 * mib, 168 * mib) == 2


def test_available_memory_reads_meminfo():
    from xla_qops_app.bench import peers
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    # Other processes move it a little between the two reads.
    assert abs(peers.available_memory() - kib * 1024) < 0.2 * kib * 1024
