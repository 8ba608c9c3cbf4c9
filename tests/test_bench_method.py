"""How `xla-qops bench` times its peers (the figures themselves are not tested)."""

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
