"""Many threads at once through the native kernels (issue 27, docs/reliability.md).

Eight threads share the same modules and jitted functions, with mixed schemes
(int8, int4 blockwise asymmetric, fp8, fp4, W8A8) and batch sizes, while
another thread keeps changing the thread counts (`torch.set_num_threads` for
the torch operator's intra-op pool, `custom_call.set_num_threads` for the FFI
target's pool). Shown: every result is bit-identical to the serial one (the
kernels' sums do not depend on the thread count or on other calls), the run
finishes within a time bound (no deadlock between the pools), and no thread
is left behind.
"""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_qops
from xla_qops.backends import custom_call

from conftest import HAVE_TORCH

WORKERS = 8
ROUNDS = 4               # calls of every (entry, scheme, batch) per worker
DEADLINE_S = 300.0       # a deadlock shows as a worker still alive at the bound
K, N = 256, 96
BATCHES = (1, 3, 17)
# (name, quantize_weight arguments, quantize_activation)
SCHEMES = [
    ("w8a16", dict(bits=8), False),
    ("w4a16-g32-asym", dict(bits=4, block_size=32, symmetric=False, pack=True), False),
    ("w8a8", dict(bits=8, block_size=64), True),
    ("w8a16-fp8", dict(format="fp8"), False),
    ("w4a16-nvfp4", dict(format="nvfp4", block_size=16), False),
]


def quantized_weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, K)).astype(np.float32)
    return {name: (xla_qops.quantize_weight(w, **args), qa) for name, args, qa in SCHEMES}


def inputs(dtype):
    rng = np.random.default_rng(1)
    return {m: rng.standard_normal((m, K)).astype(np.float32).astype(dtype) for m in BATCHES}


def run_concurrently(calls: dict, change_threads) -> dict:
    """Runs every call in `calls` (key -> no-argument function returning a numpy
    array) ROUNDS times on each of WORKERS threads, in a different order per
    thread, while `change_threads(i)` runs in a loop on one more thread.
    Returns key -> every result, after checking that all threads ended."""
    before = set(threading.enumerate())
    results = {key: [] for key in calls}
    errors = []
    stop = threading.Event()
    lock = threading.Lock()
    keys = list(calls)

    def worker(seed):
        order = np.random.default_rng(seed).permutation(len(keys) * ROUNDS) % len(keys)
        try:
            for i in order:
                y = calls[keys[i]]()
                with lock:
                    results[keys[i]].append(y)
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    def changer():
        i = 0
        while not stop.is_set():
            change_threads(i)
            i += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=worker, args=(s,), name=f"qmm-worker-{s}")
               for s in range(WORKERS)]
    flipper = threading.Thread(target=changer, name="thread-count-changer")
    start = time.monotonic()
    flipper.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, DEADLINE_S - (time.monotonic() - start)))
    stop.set()
    flipper.join(10)
    alive = [t.name for t in (*threads, flipper) if t.is_alive()]
    assert not alive, f"still running after {DEADLINE_S} s (deadlock?): {alive}"
    assert not errors, errors
    # The kernels' own pools are created once and kept; nothing per call.
    left = [t.name for t in set(threading.enumerate()) - before]
    assert not left, f"threads left behind: {left}"
    return results


def assert_bit_identical(results: dict, serial: dict) -> None:
    for key, ys in results.items():
        assert len(ys) == WORKERS * ROUNDS
        for y in ys:
            np.testing.assert_array_equal(y, serial[key], err_msg=str(key), strict=True)


def assert_concurrent_equals_serial(calls: dict, get_threads, set_threads, counts: tuple,
                                    serial_threads: int | None = None) -> None:
    """`calls` run once each, serially (at `serial_threads` if given), then
    `run_concurrently` while the thread count cycles through `counts`; every
    concurrent result bit-identical to the serial one. The thread count is
    restored whatever happens."""
    threads_before = get_threads()
    try:
        if serial_threads is not None:
            set_threads(serial_threads)
        serial = {key: fn() for key, fn in calls.items()}
        results = run_concurrently(calls, lambda i: set_threads(counts[i % len(counts)]))
    finally:
        set_threads(threads_before)
    assert_bit_identical(results, serial)


@pytest.mark.torch
def test_torch_modules_shared_by_threads_while_thread_counts_change():
    import torch

    from torch_bridge import XlaQuantizedLinear

    modules = {name: XlaQuantizedLinear.from_quantized(qw, quantize_activation=qa).eval()
               for name, (qw, qa) in quantized_weights().items()}
    xs = {m: torch.from_numpy(x) for m, x in inputs(np.float32).items()}
    xs[3, "bf16"] = xs[3].to(torch.bfloat16)

    def call(module, x):
        def run():
            with torch.no_grad():
                return module(x).float().numpy()
        return run

    calls = {(name, m): call(module, x) for name, module in modules.items()
             for m, x in xs.items()}
    assert_concurrent_equals_serial(calls, torch.get_num_threads, torch.set_num_threads,
                                    (1, 2, 3), serial_threads=2)


def test_jitted_custom_call_shared_by_threads_while_thread_counts_change():
    weights = quantized_weights()
    xs = {m: jnp.asarray(x) for m, x in inputs(jnp.bfloat16).items()}
    jitted = {name: jax.jit(lambda x, qw=qw, qa=qa: xla_qops.quantized_matmul(
        x, qw, quantize_activation=qa, impl="custom_call")) for name, (qw, qa) in weights.items()}
    calls = {(name, m): (lambda f=f, x=x: np.asarray(f(x).astype(jnp.float32)))
             for name, f in jitted.items() for m, x in xs.items()}
    assert_concurrent_equals_serial(calls, custom_call.num_threads, custom_call.set_num_threads,
                                    (1, 2, 3))


@pytest.mark.torchax
def test_torchax_function_shared_by_threads():
    """A quantized torch model as one jitted JAX function (torchax), called
    from every thread at once, mixed with the eager module."""
    import torch
    import torchax

    import torch_bridge

    torch_bridge.register_with_torchax()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 32)).eval()
    torch_bridge.quantize_model(model, scheme="w4a16", block_size=32)
    env = torchax.default_env()
    params, func = torchax.extract_jax(model, env)
    jitted = jax.jit(lambda p, x: func(p, (x,)))
    xs = {m: x for m, x in inputs(np.float32).items()}

    def traced(x):
        return lambda: np.asarray(jitted(params, jnp.asarray(x)))

    def eager(x):
        def run():
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()
        return run

    calls = {("torchax", m): traced(x) for m, x in xs.items()}
    calls.update({("eager", m): eager(x) for m, x in xs.items()})
    assert_concurrent_equals_serial(calls, torch.get_num_threads, torch.set_num_threads, (1, 2))
