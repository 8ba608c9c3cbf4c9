"""The real-model demo: all-MiniLM-L6-v2 quantized with every scheme.

For the float model and each scheme (W8A16, W4A16, W8A8, W4A8, per-channel
and blockwise B=128; MiniLM's Linear layers have in = 384 or 1536; and W8A8
per-channel with each layer's inputs rotated, `smoothing="hadamard"`), it reports
the bytes of the Linear weights, the cosine similarity of the sentence
embeddings (mean-pooled, as sentence-transformers does) to the float model's,
and the time per forward on four execution paths:

* ``eager``: torch, CPU tensors (torch.ops.xla.quantized_matmul -> JAX via DLPack)
* ``xla``: torch_xla device tensors (the op embedded in the torch_xla graph)
* ``openxla``: ``torch.compile(backend="openxla")`` on the torch_xla device
* ``jax``: the same torch module run as one jitted JAX function (torchax),
  the op lowered straight to ``xla_qops.quantized_matmul``
"""

from __future__ import annotations

import copy
import statistics
import time

from xla_qops_app.minilm import linear_bytes, load_model, mean_pool

SENTENCES = [
    "Quantized weights make large models fit in small memories.",
    "The cat sat quietly on the warm windowsill.",
    "XLA compiles whole graphs for TPUs, GPUs and CPUs.",
    "A cup of green tea in the afternoon.",
    "Int4 weights are stored two per byte.",
    "The river flooded the valley after a week of rain.",
]

SCHEMES = [(scheme, block, None) for scheme in ("w8a16", "w4a16", "w8a8", "w4a8")
           for block in (-1, 128)]
# W8A8 per-channel with its inputs rotated (smoothing="hadamard": no data needed; the
# best W8A8 per-channel quality on held-out text, docs/quantizers.md).
SCHEMES += [("w8a8", -1, "hadamard")]
PATHS = ("eager", "xla", "openxla", "jax")


def _median_ms(fn, runs):
    fn()  # warm-up: tracing and compilation
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _jax_forward(model, inputs):
    """The torch module as a jitted JAX function (torchax), op -> xla_qops."""
    import jax
    import torchax

    from torch_bridge import torchax_ops
    torchax_ops.register_with_torchax()
    env = torchax.tensor.Environment()  # picks up the registered op
    states, func = torchax.extract_jax(model, env)
    args = env.t2j_copy((inputs["input_ids"], inputs["attention_mask"]))
    jitted = jax.jit(lambda states, ids, mask: func(states, (ids,), {"attention_mask": mask})[0])

    def run():
        return jax.block_until_ready(jitted(states, *args))
    return run


def run_paths(model, inputs, paths, runs):
    """{path: (embeddings [S, D] float32 torch CPU tensor, ms per forward)}."""
    import numpy as np
    import torch

    results = {}
    mask = inputs["attention_mask"]
    with torch.no_grad():
        if "eager" in paths:
            def eager():
                return model(**inputs).last_hidden_state
            results["eager"] = (mean_pool(eager(), mask), _median_ms(eager, runs))
        if "xla" in paths or "openxla" in paths:
            import torch_xla
            device = torch_xla.device()
            model_xla = copy.deepcopy(model).to(device)
            inputs_xla = {k: v.to(device) for k, v in inputs.items()}
            # Each scheme is a new model running the same forward code: start
            # dynamo afresh rather than piling recompiles onto one cache entry.
            torch._dynamo.reset()
            compiled = torch.compile(model_xla, backend="openxla")
            for path, module in (("xla", model_xla), ("openxla", compiled)):
                if path not in paths:
                    continue

                def forward(module=module):
                    out = module(**inputs_xla).last_hidden_state
                    torch_xla.sync()
                    return out.cpu()
                results[path] = (mean_pool(forward(), mask), _median_ms(forward, runs))
        if "jax" in paths:
            forward = _jax_forward(model, inputs)
            hidden = torch.from_numpy(np.array(forward(), np.float32))  # writable copy
            results["jax"] = (mean_pool(hidden, mask), _median_ms(forward, runs))
    return results


