"""The kernels lower for their platforms, from this CPU-only machine.

* TPU: `jax.export(..., platforms=["tpu"])` of every TPU kernel variant at
  Llama-3-8B layer shapes (4096x4096, 4096x14336, 14336x4096) for M = 1, 16,
  256 contains a ``tpu_custom_call``; and Mosaic's own layout passes (the ones
  libtpu runs before code generation) accept each kernel for TPU v5 and v6
  (`pallas_kernels.tpu.mosaic_check`). A deliberately misaligned kernel is
  rejected by the same check, so it is not vacuous.
* GPU: `platforms=["cuda"]` of every Triton kernel variant contains the
  ``__gpu$xla.gpu.triton`` custom call.
* Dispatch: ``impl="auto"`` resolves per platform at lowering, so one jitted
  function exports to the Mosaic kernel for TPU and the Triton one for CUDA,
  while the CPU keeps its own path; unsupported specs fall back to XLA under
  "auto" and raise under "pallas".

Nothing here executes a kernel; lowering is cheap at full size.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import pytest
from jax import export, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import xla_qops
from pallas_kernels import block_sizes
from pallas_kernels.gpu import quantized_matmul as gpu_kernel
from pallas_kernels.tpu import mosaic_check
from pallas_kernels.tpu import quantized_matmul as tpu_kernel

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"
LLAMA3_8B = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
MS = [1, 16, 256]
# (bits, block_size, quantize_activation): the eight rows of API.md
# (int4 packed; int8 and unpacked int4 share a kernel).
ROWS = [(bits, b, qa) for bits in (8, 4) for b in (-1, 128) for qa in (False, True)]


def avals(m, k, n, bits, block_size, x_dtype=jnp.bfloat16, zero_point=True):
    p = 2 if bits == 4 else 1
    w_dtype = jnp.uint8 if bits == 4 else jnp.int8
    if block_size == -1:
        w, s = S((n, k // p), w_dtype), S((n,), jnp.float32)
    else:
        w, s = S((k // block_size, block_size // p, n), w_dtype), S((k // block_size, n), jnp.float32)
    return S((m, k), x_dtype), w, s, (s if zero_point else None)


def row_id(row):
    bits, b, qa = row
    return f"w{bits}a{8 if qa else 16}-{'pc' if b == -1 else f'g{b}'}"


def export_tpu(fn, *args):
    return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def export_cuda(fn, *args):
    return export.export(jax.jit(fn), platforms=["cuda"],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)]
                         )(*args).mlir_module()


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_tpu_kernels_lower_and_pass_mosaic_layout(row):
    bits, block_size, qa = row
    kernel = functools.partial(tpu_kernel.quantized_matmul, block_size=block_size,
                               quantize_activation=qa)
    for (k, n), m in itertools.product(LLAMA3_8B, MS):
        args = avals(m, k, n, bits, block_size)
        assert "tpu_custom_call" in export_tpu(kernel, *args), (k, n, m)
        failed = [r for r in mosaic_check.check(kernel, *args, generations=(5, 6)) if not r.ok]
        assert not failed, (k, n, m, failed[0].generation, failed[0].failed_pass,
                            failed[0].error[:2000])


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("row", [(8, -1, False), (4, 128, False), (4, -1, True)], ids=row_id)
def test_tpu_kernels_other_dtypes_and_symmetric(row, x_dtype):
    bits, block_size, qa = row
    kernel = functools.partial(tpu_kernel.quantized_matmul, block_size=block_size,
                               quantize_activation=qa)
    args = avals(16, 4096, 4096, bits, block_size, x_dtype=x_dtype, zero_point=False)
    assert "tpu_custom_call" in export_tpu(kernel, *args)
    assert all(r.ok for r in mosaic_check.check(kernel, *args, generations=(5, 6, 7)))


@pytest.mark.parametrize("m,k,n,bits,block_size,qa", [
    (7, 1000, 200, 8, -1, False),   # K and N no multiples of 128: full-extent tiles
    (7, 1000, 200, 4, -1, False),
    (33, 1000, 96, 8, -1, True),
    (33, 640, 200, 4, 64, True),    # B/2 = 32 rows
    (3, 480, 256, 4, 48, False),    # B/2 = 24 rows
    (16, 4096, 4096, 4, 32, False),  # B/2 = 16 rows
    (16, 4096, 4096, 8, 32, True),
])
def test_tpu_kernels_odd_shapes_pass_mosaic_layout(m, k, n, bits, block_size, qa):
    kernel = functools.partial(tpu_kernel.quantized_matmul, block_size=block_size,
                               quantize_activation=qa)
    failed = [r for r in mosaic_check.check(kernel, *avals(m, k, n, bits, block_size))
              if not r.ok]
    assert not failed, (failed[0].generation, failed[0].failed_pass, failed[0].error[:2000])


def test_tpu_kernel_with_padding_passes_mosaic_layout():
    """Explicit tiles that pad M, N and K and walk K in several chunks."""
    blocks = block_sizes.TpuBlocks(tm=16, tn=128, tk=512, k_chunk=256, m_pad=32, n_pad=384,
                                   k_pad=1024, vmem_limit_bytes=32 << 20)
    kernel = functools.partial(tpu_kernel.quantized_matmul, block_size=-1, blocks=blocks)
    assert all(r.ok for r in mosaic_check.check(kernel, *avals(20, 700, 300, 4, -1)))


def test_mosaic_layout_check_rejects_a_misaligned_kernel():
    """Negative control: a dynamic lane offset that is not a multiple of 128."""
    def bad_kernel(x_ref, o_ref):
        def body(c, carry):
            o_ref[...] += x_ref[:, pl.ds(c * 128 + 3, 128)]
            return carry
        o_ref[...] = jnp.zeros_like(o_ref)
        lax.fori_loop(0, 2, body, 0)

    def fn(x):
        return pl.pallas_call(bad_kernel, out_shape=S((8, 128), jnp.float32),
                              compiler_params=pltpu.CompilerParams())(x)

    results = mosaic_check.check(fn, S((8, 512), jnp.float32), generations=(6,))
    assert not results[0].ok
    assert "multiple of 128" in results[0].error


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_gpu_kernels_lower_to_triton(row):
    bits, block_size, qa = row
    kernel = functools.partial(gpu_kernel.quantized_matmul, block_size=block_size,
                               quantize_activation=qa)
    for (k, n), m in itertools.product(LLAMA3_8B, MS):
        text = export_cuda(kernel, *avals(m, k, n, bits, block_size))
        assert TRITON in text and "tpu_custom_call" not in text, (k, n, m)


@pytest.mark.parametrize("m,k,n,bits,block_size,qa", [
    (7, 1000, 200, 8, -1, False), (33, 1000, 96, 4, -1, True), (33, 640, 200, 4, 64, True),
    (3, 512, 256, 4, 32, False)])
def test_gpu_kernels_odd_shapes_lower_to_triton(m, k, n, bits, block_size, qa):
    kernel = functools.partial(gpu_kernel.quantized_matmul, block_size=block_size,
                               quantize_activation=qa)
    assert TRITON in export_cuda(kernel, *avals(m, k, n, bits, block_size))


def _auto(block_size, int4, qa):
    return lambda x, w, s, z: xla_qops.quantized_matmul(x, w, s, z, block_size, int4, qa,
                                                        impl="auto")


@pytest.mark.parametrize("row", [(8, -1, False), (4, 128, False), (8, 128, True),
                                 (4, -1, True)], ids=row_id)
def test_auto_picks_the_kernel_per_platform_at_lowering(row):
    bits, block_size, qa = row
    fn = _auto(block_size, bits == 4, qa)
    for m, (k, n) in [(1, (4096, 4096)), (256, (14336, 4096))]:
        args = avals(m, k, n, bits, block_size)
        tpu_text = export_tpu(fn, *args)
        assert "tpu_custom_call" in tpu_text and TRITON not in tpu_text
        cuda_text = export_cuda(fn, *args)
        assert TRITON in cuda_text and "tpu_custom_call" not in cuda_text
        cpu_text = jax.jit(fn).lower(*args).as_text()
        assert "tpu_custom_call" not in cpu_text and TRITON not in cpu_text


def test_auto_falls_back_to_xla_for_specs_a_kernel_declines():
    """Packed int4 with B=48: B/2=24 is not a power of 2 (Triton declines) but
    a multiple of 8 (Mosaic accepts). B=12 unpacked: both decline."""
    fn = _auto(48, True, False)
    args = avals(4, 480, 256, 4, 48)
    assert "tpu_custom_call" in export_tpu(fn, *args)
    cuda_text = export_cuda(fn, *args)
    assert TRITON not in cuda_text and "dot_general" in cuda_text

    fn = _auto(12, True, False)
    args = avals(4, 480, 256, 8, 12)
    assert "tpu_custom_call" not in export_tpu(fn, *args)


def test_impl_pallas_rejects_an_unsupported_spec_clearly():
    x = jnp.zeros((2, 48), jnp.float32)
    w = jnp.zeros((4, 12, 8), jnp.int8)
    s = jnp.ones((4, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"impl: 'pallas' does not support w8a16 block_size=12"):
        xla_qops.quantized_matmul(x, w, s, block_size=12, impl="pallas")
