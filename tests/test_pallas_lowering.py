"""The kernels lower for their platforms, from this CPU-only machine.

* TPU: `jax.export(..., platforms=["tpu"])` of every TPU kernel variant at
  Llama-3-8B layer shapes (`shapes.LLAMA3_8B`) for M = 1, 16, 256 contains a
  ``tpu_custom_call``, and `pallas_kernels.tpu.mosaic_check` accepts each
  kernel: its structural check on every JAX version, and Mosaic's own layout
  passes for TPU v5 and v6 where jaxlib still has them (the pinned 0.7.1).
  Deliberately bad kernels are rejected by both, so neither is vacuous, and
  both agree on kernels Mosaic accepts although they look unaligned.
* GPU: `platforms=["cuda"]` of every Triton kernel variant contains the
  ``__gpu$xla.gpu.triton`` custom call (newer JAX lowers Triton only for a
  GPU it knows: `jax_compat.lowering_target` names an abstract H100).
* Real model shapes (`shapes.REAL_MODELS`): both kernels take the weight as
  it is, never a padded copy, and the TPU kernels of the shapes no tile
  divides pass the Mosaic check.
* Dispatch: every impl resolves per platform at lowering, so one jitted
  function exports to the Mosaic kernel for TPU and the Triton one for CUDA,
  while the CPU keeps its own path; ``impl="pallas"`` does the same (interpret
  mode on the CPU); an impl that cannot run on the platform being lowered for
  fails that lowering with a clear error; unsupported specs fall back to XLA
  under "auto".

Nothing here executes a kernel; lowering is cheap at full size.
"""

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax import export, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import xla_qops
from pallas_kernels import block_sizes, jax_compat, shapes
from pallas_kernels.gpu import quantized_matmul as gpu_kernel
from pallas_kernels.tpu import mosaic_check
from pallas_kernels.tpu import quantized_matmul as tpu_kernel

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"
LLAMA3_8B = shapes.LLAMA3_8B
MS = [1, 16, 256]
PASSES = jax_compat.mosaic_layout_passes_available()
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
    with jax_compat.lowering_target("cuda"):
        return export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)]
                             )(*args).mlir_module()


def failures(results):
    return [(r.generation, r.failed_pass, (r.error or "")[:2000]) for r in results if not r.ok]


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_tpu_kernels_lower_and_pass_mosaic_layout(row):
    bits, block_size, qa = row
    kernel = functools.partial(tpu_kernel.quantized_matmul, block_size=block_size,
                               quantize_activation=qa)
    for (k, n), m in itertools.product(LLAMA3_8B, MS):
        args = avals(m, k, n, bits, block_size)
        assert "tpu_custom_call" in export_tpu(kernel, *args), (k, n, m)
        results = mosaic_check.check(kernel, *args, generations=(5, 6))
        assert len(results) == (3 if PASSES else 1)  # structural (+ v5, v6 passes)
        assert not failures(results), (k, n, m, failures(results))


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("row", [(8, -1, False), (4, 128, False), (4, -1, True)], ids=row_id)
def test_tpu_kernels_other_dtypes_and_symmetric(row, x_dtype):
    bits, block_size, qa = row
    kernel = functools.partial(tpu_kernel.quantized_matmul, block_size=block_size,
                               quantize_activation=qa)
    args = avals(16, 4096, 4096, bits, block_size, x_dtype=x_dtype, zero_point=False)
    assert "tpu_custom_call" in export_tpu(kernel, *args)
    assert not failures(mosaic_check.check(kernel, *args, generations=(5, 6, 7)))


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
    assert not failures(mosaic_check.check(kernel, *avals(m, k, n, bits, block_size)))


def test_tpu_kernel_with_padding_passes_mosaic_layout():
    """Explicit tiles that pad M, N and K and walk K in several chunks."""
    blocks = block_sizes.TpuBlocks(tm=16, tn=128, tk=512, k_chunk=256, m_pad=32, n_pad=384,
                                   k_pad=1024, vmem_limit_bytes=32 << 20)
    kernel = functools.partial(tpu_kernel.quantized_matmul, block_size=-1, blocks=blocks)
    assert not failures(mosaic_check.check(kernel, *avals(20, 700, 300, 4, -1)))


