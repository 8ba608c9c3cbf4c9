"""`xla-qops bench --model llama`: the end-to-end decoder benchmark.

Builds the decoder (xla_qops_app/bench/decoder.py), times every variant for each
batch size, and writes docs/bench_e2e.md and docs/bench_e2e.png (with
`--out`), printing the tables and the targets.
"""

from __future__ import annotations

import os
import time

from xla_qops_app.bench import decoder, decoder_report, llama_cpp


def _environment() -> str:
    import jax
    import torch
    from xla_qops.backends import custom_call
    from xla_qops_app.bench.peers import wait_settings
    env = wait_settings()
    return (f"{custom_call.cpu_description()}, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, jax {jax.__version__}; load average at start {os.getloadavg()[0]:.1f}; {env}")


def _torchao_config_text() -> str:
    """The torchao config the int4 peer uses, as a call (its name moved in torchao 0.16)."""
    config = decoder.torchao_int4_config()
    packing = getattr(config, "int4_packing_format", None)
    extra = f", int4_packing_format=\"{getattr(packing, 'value', packing)}\"" if packing else ""
    return f"{type(config).__name__}(group_size={config.group_size}{extra})"


def run(args) -> int:
    layers = args.layers or 8
    batches = [int(b) for b in args.batch.split(",")]
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - set(decoder.PATHS)
    if unknown or layers < 1 or min(batches) < 1 or args.prefill < 1 or args.decode < 2:
        raise ValueError(f"bench --model: expected --paths from {','.join(decoder.PATHS)}, "
                         f"--layers/--batch/"
                         f"--prefill >= 1 and --decode >= 2, got paths={args.paths!r}, "
                         f"layers={layers}, batch={args.batch!r}, prefill={args.prefill}, "
                         f"decode={args.decode}")
    reps = args.reps or 3
    slow_reps = args.slow_reps or 1
    info = _environment()
    print(info, flush=True)
    torchao_missing = decoder.torchao_available()
    llama_missing = llama_cpp.unavailable() if "llama.cpp" in paths else None
    if llama_missing:
        print(f"llama.cpp rows left out: {llama_missing}", flush=True)
        paths = tuple(p for p in paths if p != "llama.cpp")
    # Paths this environment cannot run (the current stack: no torchax) are left out
    # with the reason, in the output and in the notes.
    missing_paths = {p: why for p in paths if (why := decoder.path_unavailable(p))}
    for path, why in missing_paths.items():
        print(f"{path} rows left out: {why}", flush=True)
    paths = tuple(p for p in paths if p not in missing_paths)
    xla_missing = decoder.path_unavailable("xla") if args.xla_layers else None
    if xla_missing:
        print(f"torch_xla device section left out: {xla_missing}", flush=True)
    rows = decoder.variants(paths, torchao=torchao_missing is None)
    failed: dict[str, str] = {}
    start = time.perf_counter()
    torchao_note = (f"- torchao: {torchao_missing}" if torchao_missing else
                    f"- torchao: `{_torchao_config_text()}`, its CPU int4 format (opaque, "
                    "asymmetric), swapped in by `torchao.quantization.quantize_`.")

    def write(results, xla_rows, done):
        if args.no_write:
            return
        notes = [torchao_note, llama_note(llama_missing)]
        notes += [f"- {path} rows: left out, {why}" for path, why in missing_paths.items()]
        notes += [f"- torch_xla device section: left out, {xla_missing}"] if xla_missing else []
        notes += [f"- {name}: left out, {error}" for name, error in failed.items()]
        md = _markdown(args, info, layers, reps, slow_reps, batches, results, xla_rows,
                       (time.perf_counter() - start) / 60, notes, done)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_e2e.md"), "w") as f:
            f.write(md)
        decoder_report.plot(results, os.path.join(args.out, "bench_e2e.png"))

    base = decoder.build_model(layers)
    results = []
    for batch in batches:
        print(f"batch {batch}: {len(rows)} variants, prompt {args.prefill}, "
              f"{args.decode} new tokens, {reps} runs each", flush=True)
        results += decoder.measure(base, rows, batch=batch, prefill=args.prefill,
                                   decode=args.decode, reps=reps, slow_reps=slow_reps,
                                   failed=failed)
        print(decoder_report.table(results, batch), flush=True)
        write(results, [], done=False)  # a crash later keeps what was measured
    del base
    xla_rows = []
    if args.xla_layers and not xla_missing:
        print(f"torch_xla device: {args.xla_layers} layers, batch 1", flush=True)
        xla_rows = _xla_device_in_child(args.xla_layers, args.prefill, min(args.decode, 16))
        print(decoder_report.xla_table(xla_rows), flush=True)
    write(results, xla_rows, done=True)
    print()
    print(decoder_report.targets_markdown(results))
    if not args.no_write:
        print(f"wrote {args.out}/bench_e2e.md and {args.out}/bench_e2e.png")
    return 0


