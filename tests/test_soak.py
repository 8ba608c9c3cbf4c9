"""Many calls across shapes and schemes: nothing grows after warm-up (issue 27,
docs/reliability.md).

Eager torch modules (the direct C++ route) and jitted JAX functions (the FFI
target) are called round-robin over five schemes and three batch sizes. After
a warm-up pass over every combination, what a leak would grow must stay put:

* resident memory (VmRSS) within RSS_BOUND (8 MiB) of its value after
  warm-up; the outputs are 1-128 KiB each, so leaking one per call exceeds
  the bound within a few hundred calls (the short run makes 1000);
* the number of prepared weights (`torch_bridge._cpu_ops.preparations`):
  a call never re-prepares a module's weight;
* the op's validation cache (`torch_bridge.op._SPECS`) and each module's set
  of validated x signatures;
* the compiled programs of each jitted function (`jax.jit(...)._cache_size()`).

The default suite makes 1000 calls (seconds); the 100 000-call run is
marked slow (`make test-slow`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_qops

from conftest import HAVE_TORCH

K, N = 256, 512
BATCHES = (1, 7, 64)
SCHEMES = [("w8a16", dict(bits=8), False),
           ("w4a16-g64-asym", dict(bits=4, block_size=64, symmetric=False, pack=True), False),
           ("w8a8", dict(bits=8), True),
           ("w8a16-fp8", dict(format="fp8"), False),
           ("w4a16-mxfp4", dict(format="mxfp4", block_size=32), False)]
# Growth of resident memory allowed after warm-up: measured +0.0 MiB over
# 1 000 and over 100 000 calls (the allocator's free lists and XLA's/torch's
# caches settle during warm-up). Keeping each torch output (46 KiB on
# average) grows it 22 MiB over the short run, which this bound catches.
RSS_BOUND = 8 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, K)).astype(np.float32)
    return [(name, xla_qops.quantize_weight(w, **args), qa) for name, args, qa in SCHEMES]


def soak(calls: int) -> dict:
    """Runs `calls` calls round-robin; returns the figures before and after."""
    rng = np.random.default_rng(1)
    xs = {m: rng.standard_normal((m, K)).astype(np.float32) for m in BATCHES}
    jax_fns = {name: jax.jit(lambda x, qw=qw, qa=qa: xla_qops.quantized_matmul(
        x, qw, quantize_activation=qa, impl="custom_call")) for name, qw, qa in weights()}
    jax_xs = {m: jnp.asarray(x, jnp.bfloat16) for m, x in xs.items()}
    entries = [("jax", name, m) for name in jax_fns for m in BATCHES]

    torch_figures = None
    if HAVE_TORCH:
        import torch

        from torch_bridge import XlaQuantizedLinear, _cpu_ops
        from torch_bridge import op as bridge_op
        modules = {name: XlaQuantizedLinear.from_quantized(qw, quantize_activation=qa).eval()
                   for name, qw, qa in weights()}
        torch_xs = {m: torch.from_numpy(x) for m, x in xs.items()}
        entries += [("torch", name, m) for name in modules for m in BATCHES]

        def torch_figures():
            return dict(preparations=_cpu_ops.preparations(), specs=len(bridge_op._SPECS),
                        x_signatures=sum(len(mod._x_checked) for mod in modules.values()))

    def call(i):
        face, name, m = entries[i % len(entries)]
        if face == "jax":
            jax_fns[name](jax_xs[m]).block_until_ready()
        else:
            with torch.no_grad():
                modules[name](torch_xs[m])

    def figures():
        out = dict(rss=rss_bytes(),
                   programs={name: f._cache_size() for name, f in jax_fns.items()})
        if torch_figures:
            out.update(torch_figures())
        return out

    for i in range(2 * len(entries)):  # warm-up: every entry twice
        call(i)
    before = figures()
    for i in range(calls):
        call(i)
    after = figures()
    return dict(before=before, after=after, calls=calls + 2 * len(entries))


def check_flat(result) -> None:
    before, after = result["before"], result["after"]
    grown = after["rss"] - before["rss"]
    print(f"\nsoak: {result['calls']} calls, RSS {before['rss'] / 2**20:.1f} -> "
          f"{after['rss'] / 2**20:.1f} MiB ({grown / 2**20:+.1f} MiB)")
    assert grown <= RSS_BOUND, f"resident memory grew {grown / 2**20:.1f} MiB after warm-up"
    assert after["programs"] == before["programs"]
    assert all(n == len(BATCHES) for n in after["programs"].values()), after["programs"]
    for key in ("preparations", "specs", "x_signatures"):
        if key in before:
            assert after[key] == before[key], (key, before[key], after[key])


def test_nothing_grows_over_1000_calls():
    check_flat(soak(1000))


@pytest.mark.slow
def test_nothing_grows_over_100000_calls():
    check_flat(soak(100_000))