def _probe(load, out_shape):
    """A kernel that accumulates `load(x_ref, c)` over a two-step loop (so
    that offsets built from the loop index are dynamic)."""
    def kernel(x_ref, o_ref):
        def body(c, carry):
            o_ref[...] += load(x_ref, c)
            return carry
        o_ref[...] = jnp.zeros_like(o_ref)
        lax.fori_loop(0, 2, body, 0)

    def fn(x):
        return pl.pallas_call(kernel, out_shape=S(out_shape, jnp.float32),
                              compiler_params=pltpu.CompilerParams())(x)
    return fn


def _matmul_probe(dtype):
    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    def fn(x, w):
        return pl.pallas_call(kernel, out_shape=S((16, 128), jnp.float32),
                              compiler_params=pltpu.CompilerParams())(x, w)
    return fn, (S((16, 128), dtype), S((128, 128), dtype))


X16x512 = (S((16, 512), jnp.float32),)
# (kernel, args, message of the structural check): Mosaic's passes reject
# each of these too (checked where jaxlib has them).
BAD_KERNELS = {
    "dynamic lane offset 128c+3": (
        _probe(lambda r, c: r[0:8, pl.ds(c * 128 + 3, 128)], (8, 128)), X16x512,
        "dynamic lane offset is not provably a multiple of 128"),
    "dynamic sublane offset 4c": (
        _probe(lambda r, c: r[pl.ds(c * 4, 4), pl.ds(0, 128)], (4, 128)), X16x512,
        "dynamic sublane offset is not provably a multiple of 8"),
    "float16 matmul": (*_matmul_probe(jnp.float16), "tpu.matmul of f16 x f16 into f32"),
}
# Mosaic accepts these though they look unaligned: static offsets and
# extents of any size, and aligned dynamic offsets with a partial extent.
GOOD_KERNELS = {
    "static lane offset 64": (_probe(lambda r, c: r[0:8, pl.ds(64, 128)], (8, 128)), X16x512),
    "static lane extent 64": (_probe(lambda r, c: r[0:8, pl.ds(128, 64)], (8, 64)), X16x512),
    "static sublane offset 3": (_probe(lambda r, c: r[pl.ds(3, 4), :], (4, 512)), X16x512),
    "aligned dynamic lane offset, extent 192": (
        _probe(lambda r, c: r[0:8, pl.ds(pl.multiple_of(c * 128, 128), 192)], (8, 192)),
        X16x512),
    "aligned dynamic sublane offset": (
        _probe(lambda r, c: r[pl.ds(pl.multiple_of(c * 8, 8), 8), :], (8, 512)), X16x512),
    "bfloat16 matmul": _matmul_probe(jnp.bfloat16),
}


@pytest.mark.parametrize("name", BAD_KERNELS)
def test_mosaic_check_rejects_bad_kernels(name):
    """Negative controls: the structural check names the rule; where jaxlib
    has Mosaic's passes, they reject the same kernel."""
    fn, args, message = BAD_KERNELS[name]
    results = mosaic_check.check(fn, *args, generations=(6,))
    structural = results[0]
    assert structural.generation is None and not structural.ok
    assert structural.failed_pass == mosaic_check.STRUCTURAL and message in structural.error
    assert all(not r.ok for r in results[1:]) and len(results) == (2 if PASSES else 1)


@pytest.mark.parametrize("name", GOOD_KERNELS)
def test_mosaic_check_accepts_what_mosaic_accepts(name):
    """The structural rules are no stricter than Mosaic's passes (the oracle
    where jaxlib has them): these kernels pass both."""
    fn, args = GOOD_KERNELS[name]
    results = mosaic_check.check(fn, *args, generations=(5, 6))
    assert len(results) == (3 if PASSES else 1) and not failures(results)


