"""`xla-qops bench`: the host-CPU kernels against their peers, same run, same machine.

Cases: Llama-3-8B layer shapes (in×out) 4096×4096, 4096×14336, 14336×4096 at
M = 1, 4, 16 (decode) and 64, 256, 1024 (prefill), plus TinyLlama's MLP and
lm_head (2048×5632, 5632×2048, 2048×32000) at the decode M; bf16 activations;
W8A16 per-channel, W4A16 g128 symmetric and asymmetric, W8A8 per-channel, and
the float formats (issue F): W8A16-fp8 and W8A8-fp8 per-channel, W4A16-mxfp4
(B=32) and -nvfp4 (B=16), each also timed as the integer scheme of the same
bytes in the same turns (peers.Scheme.int_twin), and W8A16-fp8 against
torchao's float8 weight-only linear.
Then the per-call cost of `XlaQuantizedLinear` on torch CPU tensors against
the kernels' own time (xla_qops_app/bench/module_calls.py).

Each case: the median of several runs of impl="custom_call" and of every peer
(xla_qops_app/bench/peers.py), reported as peer time / our time with the
min-max of the per-turn ratios (xla_qops_app.bench.report.ratio, which refuses
a ratio across schemes unless it is labelled), plus our effective GB/s
(weight, scale and zero-point bytes / time). The peers run in turn within each
repetition (the memory bandwidth here drifts by up to 2x over seconds; each
takes untimed calls, three and at least 4 ms of them, before its timed ones,
at least one and 4 ms of them, whose mean per call is the turn's figure;
torch_xla's op, about a second a call, takes one untimed call and only the
first --slow-reps turns, on one weight compiled before the turns). The
project's own pure-XLA fallback (impl="xla") is not a peer: it is not what a
user would otherwise run (docs/benchmarks.md). `make
bench` runs torch with its default OpenMP wait policy (its workers spin
between calls: its fastest), GOMP_SPINCOUNT=20000 so that they stop spinning
soon after torch's turn, and GLIBC_TUNABLES=glibc.malloc.hugetlb=1 so that
XLA's weight buffers get transparent huge pages as numpy's (torch's weights
here) already do; the header records these. Decode cases (M <= 16) rotate
through enough distinct weights to exceed twice the last-level cache, so they
read from DRAM as a real model's layers would, and time a torch sum over the
same bytes alongside: the "% of read BW" of a decode case is against that
bandwidth of the same moments (other cases: against the bandwidth measured
at the start). Writes docs/bench.md and
docs/bench.png and prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from pallas_kernels import shapes

DEFAULT_SHAPES = shapes.to_text(shapes.LLAMA3_8B)  # "4096x4096,4096x14336,14336x4096"
# Decode-only cases (M <= 16): TinyLlama's MLP and lm_head, the end-to-end model's.
DEFAULT_DECODE_SHAPES = shapes.to_text(shapes.TINYLLAMA_DECODE)
DEFAULT_M = "1,4,16,64,256,1024"
DECODE_MAX_M = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from xla_qops_app.bench.peers import SCHEMES
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma-separated INxOUT layer shapes (default {DEFAULT_SHAPES})")
    parser.add_argument("--decode-shapes", default=DEFAULT_DECODE_SHAPES,
                        help=f"INxOUT shapes timed at the decode M only (<= {DECODE_MAX_M}; "
                             f"default {DEFAULT_DECODE_SHAPES}); '' for none")
    parser.add_argument("--m", default=DEFAULT_M, help=f"comma-separated token counts (default {DEFAULT_M})")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help=f"comma-separated subset of {', '.join(SCHEMES)}")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed runs per fast implementation (default 9; --model: 3 "
                             "generations per variant)")
    parser.add_argument("--slow-reps", type=int, default=None,
                        help="turns of torch_xla's op, slow (default 3; 0 skips it; "
                             "--model: generations of JAX bf16, default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="4096x4096, M=1 and 256, fewer runs (a minute or two)")
    parser.add_argument("--torch-xla", choices=("some", "all", "none"), default="some",
                        help="torch_xla's op: 'some' = 4096x4096 with M <= 256 (it is slow)")
    parser.add_argument("--out", default="docs", help="directory for bench.md and bench.png")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--quantizers", action="store_true",
                        help="instead: every quantizer method x scheme on all-MiniLM-L6-v2 "
                             "(cosine to the float model: held-out, in-distribution and "
                             "cross; time); writes quantizers_table.md")
    model = parser.add_argument_group(
        "end-to-end decoder (--model llama; writes bench_e2e.md/.png instead)")
    model.add_argument("--model", choices=("llama",), default=None,
                       help="benchmark a whole decoder's generate instead of single kernels")
    model.add_argument("--layers", type=int, default=None,
                       help="decoder layers (default 8 of TinyLlama-1.1B's 22: all 22 take "
                            "about 3x the time and 20 GB)")
    model.add_argument("--batch", default="1,4", help="comma-separated batch sizes (default 1,4)")
    model.add_argument("--prefill", type=int, default=128, help="prompt tokens (default 128)")
    model.add_argument("--decode", type=int, default=64, help="generated tokens (default 64)")
    model.add_argument("--paths", default="eager,jax,nnx,compile,llama.cpp",
                       help="comma-separated: eager (torch CPU tensors), jax (torchax, "
                            "jitted), nnx (the Flax NNX decoder, jitted), compile (HF decode "
                            "step under torch.compile), compile-cpp (the same, inductor's C++ "
                            "wrapper; not in the default), llama.cpp (if "
                            "scripts/ensure_llama_cpp.sh built it); default all but compile-cpp")
    model.add_argument("--xla-layers", type=int, default=2,
                       help="layers of the torch_xla-device section (static cache; its "
                            "first generate compiles for minutes); 0 skips it (default 2)")


# Untimed calls of a turn last at least this long: torch's OpenMP workers keep
# spinning after its turn (GOMP_SPINCOUNT=20000 is about 2 ms here) and took
# the cores from the next peer's threads: the custom call's 4096x4096 M=1
# decode timed 0.33 ms three calls after a torch turn, 0.21 ms after 4 ms of
# calls, 0.19 ms with no torch in the process.
WARM_SECONDS = 0.004
# The timed calls of a turn last at least this long, and the turn's figure is their
# mean: one sub-millisecond call timed alone moved by 2x between turns here (the
# fp4 decode rows read 1.15-1.30x int4 of the same bytes at M=1 over 5 turns, where
# alternating batches of 24 calls measured 0.98-0.99x).
TIMED_SECONDS = 0.004


def _interleaved_times(steps: dict, reps: int, warm: int = 3,
                       warm_seconds: float = WARM_SECONDS, slow: dict | None = None,
                       timed_seconds: float = TIMED_SECONDS) -> dict:
    """Each step's time per call in every turn, in turn order; the steps take
    turns within every repetition. A turn's figure is the mean of its timed
    calls: at least one, and for at least `timed_seconds` (consecutive calls
    on consecutive weight copies, as a model's layers run).

    This machine's memory bandwidth drifts by up to 2x over seconds (other
    tenants): timing all of one implementation's runs and then the next's
    would put that drift into the ratios. Each turn runs untimed calls first
    (at least `warm`, and for at least `warm_seconds`), so every step is timed
    as in a model's consecutive layers, with its own threads awake and the
    previous peer's threads gone quiet. (Pausing between turns made every
    peer erratic here: idle virtual CPUs come back slowly.)

    slow: {name: turns} for steps too slow for that (torch_xla's op, about a
    second a call): they take a turn only in the first `turns` repetitions,
    one untimed call then the timed one, in the same rounds as the others."""
    slow = slow or {}
    times = {name: [] for name in steps}
    call = 0
    for rep in range(reps):
        for name, step in steps.items():
            if name in slow and rep >= slow[name]:
                continue
            start, n = time.perf_counter(), 0
            need_calls, need_s = (1, 0.0) if name in slow else (warm, warm_seconds)
            while n < need_calls or time.perf_counter() - start < need_s:
                step(call)
                call += 1
                n += 1
            t, timed = time.perf_counter(), 0
            while timed == 0 or (name not in slow
                                 and time.perf_counter() - t < timed_seconds):
                step(call)
                call += 1
                timed += 1
            times[name].append((time.perf_counter() - t) / timed)
    return times


def _interleaved_medians(steps: dict, reps: int, warm: int = 3,
                         warm_seconds: float = WARM_SECONDS,
                         timed_seconds: float = TIMED_SECONDS) -> dict:
    """Median time of each step (`_interleaved_times`)."""
    return {name: statistics.median(ts)
            for name, ts in _interleaved_times(steps, reps, warm, warm_seconds,
                                               timed_seconds=timed_seconds).items()}


def _failing_quietly(step):
    """`step`, except that once a call raises it does nothing: a slow peer that
    fails mid-run loses its own times (`.error` says why), not the others'."""
    def call(i):
        if call.error is None:
            try:
                step(i)
            except Exception as e:  # noqa: BLE001  reported by the caller
                call.error = e
    call.error = None
    return call


