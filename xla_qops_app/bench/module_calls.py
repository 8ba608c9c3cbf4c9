"""Per-call time of `XlaQuantizedLinear` on torch CPU tensors against the kernel's own.

For each shape and scheme, at M=1, with enough distinct weight copies to read
more than twice the last-level cache per pass, the implementations take turns
within every repetition, each timing one pass over its copies:

* ``kernel``: the C++ kernels' own time (`torch.ops.xla_qops_cpu.kernel_seconds`,
  timed in C++ around the same work a call does, no Python);
* ``module``: ``XlaQuantizedLinear.__call__`` (what a model's forward pays);
* ``torch_int4``: torch's `_weight_int4pack_mm_for_cpu` in an nn.Module, the
  peer a CPU user has (`decoder._torch_int4_linear_class`), built with the
  same scheme as the row (symmetric rows: torch's kernel with zero points of
  0), so its ratio compares the same weights.

Reported: medians per call (min-max over the turns), the module's overhead
over the kernel, and torch int4 time / module time with the min-max of the
per-turn ratios (`report.ratio`).
"""

from __future__ import annotations

import statistics
import time

DEFAULT_SHAPES = ((2048, 2048), (4096, 4096))


def _pass_seconds(modules, x) -> float:
    start = time.perf_counter()
    for m in modules:
        m(x)
    return (time.perf_counter() - start) / len(modules)


def measure(shapes=DEFAULT_SHAPES, schemes=(("w4a16-g128-sym", True), ("w4a16-g128-asym", False)),
            llc_bytes: int = 32 << 20, reps: int = 9, log=print) -> list[dict]:
    import torch

    import torch_bridge
    from torch_bridge import _cpu_ops
    from xla_qops_app.bench import decoder
    from xla_qops_app.bench.peers import rotation_copies

    if not _cpu_ops.available():
        raise RuntimeError("torch_bridge._torch_ops was not built")
    torch_int4 = decoder._torch_int4_linear_class()
    rows = []
    with torch.no_grad():
        for k, n in shapes:
            # Per copy: the float nn.Linear, ours and torch's int4 module.
            copies = rotation_copies(llc_bytes, k * n // 2, 6 * k * n)
            linears = [torch.nn.Linear(k, n, bias=False) for _ in range(copies)]
            x = torch.randn(1, k).to(torch.bfloat16)
            for name, symmetric in schemes:
                ours = [torch_bridge.XlaQuantizedLinear.from_float(
                    lin, bits=4, block_size=128, symmetric=symmetric) for lin in linears]
                prepared = [m._cpu for m in ours]
                peers = {"torch_int4": [torch_int4(lin, symmetric=symmetric) for lin in linears]}

                def kernel():
                    times = torch.ops.xla_qops_cpu.kernel_seconds(
                        x, [p.w for p in prepared], [p.scale for p in prepared],
                        [p.zero_point for p in prepared], 128, 4, False, 1)
                    return float(times.mean())
                steps = {"kernel": kernel, "module": lambda: _pass_seconds(ours, x),
                         "torch_int4": lambda: _pass_seconds(peers["torch_int4"], x)}
                times = {s: [] for s in steps}
                for _ in range(reps):
                    for s, step in steps.items():
                        step()  # warm: this implementation's threads and pages
                        times[s].append(step())
                med = {s: statistics.median(v) for s, v in times.items()}
                row = dict(k=k, n=n, scheme=name, copies=copies, samples=times, **med)
                rows.append(row)
                log(f"  {k}x{n} {name}: kernel {med['kernel'] * 1e6:.1f} us, module "
                    f"{med['module'] * 1e6:.1f} us, torch int4 {med['torch_int4'] * 1e6:.1f} us")
                del ours, prepared, peers
    return rows


def table(rows) -> str:
    from xla_qops_app.bench.report import fmt_range, ratio
    lines = ["| shape (in×out) | scheme | kernel µs | XlaQuantizedLinear µs (min–max) | "
             "overhead µs (target ≤ 20) | torch int4, same weights, µs (min–max) | "
             "torch int4 / module (target ≥ 1.3) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        over = (r["module"] - r["kernel"]) * 1e6
        samples = r.get("samples", {})
        # Same weights on both sides: torch's module was built with the row's scheme.
        q = ratio(samples.get("torch_int4") or [r["torch_int4"]],
                  samples.get("module") or [r["module"]],
                  num_scheme=r["scheme"], den_scheme=r["scheme"])
        lines.append(f"| {r['k']}×{r['n']} | {r['scheme']} | {r['kernel'] * 1e6:.1f} | "
                     f"{r['module'] * 1e6:.1f}{fmt_range(samples.get('module', []), 1e6, 1)} | "
                     f"{over:.1f} ({'met' if over <= 20 else 'MISSED'}) | "
                     f"{r['torch_int4'] * 1e6:.1f}"
                     f"{fmt_range(samples.get('torch_int4', []), 1e6, 1)} | {q.text()} "
                     f"({'met' if q.value >= 1.3 else 'MISSED'}) |")
    return "\n".join(lines)
