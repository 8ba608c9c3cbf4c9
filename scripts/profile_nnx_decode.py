"""Profile one decode step of the NNX decoder (docs/profile_nnx_decode.md).

The decoder bench's model (TinyLlama dims, 8 layers, bf16, random weights,
every Linear and lm_head quantized), a 128-token prompt and a cache of 192
positions, batch 1. Each variant is a jitted decode step timed over the same
steady state (median of `--steps` calls after warm-up), the variants taking
turns `--turns` times:

  step        the decoder's own decode step (`jax_llama.Generator.step`)
  no-attn     the attention over the cache replaced by the query itself
              (matmuls, norms, RoPE and the cache writes kept)
  no-matmul   every quantized matmul replaced by a slice/tile of its input
              of the right shape (everything but the matmuls)
  matmuls     the step's quantized matmuls alone (57; 33 with q/k/v and gate/up
              fused, as `jax_llama.quantize` does), chained in one jitted function
              in the step's order (each on a fresh activation of its shape)
  tiny-calls  57 chained custom calls of a 64x128 weight: the custom call's
              own cost inside XLA's runtime (dispatch, attributes, thread pool)

Usage: .venv/bin/python scripts/profile_nnx_decode.py [--scheme w4a16 --block 128]
       (add --loop 25 --variants step and attach `perf record -F 1999 -g -p <pid>`
       once it prints READY, for the CPU profile)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xla_qops import quantized_matmul, quantize_weight
from xla_qops.nnx import QuantizedLinear
from xla_qops_app import jax_llama
from xla_qops_app.bench import decoder

PROMPT, DECODE = 128, 64
LAYERS = 8  # as the decoder bench


def build(scheme, block, seed=0):
    """The decoder bench's model (transformers' random init) as the NNX decoder, quantized."""
    base = decoder.build_model(LAYERS, seed)
    model = jax_llama.from_tensors(base.config, base.state_dict(), dtype=jnp.bfloat16)
    return jax_llama.quantize(model, scheme=scheme, block_size=block, lm_head=True)


def median_ms(fn, steps):
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@contextlib.contextmanager
def patched(cls, name, replacement):
    old = getattr(cls, name)
    setattr(cls, name, replacement)
    try:
        yield
    finally:
        setattr(cls, name, old)


def _no_matmul(self, x):
    """A stand-in of the right shape and dtype that reads only x."""
    n = self.out_features
    reps = -(-n // x.shape[-1])
    return jnp.tile(x, (1,) * (x.ndim - 1) + (reps,))[..., :n].astype(x.dtype)


def _attention_without_scores(self, x, cos, sin, keys, values, start, mask):
    b, t, _ = x.shape
    heads = lambda y, n: y.reshape(b, t, n, self.head_dim).transpose(0, 2, 1, 3)
    q, k, v = jax_llama._projections(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"), x)
    q = jax_llama._rotate(heads(q, self.heads), cos, sin)
    k = jax_llama._rotate(heads(k, self.kv_heads), cos, sin)
    v = heads(v, self.kv_heads)
    at = (0, 0, start, 0)
    keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), at)
    values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), at)
    out = q.transpose(0, 2, 1, 3).reshape(b, t, -1)
    return self.o_proj(out), keys, values


class StepRunner:
    """A generator's decode step in steady state at position PROMPT + DECODE/2."""

    def __init__(self, model, batch=1):
        self.gen = jax_llama.Generator(model)
        prompt = np.random.default_rng(1).integers(0, decoder.TINYLLAMA["vocab_size"], (batch, PROMPT))
        cache = model.empty_cache(batch, PROMPT + DECODE)
        token, _, self.cache = self.gen.prefill(self.gen.leaves, cache,
                                                jnp.asarray(prompt, jnp.int32), jnp.int32(0))
        self.token = token

    def __call__(self):
        # The same position every call (a steady state: the cost does not
        # depend on it, the cache being static).
        token, self.cache, _ = self.gen.step(self.gen.leaves, self.cache, self.token,
                                             jnp.int32(PROMPT + DECODE // 2))
        return token


def matmul_chain(model, batch=1):
    """The step's quantized matmuls alone, in order, each input derived from the
    previous output (so XLA runs them one after another, as in the step)."""
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, QuantizedLinear)]
    weights = [m.quantized_weight for m in layers]
    flags = [(m.quantize_activation, m.activation_format) for m in layers]

    @jax.jit
    def chain(ws, x):
        acc = x
        for qw, (qa, af) in zip(ws, flags):
            xin = jnp.resize(acc, (batch, qw.in_features)) if acc.shape[-1] != qw.in_features else acc
            acc = quantized_matmul(xin, qw, quantize_activation=qa, activation_format=af)
        return acc

    x = jnp.ones((batch, decoder.TINYLLAMA["hidden_size"]), jnp.bfloat16) * 0.1
    return lambda: chain(weights, x), len(layers)


def tiny_chain(count=57, scheme="w4a16", block=128, batch=1):
    w = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    qw = quantize_weight(jnp.asarray(w), bits=4 if scheme.startswith("w4") else 8, block_size=block)

    @jax.jit
    def chain(qw, x):
        for _ in range(count):
            x = quantized_matmul(x, qw)
        return x

    x = jnp.ones((batch, 128), jnp.bfloat16) * 0.01
    return lambda: chain(qw, x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="w4a16")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--variants", default="step,no-attn,no-matmul,matmuls,tiny-calls")
    ap.add_argument("--loop", type=float, default=0,
                    help="run only the first variant for this many seconds after printing "
                         "READY (for `perf record -p <pid>`; docs/profile_nnx_decode.md)")
    args = ap.parse_args()
    t0 = time.time()
    model = build(args.scheme, args.block)
    print(f"built {args.scheme} g{args.block} in {time.time() - t0:.0f} s")
    names = args.variants.split(",")
    runners = {}
    for name in names:
        if name == "step":
            runners[name] = StepRunner(model, args.batch)
        elif name == "no-attn":
            with patched(jax_llama.Attention, "__call__", _attention_without_scores):
                runners[name] = StepRunner(model, args.batch)
                runners[name]()  # compile while patched
        elif name == "no-matmul":
            with patched(QuantizedLinear, "__call__", _no_matmul):
                runners[name] = StepRunner(model, args.batch)
                runners[name]()
        elif name == "matmuls":
            runners[name], n = matmul_chain(model, args.batch)
            print(f"matmuls: {n} quantized matmuls")
        elif name == "tiny-calls":
            runners[name] = tiny_chain(scheme=args.scheme, block=args.block, batch=args.batch)
    for r in runners.values():
        median_ms(r, 3)
    if args.loop:
        run = runners[names[0]]
        print("READY", flush=True)
        end, steps = time.time() + args.loop, 0
        while time.time() < end:
            jax.block_until_ready(run())
            steps += 1
        print(f"{names[0]}: {steps} steps in {args.loop:.0f} s")
        return
    results = {n: [] for n in names}
    for _ in range(args.turns):
        for n in names:
            results[n].append(median_ms(runners[n], args.steps))
    for n in names:
        print(f"{n:12s} {statistics.median(results[n]):7.2f} ms/step  turns "
              + " ".join(f"{v:.2f}" for v in results[n]))


if __name__ == "__main__":
    main()
