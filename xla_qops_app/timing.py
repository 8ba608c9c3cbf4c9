"""Wall-clock timing shared by the demo and the benchmarks."""

import statistics
import time

import jax


def median_seconds(fn, *args, warmup: int = 1, runs: int = 5) -> float:
    """Median wall time of ``fn(*args)`` over `runs` calls, after `warmup`
    calls (which also absorb compilation). Blocks on JAX results."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
