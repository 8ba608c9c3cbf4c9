"""`xla-qops bench --model llama`: the end-to-end decoder benchmark.

Builds the decoder (xla_qops/bench/decoder.py), times every variant for each
batch size, and writes docs/bench_e2e.md and docs/bench_e2e.png (with
`--out`), printing the tables and the targets.
"""

from __future__ import annotations

import os
import platform
import time

from xla_qops.bench import decoder, decoder_report


def _environment() -> str:
    import jax
    import torch
    from xla_qops.backends import custom_call
    env = ", ".join(f"{v}={os.environ.get(v, '(unset)')}"
                    for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GLIBC_TUNABLES"))
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, kernels "
            f"'{custom_call.isa()}', torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, jax {jax.__version__}; load average at start {os.getloadavg()[0]:.1f}; {env}")


def run(args) -> int:
    layers = args.layers or 8
    batches = [int(b) for b in args.batch.split(",")]
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - {"eager", "jax"}
    if unknown or layers < 1 or min(batches) < 1 or args.prefill < 1 or args.decode < 2:
        raise ValueError(f"bench --model: expected --paths from eager,jax, --layers/--batch/"
                         f"--prefill >= 1 and --decode >= 2, got paths={args.paths!r}, "
                         f"layers={layers}, batch={args.batch!r}, prefill={args.prefill}, "
                         f"decode={args.decode}")
    reps = args.reps or 3
    slow_reps = args.slow_reps or 1
    info = _environment()
    print(info, flush=True)
    torchao_missing = decoder.torchao_available()
    rows = decoder.variants(paths, torchao=torchao_missing is None)
    start = time.perf_counter()
    base = decoder.build_model(layers)
    results = []
    for batch in batches:
        print(f"batch {batch}: {len(rows)} variants, prompt {args.prefill}, "
              f"{args.decode} new tokens, {reps} runs each", flush=True)
        results += decoder.measure(base, rows, batch=batch, prefill=args.prefill,
                                   decode=args.decode, reps=reps, slow_reps=slow_reps)
        print(decoder_report.table(results, batch), flush=True)
    xla_rows = []
    if args.xla_layers:
        print(f"torch_xla device: {args.xla_layers} layers, batch 1", flush=True)
        xla_base = decoder.build_model(args.xla_layers)
        xla_rows = decoder.measure_xla_device(
            xla_base, [decoder.Variant("bf16", "xla")]
            + [decoder.Variant("xla_qops", "xla", s, b, True, True)
               for s, b in (("w4a16", 128), ("w8a16", -1))],
            prefill=args.prefill, decode=min(args.decode, 16))
    minutes = (time.perf_counter() - start) / 60
    notes = [f"- torchao: {torchao_missing}" if torchao_missing else
             "- torchao: `Int4WeightOnlyConfig(group_size=128, int4_packing_format=\"opaque\")`, "
             "its CPU int4 format, swapped in by `torchao.quantization.quantize_`."]
    md = "\n\n".join([
        "# End-to-end decoder benchmark (`xla-qops bench --model llama`)",
        f"Machine: {info}; load average at the end {os.getloadavg()[0]:.1f}; "
        f"{minutes:.0f} min.",
        f"Model: transformers `LlamaForCausalLM` with TinyLlama-1.1B's dimensions (hidden "
        f"2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000), {layers} of its "
        f"{decoder.TINYLLAMA_LAYERS} layers, random bf16 weights. Greedy generation: a "
        f"{args.prefill}-token prompt, then {args.decode} new tokens; per variant the median of "
        f"{reps} generations (JAX bf16: {slow_reps}), the variants of one path taking turns "
        "within every repetition. `eager` is HF `generate` on torch CPU tensors; `jax` is the "
        "same torch module run by torchax as one jitted JAX step (static KV cache) in a "
        "greedy loop. Decode tok/s counts every sequence of the batch. \"weights MiB/step\" is "
        "what one decode step reads (every parameter and buffer but the token embeddings); "
        "the floor is that at the read bandwidth of a torch sum timed in the same turns; "
        "ratios are against the eager peers (for +lm_head rows, the peer with lm_head "
        "quantized too).",
        "## Targets (issue G)",
        decoder_report.targets_markdown(results),
        *[f"## Batch {b}\n\n{decoder_report.table(results, b)}" for b in batches],
        "![decode tokens/s](bench_e2e.png)",
        *([f"## torch_xla device ({args.xla_layers} layers, batch 1, static cache)\n\n"
           + decoder_report.xla_table(xla_rows)] if xla_rows else []),
        "## Notes",
        "\n".join(notes),
    ]) + "\n"
    print()
    print(decoder_report.targets_markdown(results))
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_e2e.md"), "w") as f:
            f.write(md)
        decoder_report.plot(results, os.path.join(args.out, "bench_e2e.png"))
        print(f"wrote {args.out}/bench_e2e.md and {args.out}/bench_e2e.png")
    return 0
