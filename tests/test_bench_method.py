"""How `xla-qops bench` times its peers (the figures themselves are not tested)."""

import re

import pytest

from xla_qops_app.commands import bench


def test_peers_take_turns_with_untimed_warm_calls():
    calls = []
    steps = {name: (lambda i, name=name: calls.append((name, i))) for name in ("ours", "torch")}
    medians = bench._interleaved_medians(steps, reps=3, warm=2, warm_seconds=0)
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
                               warm_seconds=0.003)
    for name, ts in starts.items():
        assert len(ts) > 8, name  # more than 3 + 1 per turn: the time, not the count, ruled
    # within a turn, the timed call comes >= 3 ms after the turn's first call
    first_turn = [t for t in starts["ours"] if t < starts["torch"][0]]
    assert first_turn[-1] - first_turn[0] >= 0.0028  # (its first call starts just after the clock)


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
                                     slow={"torch_xla": 2})
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
