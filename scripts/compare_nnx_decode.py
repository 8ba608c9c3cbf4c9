"""Before/after of the NNX decoder's decode speed, with llama.cpp in the same turns.

The decoder bench's model (`xla_qops_app.bench.decoder.build_model`: TinyLlama
dims, 8 layers, random bf16 weights), a 128-token prompt and 64 new tokens,
batch 1; llama.cpp Q4_0 / Q8_0 of the same weights (`bench.llama_cpp`, 2
threads). "before" is `xla_qops_app/jax_llama.py` as committed at a git
revision (default HEAD), loaded from `git show`; "after" is the working tree.
Every variant runs once per turn, the turns alternate, and the ratios are
per turn (the machine may be shared: only ratios within a turn are fair).
The greedy tokens of before and after must be identical.

Usage: .venv/bin/python scripts/compare_nnx_decode.py [--turns 5] [--rev HEAD]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from xla_qops_app import jax_llama
from xla_qops_app.bench import decoder, llama_cpp

SCHEMES = {"W4A16 g128": ("w4a16", 128, "Q4_0"), "W8A16 pc": ("w8a16", -1, "Q8_0"),
           "W4A8 g128": ("w4a8", 128, "Q4_0")}


def module_at(rev: str):
    """jax_llama.py as committed at `rev`, as a module."""
    source = subprocess.run(["git", "show", f"{rev}:xla_qops_app/jax_llama.py"], check=True,
                            capture_output=True, text=True).stdout
    path = tempfile.NamedTemporaryFile("w", suffix="_jax_llama_before.py", delete=False)
    path.write(source)
    path.close()
    spec = importlib.util.spec_from_file_location("jax_llama_before", path.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def nnx_generator(module, base, scheme, block, prompt, decode):
    model = module.from_tensors(base.config, base.state_dict(), dtype="bfloat16")
    module.quantize(model, scheme=scheme, block_size=block, lm_head=True)
    gen = module.Generator(model)

    def run():
        stamps = []
        t0 = time.perf_counter()
        tokens = gen.generate(prompt, decode, on_token=lambda i: stamps.append(time.perf_counter()))
        return stamps[0] - t0, (stamps[-1] - stamps[0]) / (decode - 1), tokens
    run.generator = gen
    return run


class StepPair:
    """One decode step at a time, as `generate` runs it, for step-level turns."""

    def __init__(self, generator, prompt, decode):
        import jax.numpy as jnp
        self.gen, self.jnp, model = generator, jnp, generator.model
        self.after = hasattr(self.gen, "leaves")
        state = self.gen.leaves if self.after else self.gen.state
        n = prompt.shape[1]
        cache = model.empty_cache(prompt.shape[0], n + decode)
        self.token, _, self.cache = self.gen.prefill(state, cache, jnp.asarray(prompt, jnp.int32),
                                                     jnp.int32(0))
        self.state, self.position = state, jnp.int32(n) if self.after else n

    def __call__(self):
        if self.after:  # the position stays on the device (past the cache: clamped, same cost)
            self.token, self.cache, self.position = self.gen.step(self.state, self.cache,
                                                                  self.token, self.position)
        else:  # the committed loop: an eager reshape and a new position array per token
            self.token, _, self.cache = self.gen.step(self.state, self.cache,
                                                      self.token[:, None],
                                                      self.jnp.int32(self.position))
        self.token.block_until_ready()


class LlamaCppStep:
    """One llama.cpp decode step; the context refilled (untimed) when full."""

    def __init__(self, gen, prompt, decode):
        self.gen, self.prompt, self.decode, self.i = gen, prompt, decode, decode

    def __call__(self, timer):
        if self.i >= self.decode - 1:
            ll = self.gen.ll
            ll.llama_memory_clear(ll.llama_get_memory(self.gen.ctx), True)
            self.token, self.i = self.gen._fill(self.prompt, range(self.prompt.shape[1])), 0
        t0 = timer()
        self.token = self.gen._fill(self.token, [self.prompt.shape[1] + self.i])
        self.i += 1
        return timer() - t0


def step_turns(runs, steps):
    """Every runner's step in turn, `steps` rounds: {name: [seconds]}."""
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            if isinstance(run, LlamaCppStep):
                times[name].append(run(time.perf_counter))
                continue
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--schemes", default="W4A16 g128,W8A16 pc")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--steps", type=int, default=0,
                    help="turns of single decode steps instead of whole generations "
                         "(this many per variant; groups of steps/10 make a turn)")
    args = ap.parse_args()
    before = module_at(args.rev)
    base = decoder.build_model(8)
    prompt = np.random.default_rng(0).integers(3, base.config.vocab_size,
                                               (args.batch, 128)).astype(np.int64)
    decode = 64
    runs = {}
    schemes = args.schemes.split(",")
    if not args.no_llama_cpp:
        files = llama_cpp.gguf_files(base)
        for kind in sorted({SCHEMES[s][2] for s in schemes}):
            runs[f"llama.cpp {kind}"] = llama_cpp.Generator(files[kind], prompt, decode,
                                                            base.config.vocab_size)
    for name in schemes:
        scheme, block, _ = SCHEMES[name]
        runs[f"before {name}"] = nnx_generator(before, base, scheme, block, prompt, decode)
        runs[f"after {name}"] = nnx_generator(jax_llama, base, scheme, block, prompt, decode)
    tokens = {}
    for name, run in runs.items():  # warm-up: compilation, first touch
        tokens[name] = run()[2]
    for name in schemes:
        np.testing.assert_array_equal(tokens[f"after {name}"], tokens[f"before {name}"],
                                      err_msg=f"{name}: tokens changed")
    print("tokens identical before/after:", ", ".join(schemes), flush=True)
    tok_s = {name: [] for name in runs}
    if args.steps:  # turns of one decode step each (a loaded machine: the same moments)
        steppers = {}
        for name in runs:
            if name.startswith("llama.cpp"):
                steppers[name] = LlamaCppStep(runs[name], prompt, decode)
            else:
                steppers[name] = StepPair(runs[name].generator, prompt, decode)
        step_turns(steppers, 5)  # warm-up
        times = step_turns(steppers, args.steps)
        # Per-step ratios are too noisy alone: turns of `group` steps, each
        # turn's median step, as the generation turns below.
        group = max(1, args.steps // 10)
        for name, t in times.items():
            tok_s[name] = [args.batch / statistics.median(t[i:i + group])
                           for i in range(0, len(t) - group + 1, group)]
            print(f"{name:22s} min step {min(t) * 1e3:.2f} ms ({args.batch / min(t):.1f} tok/s)")
    for turn in range(0 if args.steps else args.turns):
        for name, run in runs.items():
            tok_s[name].append(args.batch / run()[1])
        print(f"turn {turn}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in tok_s.items()),
              flush=True)
    print(f"\ndecode tok/s, batch {args.batch}, median of {len(next(iter(tok_s.values())))} "
          "turns (min-max):")
    for name, values in tok_s.items():
        print(f"  {name:22s} {statistics.median(values):6.1f} ({min(values):.1f}-{max(values):.1f})")

    def ratio(a, b):
        r = [x / y for x, y in zip(tok_s[a], tok_s[b])]
        return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"
    print("per-turn ratios, median (min-max):")
    for name in schemes:
        print(f"  after/before {name}: {ratio(f'after {name}', f'before {name}')}")
        if not args.no_llama_cpp:
            kind = SCHEMES[name][2]
            print(f"  before {name} / llama.cpp {kind}: "
                  f"{ratio(f'before {name}', f'llama.cpp {kind}')}")
            print(f"  after {name} / llama.cpp {kind}: "
                  f"{ratio(f'after {name}', f'llama.cpp {kind}')}")


if __name__ == "__main__":
    sys.exit(main())