def test_mosaic_layout_passes_match_the_jax_version():
    """Mosaic's layout passes are in jaxlib up to 0.8.1 and gone after, as
    jax_compat says; running them without jaxlib support is a clear error."""
    assert PASSES == (jax_compat.JAX_VERSION < (0, 8, 2))
    fn, args = GOOD_KERNELS["bfloat16 matmul"]
    module = mosaic_check.mosaic_modules(fn, *args)[0]
    if PASSES:
        assert mosaic_check.run_layout_passes(module, 6).ok
    else:
        with pytest.raises(RuntimeError, match="does not register Mosaic's layout passes"):
            mosaic_check.run_layout_passes(module, 6)


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


def _op(block_size, int4, qa, impl="auto"):
    return lambda x, w, s, z: xla_qops.quantized_matmul(x, w, s, z, block_size, int4, qa,
                                                        impl=impl)


_auto = _op


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


# ---- every impl resolves per platform at lowering

@pytest.mark.parametrize("row", [(8, -1, False), (4, 128, False), (4, -1, True)], ids=row_id)
def test_impl_pallas_picks_the_kernel_per_platform_at_lowering(row):
    """impl="pallas" from this CPU machine: Mosaic in the TPU export, Triton
    in the CUDA export, the interpreted kernel when lowered for the CPU."""
    bits, block_size, qa = row
    fn = _op(block_size, bits == 4, qa, impl="pallas")
    args = avals(16, 4096, 4096, bits, block_size)
    tpu_text = export_tpu(fn, *args)
    assert "tpu_custom_call" in tpu_text and TRITON not in tpu_text
    cuda_text = export_cuda(fn, *args)
    assert TRITON in cuda_text and "tpu_custom_call" not in cuda_text
    cpu_text = jax.jit(fn).lower(*args).as_text(debug_info=True)
    assert "tpu_custom_call" not in cpu_text and TRITON not in cpu_text
    assert "pallas_kernels/tpu/quantized_matmul.py" in cpu_text  # the interpreted body


def test_explicit_impl_refuses_at_lowering_where_it_cannot_run():
    """custom_call exports for the CPU only; pallas with B=48 packed (Mosaic
    takes it, Triton does not) exports for TPU and CPU, not for CUDA or ROCm.
    The error names the impl, the problem and the platform."""
    args = avals(4, 480, 256, 4, 48)
    fn = _op(48, True, False, impl="custom_call")
    assert "xla_qops_quantized_matmul" in jax.jit(fn).lower(*args).as_text()  # for the CPU
    with pytest.raises(ValueError, match=r"impl: 'custom_call' cannot run w4a16 block_size=48 "
                                         r"\(bfloat16 x\) on tpu \(it runs on the host CPU only\)"):
        export_tpu(fn, *args)
    fn = _op(48, True, False, impl="pallas")
    assert "tpu_custom_call" in export_tpu(fn, *args)
    for platform in ("cuda", "rocm"):
        with pytest.raises(ValueError, match=rf"impl: 'pallas' cannot run w4a16 block_size=48 "
                                             rf"\(bfloat16 x\) on {platform}; lowering for "
                                             rf"{platform} needs impl='auto'"):
            export.export(jax.jit(fn), platforms=[platform])(*args)


# ---- real model shapes: the weight goes into the kernels as it is

