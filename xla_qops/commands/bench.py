"""`xla-qops bench`: the host-CPU kernels against their peers, same run, same machine.

Cases: Llama-3-8B layer shapes (in×out) 4096×4096, 4096×14336, 14336×4096;
M = 1, 4, 16 (decode) and 64, 256, 1024 (prefill); bf16 activations; W8A16
per-channel, W4A16 g128 symmetric and asymmetric, W8A8 per-channel.

Each case: the median of several runs of impl="custom_call" and of every peer
(xla_qops/bench/peers.py), reported as peer time / our time, plus our
effective GB/s (weight, scale and zero-point bytes / time) against this
machine's read bandwidth, measured first. Decode cases (M <= 16) rotate
through enough distinct weights to exceed twice the last-level cache, so they
read from DRAM as a real model's layers would. Writes docs/bench.md and
docs/bench.png and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

DEFAULT_SHAPES = "4096x4096,4096x14336,14336x4096"
DEFAULT_M = "1,4,16,64,256,1024"
DECODE_MAX_M = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from xla_qops.bench.peers import SCHEMES
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma-separated INxOUT layer shapes (default {DEFAULT_SHAPES})")
    parser.add_argument("--m", default=DEFAULT_M, help=f"comma-separated token counts (default {DEFAULT_M})")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help=f"comma-separated subset of {', '.join(SCHEMES)}")
    parser.add_argument("--reps", type=int, default=9, help="timed runs per fast implementation")
    parser.add_argument("--slow-reps", type=int, default=3,
                        help='timed runs for impl="xla" and torch_xla (slow)')
    parser.add_argument("--quick", action="store_true",
                        help="4096x4096, M=1 and 256, fewer runs (a minute or two)")
    parser.add_argument("--torch-xla", choices=("some", "all", "none"), default="some",
                        help="torch_xla's op: 'some' = 4096x4096 with M <= 256 (it is slow)")
    parser.add_argument("--out", default="docs", help="directory for bench.md and bench.png")
    parser.add_argument("--no-write", action="store_true", help="print only")


def _median_time(step, reps, warmup=2):
    for i in range(warmup):
        step(i)
    times = []
    for i in range(reps):
        t = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def run(args) -> int:
    import jax
    from xla_qops.backends import custom_call
    from xla_qops.bench import peers, report

    if args.quick:
        args.shapes, args.m, args.reps, args.slow_reps = "4096x4096", "1,256", 5, 2
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    schemes = [peers.SCHEMES[s] for s in args.schemes.split(",")]
    if not custom_call.available():
        raise SystemExit("bench: xla_qops._cpu_kernels is not built (reinstall the package)")

    read_bw = measure_read_bandwidth()
    llc = llc_bytes()
    info = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, kernels "
            f"'{custom_call.isa()}' with {custom_call.num_threads()} threads, jax {jax.__version__}; "
            f"measured read bandwidth {read_bw:.1f} GB/s; LLC {llc >> 20} MiB; "
            f"load average at start {os.getloadavg()[0]:.1f} (other jobs share the cores)")
    print(info, flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for k, n in shapes:
        for scheme in schemes:
            decode_ms = [m for m in ms if m <= DECODE_MAX_M]
            probe = peers.quantized(peers.float_weights(rng, n, k, 1), scheme)[0]
            nbytes = peers.weight_bytes(probe)
            copies = max(2, -(-2 * llc // nbytes)) if decode_ms else 1
            ws = peers.float_weights(rng, n, k, copies)
            qws = peers.quantized(ws, scheme)
            for m in ms:
                rot = copies if m <= DECODE_MAX_M else 1
                x = rng.standard_normal((m, k), dtype=np.float32)
                steps = {
                    "ours": peers.jax_peer(qws[:rot], x, scheme, "custom_call"),
                    "torch_q": peers.torch_quantized_peer(qws[:rot], x, scheme),
                    "torch_bf16": peers.torch_bf16_peer(ws[:rot], x),
                    "xla": peers.jax_peer(qws[:rot], x, scheme, "xla"),
                }
                want_txla = args.torch_xla == "all" or (
                    args.torch_xla == "some" and (k, n) == (4096, 4096) and m <= 256)
                if want_txla:
                    try:
                        steps["torch_xla"] = peers.torch_xla_peer(qws[:rot], x, scheme)
                    except Exception as e:  # noqa: BLE001  a peer that cannot run is reported, not fatal
                        print(f"  torch_xla unavailable for {scheme.name}: {e!r}"[:200])
                times = {}
                for name, step in steps.items():
                    if step is None:
                        continue
                    slow = name in ("xla", "torch_xla")
                    try:
                        times[name] = _median_time(step, args.slow_reps if slow else args.reps,
                                                   warmup=1 if slow else 2)
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name} failed for {scheme.name} M={m}: {e!r}"[:200])
                row = dict(k=k, n=n, m=m, scheme=scheme.name, bytes=nbytes, times=times)
                rows.append(row)
                print(report.table([row], read_bw).splitlines()[-1], flush=True)
            del ws, qws

    md = "\n\n".join([
        "# `xla-qops bench` results",
        f"Machine: {info}; load average at the end {os.getloadavg()[0]:.1f}. Times are medians; ratios are peer time / our time from the "
        "same run (> 1 means ours is faster). GB/s counts the weight, scale and zero-point "
        "bytes read. Decode rows (M <= 16) rotate through distinct weights totalling more "
        "than twice the LLC. See docs/cpu_kernels.md for what the kernels do.",
        "## Targets (issue #5 §3)",
        report.targets(rows, read_bw),
        "## All cases",
        report.table(rows, read_bw),
        "![bench](bench.png)",
    ]) + "\n"
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
