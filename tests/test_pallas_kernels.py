"""Pallas kernels in interpret mode against the float64 numpy reference.

The TPU (Mosaic) and GPU (Triton) kernel bodies both run on the CPU through
Pallas' interpreter, with the block sizes the production rule picks (or
explicit ones where a test needs a multi-step or padded grid). Every scheme
row of API.md, symmetric and asymmetric, packed and unpacked int4, all three
activation dtypes; decode and prefill row counts; Llama-like widths with the
full K of 4096, 11008 and 14336 in decode; shapes that are not tile multiples.
Full-size sweeps are @pytest.mark.slow.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from cases import X_DTYPES, Scheme, all_schemes, make_weight, make_x
import numpy_reference as ref
from pallas_kernels import block_sizes, reference
from pallas_kernels.gpu import quantized_matmul as gpu_kernel
from pallas_kernels.tpu import quantized_matmul as tpu_kernel

SCHEMES = all_schemes(block_size=128)
W8A16_PC = Scheme(8, -1, False, False, False)
W4A16_BW = Scheme(4, 128, False, True, False)
W8A8_PC = Scheme(8, -1, False, False, True)
W4A8_BW = Scheme(4, 128, False, True, True)
CORE = [W8A16_PC, W4A16_BW, W8A8_PC, W4A8_BW]


def tpu(x, qw, qa, **kw):
    kw.setdefault("interpret", True)
    return tpu_kernel.quantized_matmul(x, qw.w, qw.scale, qw.zero_point,
                                       block_size=qw.block_size, quantize_activation=qa, **kw)


def gpu(x, qw, qa, **kw):
    return gpu_kernel.quantized_matmul(x, qw.w, qw.scale, qw.zero_point,
                                       block_size=qw.block_size, quantize_activation=qa,
                                       interpret=True, **kw)


def pure_jax(x, qw, qa):
    return reference.quantized_matmul_reference_jit(x, qw.w, qw.scale, qw.zero_point,
                                                    block_size=qw.block_size,
                                                    quantize_activation=qa)


KERNELS = {"tpu": tpu, "gpu": gpu}


def check(y, x, qw, qa):
    assert y.dtype == x.dtype and y.shape == (x.shape[0], qw.out_features)
    ref.assert_close(y, x, qw.w, qw.scale, qw.zero_point, qw.block_size, qa)


def run_case(kernel, scheme, m, k, n, x_dtype="bfloat16", seed=0, **kw):
    rng = np.random.default_rng(seed)
    qw = make_weight(rng, n=n, k=k, scheme=scheme)
    x = make_x(rng, (m, k), x_dtype)
    check(KERNELS[kernel](x, qw, scheme.quantize_activation, **kw), x, qw,
          scheme.quantize_activation)


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.id)
def test_reference_matches_numpy(scheme, x_dtype):
    """The pure-JAX statement of the kernels' algebra is itself right."""
    rng = np.random.default_rng(3)
    qw = make_weight(rng, n=72, k=256, scheme=scheme)
    x = make_x(rng, (5, 256), x_dtype)
    check(pure_jax(x, qw, scheme.quantize_activation), x, qw, scheme.quantize_activation)


# Each scheme once per kernel, bfloat16 and float32 alternating over the list
# (the full scheme x dtype product is in the slow sweep).
SCHEME_DTYPES = [(s, ("bfloat16", "float32")[i % 2]) for i, s in enumerate(SCHEMES)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scheme,x_dtype", SCHEME_DTYPES,
                         ids=[f"{s.id}-{d}" for s, d in SCHEME_DTYPES])
def test_every_scheme(kernel, scheme, x_dtype):
    """M=5 and N=320: neither is a tile multiple, so M is padded and N is
    tiled by 128 (not 256) or, on the GPU, by 64."""
    run_case(kernel, scheme, m=5, k=512, n=320, x_dtype=x_dtype)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.id)
