"""`xla-qops demo`: quantize with every scheme; memory, accuracy, speed.

By default the real model (all-MiniLM-L6-v2, `demo_model.py`). `--synthetic`
quantizes a random ``[out, in]`` weight with all eight schemes (W8A16, W4A16, W8A8, W4A8, each
per-channel and blockwise), symmetric and with zero points, and prints, per
scheme: bytes against bf16, the error of the quantized matmul against the
float matmul, and the time per call of each available implementation.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import xla_qops
from xla_qops import dispatch
from xla_qops_app.timing import median_seconds

SCHEMES = [(bits, qa, block) for qa in (False, True) for bits in (8, 4) for block in (-1, 128)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--synthetic", action="store_true",
                        help="a random weight instead of the real model")
    parser.add_argument("--paths", default=None,
                        help="real model: comma-separated execution paths out of "
                             "eager,xla,openxla,jax (default: all)")
    parser.add_argument("--size", type=int, nargs=2, default=(4096, 4096), metavar=("OUT", "IN"),
                        help="synthetic: weight shape [out, in] (default 4096 4096)")
    parser.add_argument("--tokens", type=int, default=8, help="synthetic: rows of x (default 8)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--decoder-layers", type=int, default=4,
                        help="real model: layers of the decoder section (TinyLlama-1.1B's "
                             "dimensions, random weights); 0 skips it (default 4)")
    parser.add_argument("--impls", default=None,
                        help="synthetic: comma-separated impls to time (default: every available one "
                             "except pallas, whose CPU interpret mode is for tests)")


def _available_impls(requested):
    if requested:
        names = requested.split(",")
        for name in names:
            dispatch.check_impl(name)
        return names
    names = [n for n in dispatch.BACKENDS if n != "pallas" and dispatch._module(n).available()]
    return names + ["auto"]


def run_synthetic(args) -> int:
    out_features, in_features = args.size
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((out_features, in_features)) * 0.02).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((args.tokens, in_features)), jnp.bfloat16)
    y_float = np.asarray(x, np.float64) @ w.T.astype(np.float64)
    impls = _available_impls(args.impls)
    bf16_bytes = out_features * in_features * 2
    print(f"weight [{out_features}, {in_features}], x [{args.tokens}, {in_features}] bfloat16, "
          f"backend {jax.default_backend()}; error = |y - x @ w.T| relative to mean |x @ w.T|")
    header = (f"{'scheme':<8} {'layout':<6} {'zp':<4} {'bytes/bf16':>10} {'max err':>9} "
              f"{'mean err':>9} " + " ".join(f"{name + ' ms':>14}" for name in impls))
    print(header)
    print("-" * len(header))
    y_scale = np.abs(y_float).mean()
    for bits, qa, block in SCHEMES:
        for symmetric in (True, False):
            qw = xla_qops.quantize_weight(w, bits=bits, block_size=block, symmetric=symmetric)
            fns = {name: jax.jit(lambda x, qw, name=name: xla_qops.quantized_matmul(
                x, qw, quantize_activation=qa, impl=name)) for name in impls}
            y = np.asarray(fns[impls[0]](x, qw), np.float64)
            err = np.abs(y - y_float) / y_scale
            times = [median_seconds(fns[name], x, qw, runs=args.runs) * 1e3 for name in impls]
            scheme = f"w{bits}a{8 if qa else 16}"
            layout = "pc" if block == -1 else f"g{block}"
            print(f"{scheme:<8} {layout:<6} {'no' if symmetric else 'yes':<4} "
                  f"{qw.nbytes / bf16_bytes:>10.3f} {err.max():>9.4f} {err.mean():>9.4f} "
                  + " ".join(f"{t:>14.2f}" for t in times), flush=True)
    return 0


def run(args) -> int:
    if args.synthetic:
        return run_synthetic(args)
    from xla_qops_app.commands import demo_model
    if args.paths:
        unknown = set(args.paths.split(",")) - set(demo_model.PATHS)
        if unknown:
            raise SystemExit(f"xla-qops demo: --paths: unknown {', '.join(sorted(unknown))}; "
                             f"expected some of {', '.join(demo_model.PATHS)}")
    return demo_model.run(args)