def read_peer(total_bytes: int):
    """A multithreaded sum over `total_bytes` (torch, float32): the read
    bandwidth of the moment, timed alongside a decode case's implementations."""
    import torch
    a = torch.ones(max(1, total_bytes // 4), dtype=torch.float32)
    return (lambda i: a.sum()), a.numel() * 4


def measure_read_bandwidth() -> float:
    """GB/s of a multithreaded sum over 1 GiB (torch, all threads), best of 7.

    The best run, not the median: on a machine shared with other jobs the
    median measures the other jobs; the best run is the closest to what the
    memory system delivers (so "% of read BW" errs on the low side)."""
    import torch
    a = torch.ones(1 << 28, dtype=torch.float32)
    a.sum()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / min(times) / 1e9


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 64 << 20


METHOD = (
    "How these figures are made: docs/benchmarks.md (the rules) and docs/cpu_kernels.md "
    "(what the kernels do). Times are medians of {reps} turns, with the min–max over the "
    "turns in parentheses; ratios are peer time / our time from the same turns (> 1 means "
    "ours is faster), with the min–max of the per-turn ratios. The peers take turns within "
    "every repetition, each turn untimed calls (three, and at least {warm_ms} ms of them: "
    "torch's OpenMP workers spin after its turn) then timed ones (at least one, and "
    "{timed_ms} ms of them: the turn's figure is their mean per call). torch's int kernel and "
    "torch_xla's op get the very weights ours reads (same scheme); bf16 torch mm is the "
    "unquantized layer. torch_xla's op (4096×4096 only, unless --torch-xla all) is timed in "
    "steady state: one weight, reused, compiled by an untimed call before the turns, then "
    "one untimed and one timed call in each of the first {slow_reps} turns; its cell says "
    "so if anything compiled during its turns. GB/s counts the weight, scale and zero-point "
    "bytes read. Decode rows (M <= 16) rotate ours and torch's through distinct weights "
    "totalling more than twice the LLC (as many as 40% of the available memory holds, if "
    "fewer: the log says so), and their % is of the read bandwidth of a torch sum "
    "over the same bytes timed in the same turns (other rows: of the bandwidth measured at "
    "the start). The fp8 / fp4 rows also time ours on the integer scheme of the same bytes "
    "(same bits, block size and scales, from the same float weights) in the same turns: "
    "their targets compare the two; torchao's float8 weight-only linear (W8A16-fp8) "
    "quantizes the same float weights itself, with the same scheme.")


def markdown(info, rows, read_bw, module_rows, reps, slow_reps) -> str:
    """docs/bench.md: only what this run measured, and how."""
    from xla_qops_app.bench import module_calls, report
    return "\n\n".join([
        "# `xla-qops bench` results",
        f"Machine: {info}; load average at the end {os.getloadavg()[0]:.1f}.",
        METHOD.format(warm_ms=f"{WARM_SECONDS * 1e3:g}", timed_ms=f"{TIMED_SECONDS * 1e3:g}", reps=reps,
                      slow_reps=slow_reps),
        "## Targets (issue K: small batches; then prefill)",
        report.targets(rows, read_bw),
        "## All cases",
        report.table(rows, read_bw),
        "![bench](bench.png)",
        *(["## Per call through `XlaQuantizedLinear` on torch CPU tensors (M=1)",
           "The module's forward against the kernels' own time (timed in C++ around the same "
           "work, no Python) and torch's int4 kernel in an nn.Module given the same quantized "
           "weights (for the symmetric row: zero points of 0), each a pass over distinct "
           "weight copies (more than twice the LLC, or as many as memory holds), in turns; "
           "medians per call, min–max "
           f"over the {reps} turns in parentheses.",
           module_calls.table(module_rows)] if module_rows else []),
        "The end-to-end decoder benchmark (`xla-qops bench --model llama`): "
        "[bench_e2e.md](bench_e2e.md).",
    ]) + "\n"


def run(args) -> int:
    if args.quantizers:
        from xla_qops_app.bench import quantizers
        text = quantizers.markdown(quantizers.run())
        print(text)
        if not args.no_write:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "quantizers_table.md"), "w") as f:
                f.write(text)
            print(f"wrote {args.out}/quantizers_table.md")
        return 0
    if args.model:
        from xla_qops_app.commands import bench_model
        return bench_model.run(args)
    import jax
    from xla_qops.backends import custom_call
    from xla_qops_app.bench import module_calls, peers, report

    args.reps = 9 if args.reps is None else args.reps
    args.slow_reps = 3 if args.slow_reps is None else args.slow_reps
    if args.quick:
        args.shapes, args.m, args.reps, args.slow_reps = "4096x4096", "1,256", 5, 2
        args.decode_shapes = "2048x32000"
    ms = [int(v) for v in args.m.split(",")]
    decode_only = [m for m in ms if m <= DECODE_MAX_M]
    cases = [(k, n, ms) for k, n in shapes.parse(args.shapes)]
    if args.decode_shapes and decode_only:
        cases += [(k, n, decode_only) for k, n in shapes.parse(args.decode_shapes)]
    schemes = [peers.SCHEMES[s] for s in args.schemes.split(",")]
    if not custom_call.available():
        raise SystemExit("bench: xla_qops._cpu_kernels is not built (reinstall the package)")

    read_bw = measure_read_bandwidth()
    llc = llc_bytes()
    env = peers.wait_settings()
    info = (f"{custom_call.cpu_description()} with {custom_call.num_threads()} threads, "
            f"jax {jax.__version__}; "
            f"measured read bandwidth {read_bw:.1f} GB/s; LLC {llc >> 20} MiB; "
            f"load average at start {os.getloadavg()[0]:.1f} (other jobs share the cores); {env}")
    print(info, flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for k, n, case_ms in cases:
        for scheme in schemes:
            decode_ms = [m for m in case_ms if m <= DECODE_MAX_M]
            probe = peers.quantized(peers.float_weights(rng, n, k, 1), scheme)[0]
            nbytes = peers.weight_bytes(probe)
            # Per copy: float32 and bf16 forms (ours, the twin's, torch's, torchao's
            # start from them) and the quantized ones (numpy and device arrays).
            copies = (peers.rotation_copies(llc, nbytes, 8 * n * k + 4 * nbytes)
                      if decode_ms else 1)
            if decode_ms and copies * nbytes <= 2 * llc:
                print(f"  {k}x{n} {scheme.name}: {copies} weight copies ({copies * nbytes >> 20} "
                      f"MiB), fewer than twice the LLC: as many as memory holds", flush=True)
            ws = peers.float_weights(rng, n, k, copies)
            qws = peers.quantized(ws, scheme)
            # A float format's integer twin: the same bytes from the same float
            # weights, timed in the same turns (fp8 / int8, fp4 / int4).
            twin = scheme.int_twin
            twin_qws = peers.quantized(ws, twin) if twin else None
            try:
                torchao_linears = peers.torchao_fp8_linears(ws, scheme)
            except Exception as e:  # noqa: BLE001  a peer that cannot run is reported, not fatal
                torchao_linears = None
                print(f"  torchao float8 weight-only unavailable for {scheme.name}: "
                      f"{e!r}"[:200])
            for m in case_ms:
                rot = copies if m <= DECODE_MAX_M else 1
                x = rng.standard_normal((m, k), dtype=np.float32)
                steps = {
                    "ours": peers.jax_peer(qws[:rot], x, scheme, "custom_call"),
                    "int_twin": twin and peers.jax_peer(twin_qws[:rot], x, twin, "custom_call"),
                    "torch_q": peers.torch_quantized_peer(qws[:rot], x, scheme),
                    "torch_bf16": peers.torch_bf16_peer(ws[:rot], x),
                    "torchao_fp8": peers.torchao_fp8_peer((torchao_linears or [])[:rot], x),
                }
                steps = {name: step for name, step in steps.items() if step}
                read_bytes = None
                if m <= DECODE_MAX_M:  # DRAM-bound: the read bandwidth of the same moments
                    steps["read"], read_bytes = read_peer(copies * nbytes)
                # torch_xla's op has no float element formats.
                want_txla = scheme.format == "int" and (args.torch_xla == "all" or (
                    args.torch_xla == "some" and (k, n) == (4096, 4096) and m <= 256))
                compiles = {}
                if want_txla and args.slow_reps > 0:
                    # Steady state: one weight, reused (its int4 path takes the weight
                    # into its graph as a constant, so each new weight compiles a new
                    # graph), compiled by an untimed call before the turns; then it
                    # takes its turns with the others. Compilations during the turns
                    # are counted and reported with its ratio.
                    try:
                        txla = peers.torch_xla_peer(qws[:1], x, scheme)
                        txla(0)
                        steps["torch_xla"] = _failing_quietly(txla)
                    except Exception as e:  # noqa: BLE001  a peer that cannot run is reported, not fatal
                        print(f"  torch_xla unavailable for {scheme.name}: {e!r}"[:200])
                samples = {}
                try:
                    before = txla.compilations() if "torch_xla" in steps else 0
                    samples = _interleaved_times(steps, args.reps,
                                                 slow={"torch_xla": args.slow_reps})
                    if "torch_xla" in steps:
                        compiles["torch_xla"] = txla.compilations() - before
                        if steps["torch_xla"].error is not None:
                            print(f"  torch_xla failed for {scheme.name} M={m}: "
                                  f"{steps['torch_xla'].error!r}"[:200])
                            samples.pop("torch_xla")
                except Exception as e:  # noqa: BLE001  a peer that cannot run is reported, not fatal
                    print(f"  a peer failed for {scheme.name} M={m}: {e!r}"[:200])
                samples = {name: ts for name, ts in samples.items() if ts}
                times = {name: statistics.median(ts) for name, ts in samples.items()}
                row = dict(k=k, n=n, m=m, scheme=scheme.name, bytes=nbytes, times=times,
                           samples=samples, compiles=compiles,
                           twin_scheme=twin.name if twin else None)
                if "read" in times:
                    row["read_bw"] = read_bytes / times.pop("read") / 1e9
                    samples.pop("read")
                if "ours" not in times:
                    print(f"  no timing of ours for {scheme.name} M={m}: case left out")
                    continue
                rows.append(row)
                print(report.table([row], read_bw).splitlines()[-1], flush=True)
            del ws, qws, twin_qws, torchao_linears

    from torch_bridge import _cpu_ops
    module_rows = []
    if _cpu_ops.available():
        print("per call through XlaQuantizedLinear (M=1, weights rotated):", flush=True)
        module_rows = module_calls.measure(llc_bytes=llc, reps=args.reps)
    md = markdown(info, rows, read_bw, module_rows, args.reps, args.slow_reps)
    print()
    print(report.table(rows, read_bw))
    print()
    print(report.targets(rows, read_bw))
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(md)
        report.plot(rows, read_bw, os.path.join(args.out, "bench.png"))
        print(f"wrote {args.out}/bench.md and {args.out}/bench.png")
    return 0