# The torch_xla section runs one child process per variant: LLVM's JIT keeps
# every compiled executable's memory mappings, and compilations on top of the
# JAX rows' executables, or of an earlier variant's 54, ran out of them ("LLVM
# compilation error: Cannot allocate memory", then a crash).
XLA_DEVICE_ROWS = (("bf16", None, -1), ("xla_qops", "w4a16", 128), ("xla_qops", "w8a16", -1))


def xla_device_row(index: int) -> decoder.Variant:
    """The torch_xla device section's variant number `index` (lm_head quantized too)."""
    kind, scheme, block_size = XLA_DEVICE_ROWS[index]
    if kind == "bf16":
        return decoder.Variant(kind, "xla")
    return decoder.Variant(kind, "xla", scheme, block_size, True, True)

_XLA_CHILD = """
import dataclasses, json, sys
from xla_qops_app.bench import decoder
from xla_qops_app.commands.bench_model import xla_device_row
layers, prefill, decode, index = (int(v) for v in sys.argv[1:5])
row = xla_device_row(index)
base = decoder.build_model(layers)
for r in decoder.measure_xla_device(base, [row], prefill=prefill, decode=decode):
    print("RESULT " + json.dumps(dataclasses.asdict(r)), flush=True)
"""


def _xla_device_in_child(layers, prefill, decode):
    import json
    import subprocess
    import sys
    env = dict(os.environ, PJRT_DEVICE=os.environ.get("PJRT_DEVICE", "CPU"))
    rows = []
    for index in range(len(XLA_DEVICE_ROWS)):
        proc = subprocess.run([sys.executable, "-c", _XLA_CHILD, str(layers), str(prefill),
                               str(decode), str(index)], env=env, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                d = json.loads(line[len("RESULT "):])
                d["variant"] = decoder.Variant(**d["variant"])
                rows.append(decoder.XlaDeviceResult(**d))
            elif line.strip():
                print(line, flush=True)
        if proc.returncode != 0:
            print(f"torch_xla device row {XLA_DEVICE_ROWS[index]} failed (exit "
                  f"{proc.returncode}): {proc.stderr[-2000:]}", flush=True)
    return rows


def llama_note(missing) -> str:
    if missing:
        return f"- llama.cpp: not run here: {missing}."
    return ("- llama.cpp: llama-cpp-python built from PyPI for this CPU "
            "(`scripts/ensure_llama_cpp.sh`: `-DGGML_NATIVE=ON`), the same random-weight model "
            "converted by llama.cpp's `convert_hf_to_gguf.py` to bf16 GGUF (no vocabulary: "
            "token ids go in directly), quantized by `llama_model_quantize` to Q4_0 and Q8_0 "
            "(default mixtures), generating greedily through `llama_decode` with "
            f"{llama_cpp.THREADS} threads; it takes turns with the `nnx` and compiled rows.")


# Notes say what the code does, never what some other run measured: a
# generated document holds only the figures of the run that wrote it.
TORCHAX_NOTE = (
    "- jax: torchax 0.0.7 returns float32 from `scaled_dot_product_attention` on bfloat16 "
    "inputs (google/torchax#31, fixed in later torchax); the JAX path casts the result back "
    "to the query's dtype, as torch does (`torch_bridge.register_with_torchax()`, "
    "`torch_bridge/torchax_ops.py`). Without that the model's activations turn float32 "
    "after the first attention, and every A16 matmul runs its float32 form (three bfloat16 "
    "terms).")


def _markdown(args, info, layers, reps, slow_reps, batches, results, xla_rows, minutes,
              notes, done) -> str:
    return "\n\n".join([
        "# End-to-end decoder benchmark (`xla-qops bench --model llama`)",
        *([] if done else ["**Partial: the run has not finished.**"]),
        f"Machine: {info}; load average at the end {os.getloadavg()[0]:.1f}; "
        f"{minutes:.0f} min.",
        f"Model: transformers `LlamaForCausalLM` with TinyLlama-1.1B's dimensions (hidden "
        f"2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000), {layers} of its "
        f"{decoder.TINYLLAMA_LAYERS} layers, random bf16 weights. Greedy generation: a "
        f"{args.prefill}-token prompt, then {args.decode} new tokens; per variant the median of "
        f"{reps} generations (JAX and NNX bf16: {slow_reps}), min–max over them in parentheses, "
        "the variants of one path taking turns within every repetition. `eager` is HF "
        "`generate` on torch CPU tensors; `jax` is the same torch module run by torchax as one "
        "jitted JAX step (static KV cache) in a greedy loop; `nnx` is the Flax NNX decoder "
        "(`xla_qops_app/jax_llama.py`) with the same weights, one jitted prefill and one jitted "
        "decode step over the state split once (`jax.jit`, cache donated); `compile` is HF's "
        "forward and the argmax compiled as one greedy step by `torch.compile` (inductor, "
        "fullgraph, static cache, HF's eager attention) in a Python loop: docs/torch.md, "
        "\"The compiled decode step\"; `compile-cpp` is the same with inductor's C++ wrapper "
        "(`cpp_wrapper=True`: kernels and our op called from C++, twice the compile time); "
        "`llama.cpp` is the same model as GGUF Q4_0 / Q8_0. The `nnx`, `compile`, `compile-cpp` "
        "and `llama.cpp` rows take turns together (with the eager peers timed again), and the "
        "ratios against llama.cpp pair W4A16 and W4A8 with Q4_0, W8A16 with Q8_0, labelled "
        "as a comparison across formats. Decode tok/s counts every sequence of the "
        "batch. \"weights MiB/step\" is what one decode step reads (every parameter and buffer "
        "but the token embeddings); the floor is that at the read bandwidth of a torch sum "
        "timed in the same turns. Ratios are against the eager peers timed in the same turns "
        "(for the `jax` rows the peers take turns with them again), with the min–max of the "
        "per-turn ratios in parentheses; only between the same scheme and lm_head coverage "
        "(torch's and torchao's int4 are W4A16 g128 asymmetric), except against bf16, the "
        "unquantized model, and our symmetric W4A16 against the asymmetric int4 peers, "
        "marked \"sym vs asym\" (torch's kernel applies a zero point whatever the weights; "
        "ours skips it for symmetric ones). The rules: [benchmarks.md](benchmarks.md).",
        "## Targets (issues G, J, 24, 25)",
        decoder_report.targets_markdown(results),
        *[f"## Batch {b}\n\n{decoder_report.table(results, b)}" for b in batches
          if any(r.batch == b for r in results)],
        "![decode tokens/s](bench_e2e.png)",
        *([f"## torch_xla device ({args.xla_layers} layers, batch 1, static cache)\n\n"
           + decoder_report.xla_table(xla_rows)] if xla_rows else []),
        "## Notes",
        *notes,
        TORCHAX_NOTE,
    ]) + "\n"