def test_every_scheme_every_dtype(kernel, scheme, x_dtype):
    run_case(kernel, scheme, m=5, k=512, n=320, x_dtype=x_dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scheme", CORE, ids=lambda s: s.id)
def test_float16_activations(kernel, scheme):
    """float16 is widened to float32 for the TPU kernel and used as is on the GPU."""
    run_case(kernel, scheme, m=3, k=256, n=128, x_dtype="float16")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k,m", [(4096, 8), (11008, 1), (14336, 1)])
@pytest.mark.parametrize("scheme", [W8A16_PC, W4A16_BW], ids=lambda s: s.id)
def test_decode_full_size_k(kernel, scheme, k, m):
    """Decode with the full K of Llama layers (N scaled down to keep interpret time)."""
    run_case(kernel, scheme, m=m, k=k, n=256, seed=k + m)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scheme", CORE, ids=lambda s: s.id)
def test_prefill(kernel, scheme):
    """M=256 with K=4096: the TPU rule splits K into two grid steps (accumulator
    carried across steps in VMEM scratch)."""
    run_case(kernel, scheme, m=256, k=4096, n=256, seed=11)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scheme,m,k,n", [
    (Scheme(8, -1, False, False, False), 7, 1000, 200),
    (Scheme(4, -1, True, True, False), 7, 1000, 200),
    (Scheme(8, -1, False, False, True), 33, 1000, 96),
    (Scheme(4, 64, False, True, True), 33, 640, 200),
    (Scheme(8, 64, True, False, False), 7, 640, 96),
], ids=lambda v: v.id if isinstance(v, Scheme) else str(v))
def test_shapes_not_tile_multiples(kernel, scheme, m, k, n):
    """K=1000 (per-channel) is no multiple of 128 (TPU: one full-K tile; GPU:
    padded to the K step); N=200 and 96 are no multiples of 128 either."""
    run_case(kernel, scheme, m=m, k=k, n=n, seed=m)


@pytest.mark.parametrize("scheme", CORE + [Scheme(4, -1, False, True, True)], ids=lambda s: s.id)
def test_tpu_multi_step_grid_with_padding(scheme):
    """Explicit tiles that force padding of M, N and K and several steps along
    every grid axis (accumulator init / finish, running activation sum)."""
    m, n = 20, 300
    p = 2 if scheme.packed else 1
    tm = 32 if scheme.quantize_activation else 16  # int8 rows pack 32 per vreg
    if scheme.block_size == -1:
        k, tk, k_chunk = 700, 256 * p, 128 * p
        k_pad = block_sizes.round_up(k, tk)
    else:
        k, tk, k_chunk = 768, 256, 128
        k_pad = k
    blocks = block_sizes.TpuBlocks(tm=tm, tn=128, tk=tk, k_chunk=k_chunk, m_pad=2 * tm,
                                   n_pad=384, k_pad=k_pad, vmem_limit_bytes=32 << 20)
    assert min(blocks.grid) > 1
    assert scheme.block_size != -1 or blocks.k_pad > k
    run_case("tpu", scheme, m=m, k=k, n=n, seed=5, blocks=blocks)


@pytest.mark.parametrize("scheme", [W8A16_PC, W4A16_BW, W4A8_BW], ids=lambda s: s.id)
def test_tpu_interpreter_with_bounds_checks(scheme):
    """The TPU-specific interpreter (DMA and out-of-bounds checks) agrees too."""
    run_case("tpu", scheme, m=9, k=512, n=256, seed=9, interpret=pltpu.InterpretParams())


def test_gpu_padded_k_and_n():
    """GPU tiles that pad K (per-channel) and N."""
    blocks = block_sizes.GpuBlocks(bm=16, bn=64, bk=128, m_pad=16, n_pad=128, k_pad=384,
                                   num_warps=4, num_stages=2)
    run_case("gpu", Scheme(8, -1, False, False, False), m=3, k=300, n=100, blocks=blocks)


# ---- exhaustive sweeps (make test-slow) --------------------------------------

# API.md's eight scheme rows (asymmetric, int4 packed), ~10 s per full-size case.
EIGHT_ROWS = [s for s in SCHEMES if not s.symmetric and (s.packed or s.bits == 8)]


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m", [1, 256])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 11008)])
@pytest.mark.parametrize("scheme", EIGHT_ROWS, ids=lambda s: s.id)
def test_llama_layers_full_size(kernel, scheme, k, n, m):
    run_case(kernel, scheme, m=m, k=k, n=n, seed=m)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("block_size", [32, 64, 256])
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.block_size != -1], ids=lambda s: s.id)
def test_other_block_sizes(kernel, scheme, block_size):
    scheme = dataclasses.replace(scheme, block_size=block_size)
    run_case(kernel, scheme, m=12, k=1024, n=384, seed=block_size)