def _weight_feeds_pallas_call_directly(kernel, args):
    """Whether the weight argument is an operand of the pallas_call itself
    (not of a pad or any other copy), in the kernel's jaxpr."""
    jaxpr = jax.make_jaxpr(kernel)(*args).jaxpr
    w_var = jaxpr.invars[1]

    def calls(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield jaxpr, eqn
            for sub in jax_compat.jaxprs_in_params(eqn.params):
                yield from calls(sub)

    found = list(calls(jaxpr))
    assert len(found) == 1, found
    inner, eqn = found[0]
    if inner is jaxpr:
        return w_var in eqn.invars
    # Inside a nested jit: follow the weight into it.
    outer = next(e for e in jaxpr.eqns if inner in list(jax_compat.jaxprs_in_params(e.params)))
    position = outer.invars.index(w_var)
    return inner.invars[position] in eqn.invars


REAL = shapes.real_model_shapes()


def _block_for(k):
    return next(b for b in (128, 64, 32) if k % b == 0)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("m", [1, 256])
def test_real_model_weights_go_into_the_kernels_uncopied(kernel, m):
    """Every shape of shapes.REAL_MODELS, per-channel int8 and packed int4 and
    blockwise packed int4: the weight the caller passed is the kernel's operand."""
    module = tpu_kernel if kernel == "tpu" else gpu_kernel
    copied = []
    for shape in REAL:
        k, n = shape
        for bits, block_size in ((8, -1), (4, -1), (4, _block_for(k))):
            fn = functools.partial(module.quantized_matmul, block_size=block_size)
            if not _weight_feeds_pallas_call_directly(fn, avals(m, k, n, bits, block_size)):
                copied.append((shape.name, shape.label, bits, block_size))
    assert not copied, copied


def test_weight_copy_is_detected():
    """Control for the test above: tiles that make the GPU kernel pad K."""
    blocks = block_sizes.GpuBlocks(bm=16, bn=64, bk=128, m_pad=16, n_pad=256, k_pad=1024,
                                   num_warps=4, num_stages=2)
    fn = functools.partial(gpu_kernel.quantized_matmul, block_size=-1, blocks=blocks)
    assert not _weight_feeds_pallas_call_directly(fn, avals(1, 1000, 256, 8, -1))
    fn = functools.partial(gpu_kernel.quantized_matmul, block_size=-1)
    assert _weight_feeds_pallas_call_directly(fn, avals(1, 1000, 256, 8, -1))


def test_real_model_tpu_kernels_no_tile_divides_pass_the_mosaic_check():
    """The real-model shapes where no 128-multiple tile divides N or K (Falcon,
    packed Qwen2-72B ...): the weight's last block is partial, which Mosaic
    must accept."""
    odd = [s for s in REAL if s.out_features % 128 or s.in_features % 256]
    assert len(odd) >= 3, odd
    for shape in odd:
        k, n = shape
        for bits, m in ((8, 1), (4, 1), (4, 256)):
            kernel = functools.partial(tpu_kernel.quantized_matmul, block_size=-1)
            assert not failures(mosaic_check.check(kernel, *avals(m, k, n, bits, -1))), (
                shape.name, shape.label, bits, m)


# ---- GPU lowering facts behind docs/pallas_kernels.md's Triton / Mosaic GPU notes

def test_triton_lowering_warns_about_its_deprecation_on_newer_jax():
    """JAX 0.12 deprecates Pallas' Triton backend (a DeprecationWarning at
    each lowering); 0.7.1 does not."""
    fn = functools.partial(gpu_kernel.quantized_matmul, block_size=-1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert TRITON in export_cuda(fn, *avals(16, 4096, 4096, 8, -1))
    deprecations = [w for w in seen if issubclass(w.category, DeprecationWarning)
                    and "Pallas Triton backend is deprecated" in str(w.message)]
    assert bool(deprecations) == (jax_compat.JAX_VERSION >= (0, 12)), [str(w.message) for w in seen]


def test_mosaic_gpu_kernel_exports_for_cuda_without_a_gpu():
    """A Mosaic GPU kernel (plgpu.kernel, the backend JAX keeps) exports for
    cuda on this CPU machine as a mosaic_gpu custom call, on both JAX
    versions; the module does not depend on the target GPU (H100 or A100:
    the architecture is only checked when compiled on the device)."""
    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def fn(x):
        return jax_compat.mosaic_gpu_kernel(body, S((128, 128), jnp.float32))(x)

    texts = []
    for kind in ("NVIDIA H100", "NVIDIA A100"):
        with jax_compat.lowering_target("cuda", kind):
            texts.append(export.export(jax.jit(fn), platforms=["cuda"])(
                S((128, 128), jnp.float32)).mlir_module())
    assert "mosaic_gpu" in texts[0] and TRITON not in texts[0]
    assert texts[0] == texts[1]
