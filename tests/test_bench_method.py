"""How `xla-qops bench` times its peers (the figures themselves are not tested)."""

import pytest

from xla_qops.commands import bench


def test_peers_take_turns_with_untimed_warm_calls():
    calls = []
    steps = {name: (lambda i, name=name: calls.append((name, i))) for name in ("ours", "torch")}
    medians = bench._interleaved_medians(steps, reps=3, warm=2)
    assert set(medians) == {"ours", "torch"} and all(t >= 0 for t in medians.values())
    # Turns alternate within every repetition, three calls (two untimed) per turn,
    # and every call gets a fresh index (decode cases rotate weights by it).
    assert [name for name, _ in calls] == (["ours"] * 3 + ["torch"] * 3) * 3
    assert [i for _, i in calls] == list(range(18))


@pytest.mark.torch
def test_read_peer_reads_the_requested_bytes():
    step, nbytes = bench.read_peer(1 << 20)
    assert nbytes == 1 << 20
    assert float(step(0)) == float(nbytes // 4)  # a sum over that many float32 ones