def run(args) -> int:
    import torch
    import torch_bridge

    paths = args.paths.split(",") if args.paths else list(PATHS)
    model, tokenizer = load_model()
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    float_bytes = linear_bytes(model)
    print(f"all-MiniLM-L6-v2: {sum(isinstance(m, torch.nn.Linear) for m in model.modules())} "
          f"Linear layers, {float_bytes / 2**20:.1f} MiB of float32 Linear weights; "
          f"{len(SENTENCES)} sentences, batch {tuple(inputs['input_ids'].shape)}")
    print("cos = cosine similarity of sentence embeddings to the float model's "
          "(mean / min over sentences); times are ms per forward (median)")
    header = (f"{'scheme':<8} {'layout':<7} {'MiB':>6} {'vs f32':>7} {'cos mean':>9} {'cos min':>8} "
              + " ".join(f"{p + ' ms':>11}" for p in paths) + "  paths agree")
    print(header)
    print("-" * len(header))

    reference = None
    rows = [("float", None, None)] + SCHEMES
    for scheme, block, smoothing in rows:
        if scheme == "float":
            quantized = model
        else:
            quantized = torch_bridge.quantize_model(copy.deepcopy(model), scheme=scheme,
                                                    block_size=block, symmetric=True,
                                                    smoothing=smoothing)
        results = run_paths(quantized, inputs, paths, args.runs)
        if reference is None:
            reference = results[paths[0]][0]
        first = results[paths[0]][0]
        cos = (first * reference).sum(-1)
        spread = max(float((results[p][0] - first).abs().max()) for p in paths)
        nbytes = linear_bytes(quantized)
        layout = "-" if block is None else ("pc" if block == -1 else f"g{block}")
        layout += "+rot" if smoothing == "hadamard" else ""
        print(f"{scheme:<8} {layout:<7} {nbytes / 2**20:>6.2f} {nbytes / float_bytes:>7.3f} "
              f"{float(cos.mean()):>9.5f} {float(cos.min()):>8.5f} "
              + " ".join(f"{results[p][1]:>11.2f}" for p in paths)
              + f"  max diff {spread:.1e}", flush=True)
    if args.decoder_layers:
        decoder_paths = [p for p in ("eager", "jax") if p in paths]
        decoder_section(args.decoder_layers, decoder_paths + (["nnx"] if "jax" in paths else []))
    return 0


def decoder_section(layers: int, paths) -> None:
    """What quantization buys a decoder's `generate`: tokens/s of float, W4A16 and
    W8A16 (lm_head quantized too) on each path, a few layers of the model that
    `xla-qops bench --model llama` measures in full (docs/bench_e2e.md). The
    ``nnx`` path is the Flax NNX decoder (`xla_qops_app.jax_llama`, jitted over
    the state split once); llama.cpp takes turns with it where
    scripts/ensure_llama_cpp.sh has built it (the demo never builds it).

    Every row is compared with what a user would otherwise run: the float
    model in eager torch (HF `generate` on CPU tensors), timed in the same turns
    (for the JAX rows it takes turns with them again). Not with the float model
    run through JAX: XLA:CPU's bf16 matmuls are much slower than torch's
    (docs/bench_e2e.md), and a ratio against them would credit quantization
    with that. The NNX rows are also compared with llama.cpp's Q4_0 / Q8_0 when
    it runs here. Each ratio gives the range of its per-turn ratios."""
    from xla_qops_app.bench import decoder, decoder_report, llama_cpp
    from xla_qops_app.bench.report import UNQUANTIZED, ratio
    if not paths:
        return
    rows = [decoder.Variant("bf16", "eager")]  # the baseline, whichever paths run
    for path in paths:
        rows += [decoder.Variant("bf16", path)] if path == "jax" else []
        rows += [decoder.Variant("xla_qops", path, scheme, block, True, True)
                 for scheme, block in (("w4a16", 128), ("w8a16", -1))]
    llama_missing = llama_cpp.unavailable() if "nnx" in paths else "no nnx rows"
    if llama_missing is None:
        rows += [decoder.Variant("llama_cpp", "llama.cpp", t) for t in decoder.LLAMA_CPP_TYPES]
    prompt, new = 32, 32
    print(f"\nDecoder: LlamaForCausalLM with TinyLlama-1.1B's dimensions, {layers} of its "
          f"{decoder.TINYLLAMA_LAYERS} layers, random bf16 weights; greedy generate, batch 1, "
          f"{prompt}-token prompt, {new} new tokens (full benchmark: docs/bench_e2e.md); "
          "'vs float' = against the float model in eager torch, timed in the same turns; "
          "nnx = the Flax NNX decoder (xla_qops_app/jax_llama.py), one jitted decode step")
    if "nnx" in paths and llama_missing is not None:
        print(f"(no llama.cpp comparison: {llama_missing})")
    base = decoder.build_model(layers)
    results = decoder.measure(base, rows, batch=1, prefill=prompt, decode=new, reps=2,
                              log=lambda *a: None)
    # The eager float model as timed in each path group's turns.
    float_runs = {r.timed_with: r.decode_runs for r in results
                  if r.variant.kind == "bf16" and r.variant.path == "eager"}
    header = (f"{'path':<9} {'weights':<16} {'MiB/token':>9} {'tokens/s':>9}  "
              f"{'vs float (per-turn range)':<27}"
              + ("  vs llama.cpp (per-turn range)" if llama_missing is None else ""))
    print(header)
    print("-" * len(header))
    for r in results:
        v = r.variant
        if r.companion or (v.path == "eager" and "eager" not in paths):
            continue
        what = ("float (bf16)" if v.kind == "bf16" else v.scheme if v.kind == "llama_cpp"
                else f"{v.scheme.upper()} {'g128' if v.block_size == 128 else 'pc'}")
        q = ratio(r.decode_runs, float_runs[r.timed_with], num_scheme=v.scheme_key,
                  den_scheme="bf16", across=UNQUANTIZED)
        peer = decoder_report.llama_cpp_peer(results, r)
        vs_llama = decoder_report.compare(r, peer)
        print(f"{v.path:<9} {what:<16} {r.step_bytes / 2**20:>9.0f} {r.decode_tok_s:>9.1f}  "
              f"{q.text():<27}"
              + (f"  {vs_llama.text()} vs {peer.variant.scheme}" if vs_llama else ""),
              flush=True)
