"""The Pallas kernels on the float element formats (API.md section 7).

* Interpret mode on the CPU against the float64 statement of
  tests/numpy_reference.py: fp8 (e4m3fn) and fp4 (packed e2m1) weights,
  per-channel and blockwise (MXFP4's B = 32, NVFP4's B = 16, fp8's 128), with
  bf16 / f16 / f32 activations (A16) and with fp8 activations (A8-fp8), int4 /
  int8 weights with fp8 activations, shapes no tile divides -- for every
  operand form: the TPU kernel as lowered for v7 (e4m3fn dot operands) and
  for v6e (bf16 in VMEM), the Triton kernel for an H100 (e4m3fn x e4m3fn)
  and an A100 (bf16 in registers). Weights are random codes over the whole
  format (subnormal e4m3 values included), and quantizer-made MXFP4 / NVFP4
  through the public op.
* Lowering from this CPU machine: the exported modules say which operand
  form each target got -- the ``tpu.matmul`` operand types inside the
  ``tpu_custom_call`` (bf16 x e4m3fn or e4m3fn x e4m3fn for v7, bf16 x bf16
  for v5e / v6e) and the ``tt.dot`` operand types inside the Triton custom
  call (e4m3fn x e4m3fn for Hopper with A8-fp8, bf16 otherwise, with no fp8
  conversion in an A100's kernel, where Triton has none) -- and the Mosaic
  check of `pallas_kernels.tpu.mosaic_check` accepts each TPU kernel for its
  generation.

Error bounds: `numpy_reference.assert_close` (float32 accumulation of exact
products: an e4m3 or int8 activation times an e4m3 / e2m1 / int value has at
most 8 x 4 significand bits; bf16 and e4m3fn hold every e4m3 / e2m1 value).
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import export

import xla_qops
from cases import Scheme, make_weight, make_x
import numpy_reference as ref
from pallas_kernels import block_sizes, formats, jax_compat, reference
from pallas_kernels.gpu import quantized_matmul as gpu_kernel
from pallas_kernels.gpu import triton_ir
from pallas_kernels.tpu import mosaic_check
from pallas_kernels.tpu import quantized_matmul as tpu_kernel
from test_custom_call_formats import random_float_weight
from xla_qops import dispatch
from xla_qops.backends import pallas as backend

S = jax.ShapeDtypeStruct
BF16, F8, F32 = "bf16", "f8E4M3FN", "f32"

# Each target of an operand form, as the kernels take it.
TPU_TARGETS = {"v7": dict(chip="v7"), "v6e": dict(chip="v6e")}
GPU_TARGETS = {"h100": dict(device_kind="NVIDIA H100"), "a100": dict(device_kind="NVIDIA A100")}


def run_kernel(kernel, target, x, w, scale, zero_point=None, *, block_size, qa, wf, af):
    module, kw = ((tpu_kernel, TPU_TARGETS[target]) if kernel == "tpu"
                  else (gpu_kernel, GPU_TARGETS[target]))
    return module.quantized_matmul(x, w, scale, zero_point, block_size=block_size,
                                   quantize_activation=qa, weight_format=wf,
                                   activation_format=af, interpret=True, **kw)


def check(y, x, w, scale, zero_point=None, *, block_size, qa, wf, af):
    assert y.dtype == x.dtype and y.shape == (x.shape[0], scale.shape[-1])
    ref.assert_close(y, x, w, scale, zero_point, block_size, qa,
                     weight_format=wf if wf in ("fp8", "fp4") else None,
                     activation_format=af if qa else None)


KERNEL_TARGETS = [("tpu", "v7"), ("tpu", "v6e"), ("gpu", "h100"), ("gpu", "a100")]
# (weight format, block size, A8-fp8, x dtype, M, K, N): fp8 and fp4,
# per-channel and blockwise, A16 and A8-fp8; the odd rows have M, N and
# (per-channel) K that no tile divides (TPU: full-extent tiles; GPU: masked
# last K step, padded N).
FLOAT_CASES = [
    ("fp8", -1, False, "bfloat16", 7, 1000, 200),
    ("fp8", 64, True, "float32", 5, 256, 96),
    ("fp4", 32, False, "bfloat16", 5, 256, 96),
    ("fp4", -1, True, "bfloat16", 33, 640, 200),
]
MORE_FLOAT_CASES = [
    ("fp8", 128, False, "float32", 5, 256, 96),
    ("fp8", -1, True, "bfloat16", 5, 256, 96),
    ("fp4", -1, False, "float32", 7, 1000, 200),
    ("fp4", 64, True, "bfloat16", 5, 256, 96),
    ("fp4", 32, True, "bfloat16", 33, 640, 200),
]


def scheme_id(wf, block_size, qa):
    return f"{wf}-{'pc' if block_size == -1 else f'g{block_size}'}-a{'8fp8' if qa else '16'}"


def case_id(case):
    wf, block_size, qa, dtype, m, k, n = case
    return f"{scheme_id(wf, block_size, qa)}-{dtype}-{m}x{k}x{n}"


def run_float_case(kernel, target, case):
    wf, block_size, qa, dtype, m, k, n = case
    rng = np.random.default_rng(m * k + n)
    qw = random_float_weight(rng, n, k, wf, block_size)
    x = make_x(rng, (m, k), dtype)
    af = "fp8" if qa else None
    y = run_kernel(kernel, target, x, qw.w, qw.scale, block_size=block_size, qa=qa, wf=wf, af=af)
    check(y, x, qw.w, qw.scale, block_size=block_size, qa=qa, wf=wf, af=af)


@pytest.mark.parametrize("case", FLOAT_CASES + MORE_FLOAT_CASES, ids=case_id)
def test_pure_jax_statement_equals_the_reference(case):
    """`pallas_kernels.reference` (the kernels' algebra on their operands) is
    itself right for the float formats."""
    wf, block_size, qa, dtype, m, k, n = case
    rng = np.random.default_rng(m * k + n)
    qw = random_float_weight(rng, n, k, wf, block_size)
    x = make_x(rng, (m, k), dtype)
    af = "fp8" if qa else None
    y = reference.quantized_matmul_reference_jit(x, qw.w, qw.scale, block_size=block_size,
                                                 quantize_activation=qa, weight_format=wf,
                                                 activation_format=af)
    check(y, x, qw.w, qw.scale, block_size=block_size, qa=qa, wf=wf, af=af)


@pytest.mark.parametrize("kernel,target", KERNEL_TARGETS, ids=str)
@pytest.mark.parametrize("case", FLOAT_CASES, ids=case_id)
def test_float_weights_in_interpret_mode_equal_the_reference(kernel, target, case):
    run_float_case(kernel, target, case)


@pytest.mark.slow
@pytest.mark.parametrize("kernel,target", KERNEL_TARGETS, ids=str)
@pytest.mark.parametrize("case", MORE_FLOAT_CASES, ids=case_id)
def test_more_float_cases(kernel, target, case):
    run_float_case(kernel, target, case)


@pytest.mark.parametrize("kernel,target", [("tpu", "v6e"), ("gpu", "a100")], ids=str)
@pytest.mark.parametrize("wf,block_size", [("fp8", -1), ("fp4", 32)])
def test_float16_activations(kernel, target, wf, block_size):
    """float16 x: widened to float32 on the TPU, kept as the GPU's dot dtype."""
    rng = np.random.default_rng(2)
    qw = random_float_weight(rng, 128, 256, wf, block_size)
    x = make_x(rng, (3, 256), "float16")
    y = run_kernel(kernel, target, x, qw.w, qw.scale, block_size=block_size, qa=False, wf=wf,
                   af=None)
    check(y, x, qw.w, qw.scale, block_size=block_size, qa=False, wf=wf, af=None)


@pytest.mark.parametrize("kernel,target,scheme", [
    ("tpu", "v7", Scheme(4, 64, False, True, True)),
    ("tpu", "v6e", Scheme(8, -1, False, False, True)),
    ("gpu", "h100", Scheme(4, -1, True, False, True)),
    ("gpu", "a100", Scheme(4, 64, False, True, True)),
], ids=lambda v: v.id if isinstance(v, Scheme) else str(v))
def test_int_weights_with_fp8_activations(kernel, target, scheme):
    """W4A8-fp8 / W8A8-fp8 (zero points included: the running activation sum
    decodes the e4m3fn activations); both multiply in bf16 on every target."""
    rng = np.random.default_rng(3)
    qw = make_weight(rng, n=96, k=256, scheme=scheme)
    x = make_x(rng, (5, 256), "bfloat16")
    wf = "int4" if scheme.bits == 4 else "int8"
    y = run_kernel(kernel, target, x, qw.w, qw.scale, qw.zero_point,
                   block_size=qw.block_size, qa=True, wf=wf, af="fp8")
    check(y, x, qw.w, qw.scale, qw.zero_point, block_size=qw.block_size, qa=True, wf=wf,
          af="fp8")


@pytest.mark.parametrize("wf,qa", [("fp4", True), ("fp8", False)])
def test_tpu_multi_step_grid_with_padding(wf, qa):
    """Explicit tiles that pad M, N and K and step along every grid axis, in
    the v7 form (the accumulator carried across K steps). The fp8 weight's
    last K block would be partial, and what lies past its end (a NaN pattern,
    in interpret mode) would reach the MXU as stored: the kernel pads that
    weight instead."""
    rng = np.random.default_rng(5)
    m, k, n = 20, 700, 300
    qw = random_float_weight(rng, n, k, wf, -1)
    x = make_x(rng, (m, k), "bfloat16")
    blocks = block_sizes.TpuBlocks(tm=32, tn=128, tk=512, k_chunk=256, m_pad=64, n_pad=384,
                                   k_pad=1024, vmem_limit_bytes=32 << 20)
    assert min(blocks.grid) > 1
    y = tpu_kernel.quantized_matmul(x, qw.w, qw.scale, block_size=-1, quantize_activation=qa,
                                    weight_format=wf, chip="v7", blocks=blocks,
                                    interpret=True)
    check(y, x, qw.w, qw.scale, block_size=-1, qa=qa, wf=wf, af="fp8" if qa else None)


# ---- the public op, impl="pallas" (the TPU kernel interpreted on this CPU)

@pytest.mark.parametrize("fmt,block_size,qa", [("fp8", 128, True), ("mxfp4", 32, False),
                                               ("nvfp4", 16, True)])
def test_impl_pallas_runs_quantized_float_weights(fmt, block_size, qa):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    qw = xla_qops.quantize_weight(w, format=fmt, block_size=block_size)
    x = make_x(rng, (2, 3, 256), "bfloat16")
    y = xla_qops.quantized_matmul(x, qw, quantize_activation=qa, impl="pallas")
    assert y.shape == (2, 3, 96) and y.dtype == x.dtype
    ref.assert_close(np.asarray(y.astype(jnp.float32)), np.asarray(x), np.asarray(qw.w),
                     np.asarray(qw.scale), None, qw.block_size, qa,
                     weight_format=qw.weight_format, activation_format="fp8" if qa else None)


def _spec(wf, block_size=-1, qa=False, af=None):
    k, n = 4096, 4096
    packed = wf == "fp4"
    w_dtype = {"fp8": jnp.float8_e4m3fn, "fp4": jnp.uint8, "int8": jnp.int8}[wf]
    p = 2 if packed else 1
    w = (S((n, k // p), w_dtype) if block_size == -1
         else S((k // block_size, block_size // p, n), w_dtype))
    s = S((n,), jnp.float32) if block_size == -1 else S((k // block_size, n), jnp.float32)
    return xla_qops.spec.check_args(S((16, k), jnp.bfloat16), w, s, None, block_size, False, qa,
                                    weight_format=wf, activation_format=af)


def test_supports_the_float_formats_and_declines_what_a_kernel_cannot_tile():
    for spec in (_spec("fp8"), _spec("fp8", 128, True), _spec("fp4", 32), _spec("fp4", -1, True),
                 _spec("int8", -1, True, "fp8")):
        assert spec.float_format
        assert all(backend.supports(spec, p) for p in ("tpu", "cpu", "cuda")), spec.scheme
    # NVFP4 (B = 16, 8 bytes per block) with fp8 activations: Mosaic tiles it,
    # Triton's e4m3fn dot needs 32 along K, so impl="auto" falls back to XLA there.
    # MXFP4 (B = 32, 16 bytes) with fp8 activations: Mosaic tiles it; an
    # H100's e4m3fn dot needs 32 along K, so impl="auto" falls back to XLA
    # there, while an A100 (bf16 dot, K >= 16) takes it.
    mxfp4_a8 = _spec("fp4", 32, True)
    assert backend.supports(mxfp4_a8, "tpu") and not backend.supports(mxfp4_a8, "cuda")
    assert dispatch.auto_choice(mxfp4_a8, "cuda") != "pallas"
    gpu_rule = dict(block_size=32, packed=True, x_dtype="bfloat16", quantize_activation=True,
                    weight_format="fp4", activation_format="fp8")
    assert gpu_kernel.supports(**gpu_rule, device_kind="NVIDIA A100")
    assert not gpu_kernel.supports(**gpu_rule, device_kind="NVIDIA H100")
    assert backend.supports(_spec("fp4", 64, True), "cuda")
    assert backend.supports(_spec("fp4", 32), "cuda")  # A16: a bf16 dot on every GPU
    assert not backend.supports(_spec("fp4", 16), "cuda")  # 8 bytes: under Triton's 16
    assert not backend.supports(mxfp4_a8, "rocm")


# ---- decoders and the operand-form rule

def test_in_kernel_decoders_are_exact_for_every_code():
    bits = np.arange(256, dtype=np.uint8)
    finite = (bits & 0x7F) != 0x7F
    got = np.asarray(formats.e4m3_bits_to_float32(jnp.asarray(bits)), np.float64)
    np.testing.assert_array_equal(got[finite], ref.e4m3fn_value(bits)[finite])
    assert np.array_equal(np.signbit(got[finite]), np.signbit(ref.e4m3fn_value(bits)[finite]))
    codes = np.arange(16, dtype=np.uint8)
    np.testing.assert_array_equal(formats.e2m1_codes_to_float32(jnp.asarray(codes)),
                                  ref.e2m1_value(codes))
    as_e4m3 = np.asarray(formats.e2m1_codes_to_e4m3(jnp.asarray(codes)))
    assert as_e4m3.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(as_e4m3.astype(np.float64), ref.e2m1_value(codes))


def test_operand_form_rule():
    v7, v6e = block_sizes.CHIPS["v7"], block_sizes.CHIPS["v6e"]

    def tpu(chip, x="bfloat16", qa=False, wf="fp8", af=None):
        return block_sizes.tpu_operands(x, quantize_activation=qa, weight_format=wf,
                                        activation_format=af, chip=chip).label

    assert tpu(v7) == "bfloat16 x float8_e4m3fn"
    assert tpu(v7, qa=True, wf="fp4", af="fp8") == "float8_e4m3fn x float8_e4m3fn"
    assert tpu(v7, x="float32") == "float32 x float32"  # no f32 x e4m3fn MXU product
    assert tpu(v7, x="float16") == "float32 x float32"  # Mosaic has no f16 dot
    assert tpu(v7, qa=True, wf="int4", af="fp8") == "bfloat16 x bfloat16"
    assert tpu(v7, qa=True, wf="int8", af="int8") == "int8 x int8"
    assert tpu(v6e) == "bfloat16 x bfloat16"
    assert tpu(v6e, qa=True, af="fp8") == "bfloat16 x bfloat16"
    assert not block_sizes.CONSERVATIVE.fp8_mxu  # an unknown TPU converts in VMEM

    def gpu(kind, x="bfloat16", qa=False, wf="fp8", af=None):
        return block_sizes.gpu_operands(x, quantize_activation=qa, weight_format=wf,
                                        activation_format=af, device_kind=kind).label

    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA GH200 480GB", None):
        assert gpu(kind, qa=True, af="fp8") == "float8_e4m3fn x float8_e4m3fn", kind
        assert gpu(kind) == "bfloat16 x bfloat16"  # Triton's dot takes one operand type
    for kind in ("NVIDIA A100-SXM4-80GB", "Tesla T4", "NVIDIA A10"):
        assert gpu(kind, qa=True, af="fp8") == "bfloat16 x bfloat16", kind
    assert gpu("NVIDIA A100", x="float16", wf="fp4") == "float16 x float16"


# ---- lowering: what each target's exported module multiplies

def _avals(m, k, n, wf, block_size, x_dtype=jnp.bfloat16):
    return (S((m, k), x_dtype),) + tuple(_spec_avals(k, n, wf, block_size))


def _spec_avals(k, n, wf, block_size):
    p = 2 if wf == "fp4" else 1
    w_dtype = jnp.float8_e4m3fn if wf == "fp8" else jnp.uint8
    if block_size == -1:
        return S((n, k // p), w_dtype), S((n,), jnp.float32)
    return (S((k // block_size, block_size // p, n), w_dtype),
            S((k // block_size, n), jnp.float32))


def export_tpu(fn, *args):
    return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def export_cuda(fn, *args, kind=None):
    with jax_compat.lowering_target("cuda", kind):
        return export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(triton_ir.TRITON)]
        )(*args).mlir_module()


def tpu_matmuls(fn, *args):
    """{(lhs, rhs, acc)} of the tpu.matmuls of every Mosaic kernel in fn's TPU export."""
    modules = mosaic_check.mosaic_modules(fn, *args)
    assert modules
    return {t for m in modules for t in mosaic_check.matmul_operand_types(m)}


# (weight format, block size, A8-fp8) x the operand types each TPU target gets.
TPU_FORMS = [
    ("fp8", -1, False, {"v7": (BF16, F8, F32), "v6e": (BF16, BF16, F32), "v5e": (BF16, BF16, F32)}),
    ("fp8", 128, True, {"v7": (F8, F8, F32), "v6e": (BF16, BF16, F32), "v5e": (BF16, BF16, F32)}),
    ("fp4", 32, False, {"v7": (BF16, F8, F32), "v6e": (BF16, BF16, F32), "v5e": (BF16, BF16, F32)}),
    ("fp4", -1, True, {"v7": (F8, F8, F32), "v6e": (BF16, BF16, F32), "v5e": (BF16, BF16, F32)}),
]
GENERATION = {"v7": 7, "v6e": 6, "v5e": 5}


@pytest.mark.parametrize("wf,block_size,qa,forms", TPU_FORMS,
                         ids=[scheme_id(*form[:3]) for form in TPU_FORMS])
def test_tpu_exports_give_v7_e4m3_operands_and_older_chips_bf16(wf, block_size, qa, forms):
    """A Llama-sized layer in prefill (M = 256, several K steps); the Mosaic
    check (the structural rule of that generation, and Mosaic's layout passes
    where jaxlib has them) accepts every kernel."""
    args = _avals(256, 4096, 14336, wf, block_size)
    for chip, want in forms.items():
        fn = functools.partial(tpu_kernel.quantized_matmul, block_size=block_size,
                               quantize_activation=qa, weight_format=wf, chip=chip)
        assert "tpu_custom_call" in export_tpu(fn, *args)
        assert tpu_matmuls(fn, *args) == {want}, chip
        results = mosaic_check.check(fn, *args, generations=(GENERATION[chip],))
        assert all(r.ok for r in results), (chip, [r.error for r in results if not r.ok])


def test_mosaic_check_knows_which_generation_multiplies_e4m3fn():
    """Negative control for the rule above: the v7 kernel's bf16 x e4m3fn
    product is refused for v6 by the structural check, accepted for v7."""
    args = _avals(16, 1024, 512, "fp8", -1)
    fn = functools.partial(tpu_kernel.quantized_matmul, block_size=-1, weight_format="fp8",
                           chip="v7")
    [module] = mosaic_check.mosaic_modules(fn, *args)
    refused = mosaic_check.structural_check(module, 6)
    assert not refused.ok and "tpu.matmul of bf16 x f8E4M3FN into f32" in refused.error
    assert mosaic_check.structural_check(module, 7).ok


def test_tpu_target_comes_from_the_lowering_target_or_the_chip_setting(monkeypatch):
    """impl="pallas" lowered for TPU: $XLA_QOPS_TPU_CHIP=v7 gives the e4m3fn
    form on every JAX version; `jax_compat.lowering_target("tpu", "TPU7x")`
    does on JAX versions with abstract devices (0.7.1 keeps its default v6e)."""
    args = _avals(16, 4096, 4096, "fp8", -1)

    def op():  # a fresh function: JAX keeps a traced one's kernels, whatever the setting
        return lambda x, w, s: xla_qops.quantized_matmul(x, w, s, impl="pallas")

    assert tpu_matmuls(op(), *args) == {(BF16, BF16, F32)}  # the default chip, v6e
    with jax_compat.lowering_target("tpu", "TPU7x"):
        want = (BF16, F8, F32) if jax_compat.abstract_devices_supported() else (BF16, BF16, F32)
        assert tpu_matmuls(op(), *args) == {want}
    monkeypatch.setenv("XLA_QOPS_TPU_CHIP", "v7")
    assert tpu_matmuls(op(), *args) == {(BF16, F8, F32)}


# (weight format, block size, A8-fp8) x the tt.dot operand types per GPU target.
GPU_FORMS = [
    ("fp8", -1, False, {"NVIDIA H100": (BF16, BF16, F32), "NVIDIA A100": (BF16, BF16, F32)}),
    ("fp8", -1, True, {"NVIDIA H100": (F8, F8, F32), "NVIDIA A100": (BF16, BF16, F32)}),
    ("fp8", 128, True, {"NVIDIA H100": (F8, F8, F32), "NVIDIA A100": (BF16, BF16, F32)}),
    ("fp4", 32, False, {"NVIDIA H100": (BF16, BF16, F32), "NVIDIA A100": (BF16, BF16, F32)}),
    ("fp4", 64, True, {"NVIDIA H100": (F8, F8, F32), "NVIDIA A100": (BF16, BF16, F32)}),
]
_FP8_CONVERSION = ("tt.fp_to_fp", "arith.extf", "arith.truncf")


@pytest.mark.parametrize("m", [1, 256])
@pytest.mark.parametrize("wf,block_size,qa,forms", GPU_FORMS,
                         ids=[scheme_id(*form[:3]) for form in GPU_FORMS])
def test_cuda_exports_give_hopper_e4m3_dots_and_older_gpus_bf16(wf, block_size, qa, forms, m):
    """The A100 kernels decode e4m3 / e2m1 with integer ops: no float
    conversion touches an f8E4M3FN value (Triton has none before sm_89)."""
    args = _avals(m, 4096, 4096, wf, block_size)
    for kind, want in forms.items():
        fn = functools.partial(gpu_kernel.quantized_matmul, block_size=block_size,
                               quantize_activation=qa, weight_format=wf, device_kind=kind)
        text = export_cuda(fn, *args, kind=kind)
        assert triton_ir.TRITON in text and set(triton_ir.dot_operand_types(text)) == {want}
        if kind == "NVIDIA A100":
            conversions = [line for kernel in triton_ir.triton_modules(text)
                           for line in kernel.splitlines()
                           if F8 in line and any(op in line for op in _FP8_CONVERSION)]
            assert not conversions, conversions[:3]


def test_cuda_target_comes_from_the_lowering_target():
    """impl="pallas" lowered for cuda inside `lowering_target("cuda", "NVIDIA
    A100")`: the A100 form where JAX has abstract devices; JAX 0.7.1 cannot
    see the target and keeps the default, an H100."""
    args = _avals(16, 4096, 4096, "fp8", -1)
    fn = lambda x, w, s: xla_qops.quantized_matmul(  # noqa: E731
        x, w, s, quantize_activation=True, impl="pallas")
    assert set(triton_ir.dot_operand_types(export_cuda(fn, *args))) == {(F8, F8, F32)}
    a100 = set(triton_ir.dot_operand_types(export_cuda(fn, *args, kind="NVIDIA A100")))
    want = (BF16, BF16, F32) if jax_compat.abstract_devices_supported() else (F8, F8, F32)
    assert a100 == {want}


def test_auto_takes_the_kernels_for_float_formats_per_platform_at_lowering():
    """impl="auto": Mosaic for TPU, Triton for CUDA, the CPU's own path for the
    CPU; MXFP4 with fp8 activations (16 bytes per block, under an H100's
    e4m3fn dot minimum) goes to XLA for CUDA and to Mosaic for TPU."""
    def auto(block_size, weight_format, qa):
        return lambda x, w, s: xla_qops.quantized_matmul(  # noqa: E731
            x, w, s, block_size=block_size, weight_format=weight_format, quantize_activation=qa)

    fn, args = auto(-1, "fp8", False), _avals(16, 4096, 4096, "fp8", -1)
    assert "tpu_custom_call" in export_tpu(fn, *args)
    assert triton_ir.TRITON in export_cuda(fn, *args)
    cpu_text = jax.jit(fn).lower(*args).as_text()
    assert "tpu_custom_call" not in cpu_text and triton_ir.TRITON not in cpu_text
    fn, args = auto(32, "fp4", True), _avals(16, 4096, 4096, "fp4", 32)
    assert "tpu_custom_call" in export_tpu(fn, *args)
    cuda_text = export_cuda(fn, *args)
    assert triton_ir.TRITON not in cuda_text and "dot_general" in cuda_text
