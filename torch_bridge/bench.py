"""Time per call: torch_xla's own quantized_matmul kernels vs torch_bridge's.

    PJRT_DEVICE=CPU python -m torch_bridge.bench [--k 4096] [--n 4096] [--m 1 16]

On the XLA device both run as torch_xla graphs (one sync per call, so each
figure includes graph execution and, for torch_xla's int4 path, its
weight-to-host copy). Rows are the schemes torch_xla can run on the XLA CPU
device: W8A16 per-channel and W4A16 blockwise (its per-channel int4 does not
compile there). CPU tensors: the op (DLPack into xla_qops; impl="auto", i.e.
the C++ kernels when built, and impl="xla") against torch's bfloat16
F.linear on the dequantized weight. Reported: the median of `--repeats`
timed calls after `--warmup` calls, and ours/theirs ratios from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def _median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _weights(k, n, block, rng):
    """int8 weights (int4 values when block > 0) in torch_xla's layouts, plus packed."""
    from torch_bridge import _jax_interop as interop
    from xla_qops import packing
    if block == -1:
        q = rng.integers(-128, 128, (n, k)).astype(np.int8)
        return torch.from_numpy(q), None, torch.from_numpy(rng.uniform(1e-3, 2e-3, n).astype(np.float32))
    q = rng.integers(-8, 8, (k // block, block, n)).astype(np.int8)
    packed = interop.to_torch(packing.pack_int4(q, 1))
    scale = torch.from_numpy(rng.uniform(1e-3, 2e-3, (k // block, n)).astype(np.float32))
    return torch.from_numpy(q), packed, scale


def run(k: int, n: int, ms, block: int, warmup: int, repeats: int):
    import torch_xla
    import torch_xla.core.xla_model as xm
    from torch_xla.experimental import xla_quantized_matmul as txq

    import torch_bridge  # noqa: F401

    device = torch_xla.device()
    rng = np.random.default_rng(0)
    rows = []
    for scheme, blk in (("w8a16 per-channel", -1), (f"w4a16 block={block}", block)):
        q, packed, scale = _weights(k, n, blk, rng)
        scale = scale.to(torch.bfloat16)  # as in the seed; keeps torch_xla's output bf16
        int4 = blk != -1
        w_xla, s_xla = q.to(device), scale.to(device)
        ours_w = (packed if int4 else q).to(device)
        for m in ms:
            x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(torch.bfloat16)
            x_xla = x.to(device)
            torch_xla.sync()

            # The result must stay alive through sync(), else torch_xla drops
            # the graph unexecuted.
            def theirs():
                y = txq.quantized_matmul_xla(x_xla, w_xla, s_xla, block_size=blk,
                                             int4_weight=int4)
                torch_xla.sync()
                xm.wait_device_ops()
                return y

            def ours():
                y = torch.ops.xla.quantized_matmul(x_xla, ours_w, s_xla, block_size=blk,
                                                   int4_weight=int4)
                torch_xla.sync()
                xm.wait_device_ops()
                return y

            def ours_cpu(impl="auto"):
                return torch.ops.xla.quantized_matmul(x, packed if int4 else q, scale,
                                                      block_size=blk, int4_weight=int4, impl=impl)

            if int4:  # [k/B, B, n] -> [n, k]
                w_float = (q.float() * scale.float()[:, None, :]).reshape(k, n).T.contiguous()
            else:
                w_float = q.float() * scale.float()[:, None]
            w_float = w_float.to(torch.bfloat16)

            def float_cpu():
                return torch.nn.functional.linear(x, w_float)

            t_theirs = _median_seconds(theirs, warmup, repeats)
            t_ours = _median_seconds(ours, warmup, repeats)
            t_cpu = _median_seconds(ours_cpu, warmup, repeats)
            t_cpu_xla = _median_seconds(lambda: ours_cpu("xla"), warmup, repeats)
            t_float = _median_seconds(float_cpu, warmup, repeats)
            rows.append((scheme, m, t_theirs, t_ours, t_cpu, t_cpu_xla, t_float))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = run(args.k, args.n, args.m, args.block, args.warmup, args.repeats)
    print(f"K={args.k} N={args.n}, bfloat16 activations, median of {args.repeats} calls")
    print("| scheme | M | torch_xla op, XLA device | torch_bridge, XLA device | ratio | "
          "torch_bridge, CPU tensors (auto) | same, impl=\"xla\" | torch F.linear bf16, CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme, m, theirs, ours, cpu, cpu_xla, flt in rows:
        print(f"| {scheme} | {m} | {theirs * 1e3:.2f} ms | {ours * 1e3:.2f} ms | "
              f"{theirs / ours:.1f}x | {cpu * 1e3:.2f} ms | {cpu_xla * 1e3:.2f} ms | "
              f"{flt * 1e3:.2f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
