"""xla_qops.interop: importers are bit-exact, exporters are accepted by torch.

Every fixture is packed here, from each format's documented layout, by code
that shares nothing with xla_qops.interop (the packers go the other way, and
the source dequantizations are written out again from the format's formula).
Exactness is checked on float32 values (`_assert_bits_equal`), and the
imported weight is run through `quantized_matmul` against tests/numpy_reference.
"""

import os
import subprocess
import sys

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import xla_qops
from xla_qops import interop
import numpy_reference as ref
from cases import pack_words


@pytest.fixture
def torch():
    """torch, for the tests marked torch (the others run without it)."""
    import torch
    return torch


RNG = np.random.default_rng(1234)


def _assert_bits_equal(qw, source_w_kn):
    """qw.dequantize() (JAX, float32, [N, K]) equals the source's float32 weight [K, N]."""
    ours = np.asarray(qw.dequantize(jnp.float32))
    src = np.asarray(source_w_kn, np.float32).T
    assert ours.shape == src.shape
    bad = ours != src
    assert not bad.any(), (f"{bad.sum()} of {bad.size} differ; e.g. ours {ours[bad][:3]} "
                           f"source {src[bad][:3]}")


def _assert_matmul(qw, x=None, source_w_kn=None):
    """quantized_matmul with the imported weight against the float64 reference."""
    if x is None:
        x = RNG.standard_normal((3, qw.in_features)).astype(np.float32)
    y = xla_qops.quantized_matmul(jnp.asarray(x), qw)
    ref.assert_close(np.asarray(y), x, np.asarray(qw.w), np.asarray(qw.scale),
                     None if qw.zero_point is None else np.asarray(qw.zero_point),
                     qw.block_size)


def _f16(shape, lo=0.001, hi=0.05):
    return RNG.uniform(lo, hi, shape).astype(np.float16)


# ---------------------------------------------------------------- GPTQ

def _gptq_fixture(k, n, g, bits, version):
    codes = RNG.integers(0, 1 << bits, (k, n))
    zeros = RNG.integers(0, 1 << bits, (k // g, n))
    scales = _f16((k // g, n))
    stored = (zeros - 1) % (1 << bits) if version == 1 else zeros
    qweight = pack_words(codes, bits, axis=0).view(np.int32)
    qzeros = pack_words(stored, bits, axis=1).view(np.int32)
    g_idx = (np.arange(k) // g).astype(np.int32)
    # GPTQ's own dequantization: scales[g_idx] * (q - z[g_idx]), in float32.
    w = scales.astype(np.float32)[g_idx] * (codes - zeros[g_idx]).astype(np.float32)
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx), w


@pytest.mark.parametrize("bits,g,version", [
    (4, 32, 1), (4, 64, 2), (4, 128, 1), (4, 256, 2), (4, 96, 1), (4, 768, 1),
    (8, 64, 1), (8, 128, 2)])
def test_gptq_exact(bits, g, version):
    k, n = 768, 64
    tensors, w = _gptq_fixture(k, n, g, bits, version)
    qw = interop.from_gptq(**tensors, bits=bits, version=version)
    assert qw.bits == bits and qw.packed == (bits == 4)
    assert qw.block_size == (-1 if g == k else g)
    _assert_bits_equal(qw, w)
    _assert_matmul(qw)


def test_gptq_extreme_float16_scales_exact():
    """The proof's edge cases: subnormal, largest and negative float16 scales."""
    tensors, _ = _gptq_fixture(256, 32, 64, 4, 2)
    special = np.array([2.0 ** -24, 2.0 ** -14, 65504.0, -65504.0, -3e-5, 1.0], np.float16)
    tensors["scales"] = RNG.choice(special, (4, 32)).astype(np.float16)
    codes = interop.gptq._core.unpack_words(tensors["qweight"], 4, 0)
    zeros = interop.gptq._core.unpack_words(tensors["qzeros"], 4, 1)
    w = (np.repeat(tensors["scales"].astype(np.float32), 64, 0)
         * (codes - np.repeat(zeros, 64, 0)).astype(np.float32))
    _assert_bits_equal(interop.from_gptq(**tensors, version=2), w)


def test_gptq_symmetric_drops_zero_point():
    tensors, w = _gptq_fixture(256, 32, 128, 4, 2)
    zeros = np.full((2, 32), 8)
    tensors["qzeros"] = pack_words(zeros, 4, axis=1).view(np.int32)
    codes = interop.gptq._core.unpack_words(tensors["qweight"], 4, 0)
    w = np.repeat(tensors["scales"].astype(np.float32), 128, 0) * (codes - 8).astype(np.float32)
    qw = interop.from_gptq(**tensors, version=2)
    assert qw.zero_point is None
    _assert_bits_equal(qw, w)


def test_gptq_act_order():
    k, n, g = 256, 32, 64
    tensors, _ = _gptq_fixture(k, n, g, 4, 1)
    codes = np.asarray(RNG.integers(0, 16, (k, n)))
    tensors["qweight"] = pack_words(codes, 4, 0).view(np.int32)
    g_idx = RNG.permutation(np.arange(k) // g).astype(np.int32)
    tensors["g_idx"] = g_idx
    zeros = interop.gptq._core.unpack_words(tensors["qzeros"], 4, 1)
    zeros = (zeros + 1) % 16
    w = tensors["scales"].astype(np.float32)[g_idx] * (codes - zeros[g_idx]).astype(np.float32)
    with pytest.raises(ValueError, match="act-order"):
        interop.from_gptq(**tensors)
    qw, perm = interop.from_gptq(**tensors, permute_act_order=True)
    _assert_bits_equal(qw, w[perm])
    x = RNG.standard_normal((2, k)).astype(np.float32)
    y = np.asarray(xla_qops.quantized_matmul(jnp.asarray(x[:, perm]), qw))
    ref.assert_close(y, x[:, perm], np.asarray(qw.w), np.asarray(qw.scale),
                     np.asarray(qw.zero_point), qw.block_size)
    # and it is the source's x @ W: the reference of the permuted problem equals x @ w
    np.testing.assert_allclose(ref.quantized_matmul(x[:, perm], np.asarray(qw.w),
                                                    np.asarray(qw.scale),
                                                    np.asarray(qw.zero_point), qw.block_size),
                               x.astype(np.float64) @ w.astype(np.float64), rtol=1e-12,
                               atol=1e-12)


def test_gptq_float32_scales_int4_not_exact_int8_is():
    """The tight statement: float32 scales with full significands break s*(z-8)."""
    tensors, _ = _gptq_fixture(256, 32, 64, 4, 2)
    tensors["scales"] = RNG.uniform(0.001, 0.05, (4, 32)).astype(np.float32)
    codes = interop.gptq._core.unpack_words(tensors["qweight"], 4, 0)
    zeros = interop.gptq._core.unpack_words(tensors["qzeros"], 4, 1)
    w = (np.repeat(tensors["scales"], 64, 0)
         * (codes - np.repeat(zeros, 64, 0)).astype(np.float32))
    with pytest.raises(ValueError, match="target_bits=8 is exact"):
        interop.from_gptq(**tensors, version=2)
    qw8 = interop.from_gptq(**tensors, version=2, target_bits=8)
    assert qw8.bits == 8 and qw8.zero_point is None
    _assert_bits_equal(qw8, w)
    inexact = interop.from_gptq(**tensors, version=2, exact=False)
    np.testing.assert_allclose(np.asarray(inexact.dequantize()), w.T, rtol=0, atol=1e-6)


def test_gptq_bad_input_names_argument():
    tensors, _ = _gptq_fixture(256, 32, 64, 4, 1)
    with pytest.raises(ValueError, match=r"qzeros: expected shape \[4, 4\], got \[4, 3\]"):
        interop.from_gptq(**{**tensors, "qzeros": tensors["qzeros"][:, :3]})
    with pytest.raises(TypeError, match="qweight: expected dtype int32 or uint32, got float32"):
        interop.from_gptq(**{**tensors, "qweight": tensors["qweight"].astype(np.float32)})
    with pytest.raises(ValueError, match="scales: 5 groups do not divide"):
        interop.from_gptq(**{**tensors, "scales": _f16((5, 32))})


# ---------------------------------------------------------------- AWQ

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble j holds column ORDER[j]


def _awq_pack(codes):
    rows, cols = codes.shape
    words = np.zeros((rows, cols // 8), np.uint64)
    for c in range(cols // 8):
        for j, col in enumerate(AWQ_PACK_ORDER):
            words[:, c] |= codes[:, 8 * c + col].astype(np.uint64) << np.uint64(4 * j)
    return words.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("g", [32, 128])
def test_awq_exact(g):
    k, n = 256, 48
    codes = RNG.integers(0, 16, (k, n))
    zeros = RNG.integers(0, 16, (k // g, n))
    scales = _f16((k // g, n))
    w = np.repeat(scales.astype(np.float32), g, 0) * (codes - np.repeat(zeros, g, 0)).astype(np.float32)
    qw = interop.from_awq(_awq_pack(codes), _awq_pack(zeros), scales)
    assert qw.bits == 4 and qw.packed and qw.block_size == g
    _assert_bits_equal(qw, w)
    _assert_matmul(qw)


# ---------------------------------------------------------------- HQQ

def _hqq_fixture(n, k, g, nbits, zero_lo=1.0, zero_hi=14.0):
    rows = n * k // g
    w_q = RNG.integers(0, 1 << nbits, (rows, g))
    scale = _f16((rows, 1))
    zero = RNG.uniform(zero_lo, zero_hi, (rows, 1)).astype(np.float16)
    # HQQ's dequantize: ((W_q - zero) * scale).reshape(shape), in float32.
    w = ((w_q.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32))
    w_nk = w.reshape(n, k)
    if nbits == 4:  # "4bit_u8": first half of the rows high nibble, second half low
        half = rows // 2
        packed = ((w_q[:half] << 4) | w_q[half:]).astype(np.uint8)
    else:
        packed = w_q.astype(np.uint8)
    return packed, scale, zero, w_nk.T


@pytest.mark.parametrize("nbits,g", [(4, 64), (4, 32), (8, 128)])
def test_hqq_exact(nbits, g):
    n, k = 32, 256
    zero_range = (1.0, 14.0) if nbits == 4 else (120.0, 136.0)
    packed, scale, zero, w = _hqq_fixture(n, k, g, nbits, *zero_range)
    qw = interop.from_hqq(packed, scale, zero, shape=(n, k), group_size=g, nbits=nbits)
    assert qw.bits == nbits
    _assert_bits_equal(qw, w)
    _assert_matmul(qw)


def test_hqq_tiny_zero_needs_int8():
    """float16 z in [2**-7, 1): s*(z-8) needs more than 24 bits; unshifted int8 is exact.

    (Below 2**-10 HQQ's own ``W_q - z`` rounds in float32 and neither width can
    reproduce that double rounding; docs/interop.md states the bound.)
    """
    n, k, g = 16, 128, 64
    packed, scale, zero, w = _hqq_fixture(n, k, g, 4, 0.01, 0.9)
    with pytest.raises(ValueError, match="target_bits=8 is exact"):
        interop.from_hqq(packed, scale, zero, shape=(n, k), group_size=g)
    qw = interop.from_hqq(packed, scale, zero, shape=(n, k), group_size=g, target_bits=8)
    _assert_bits_equal(qw, w)


def test_hqq_rejects_axis0():
    with pytest.raises(ValueError, match="axis=1"):
        interop.from_hqq(np.zeros((8, 64), np.uint8), np.ones((16, 1)), np.ones((16, 1)),
                         shape=(16, 64), group_size=64, axis=0)


# ---------------------------------------------------------------- MLX

def _mlx_fixture(n, k, g, bits, dtype=np.float16):
    codes = RNG.integers(0, 1 << bits, (n, k))
    scales = RNG.uniform(0.001, 0.05, (n, k // g)).astype(dtype)
    biases = (-scales.astype(np.float32) * RNG.uniform(0, 1 << bits, (n, k // g))).astype(dtype)
    # MLX: w = scales * q + biases, per group of g along K.
    w = (codes.astype(np.float32) * np.repeat(scales.astype(np.float32), g, 1)
         + np.repeat(biases.astype(np.float32), g, 1))
    return pack_words(codes, bits, axis=1), scales, biases, w.T


@pytest.mark.parametrize("bits,g", [(4, 64), (4, 32), (8, 64), (4, 128)])
def test_mlx_exact(bits, g):
    wq, scales, biases, w = _mlx_fixture(32, 256, g, bits)
    qw = interop.from_mlx(wq, scales, biases, group_size=g, bits=bits)
    assert qw.bits == bits
    _assert_bits_equal(qw, w)
    _assert_matmul(qw)


def test_mlx_float32_params_exact_as_int8():
    wq, scales, biases, w = _mlx_fixture(16, 128, 64, 4, np.float32)
    qw = interop.from_mlx(wq, scales, biases, target_bits=8)
    assert qw.bits == 8
    _assert_bits_equal(qw, w)


# ---------------------------------------------------------------- torch int4pack

def _cpu_pack(codes_nk, layout):
    """int4mm_kernel.cpp's weight_to_int4pack_kernel, loop by loop."""
    n, k = codes_nk.shape
    block = 64 if layout == "cpu_avx512" else 32
    out = np.zeros(n * k // 2, np.uint8)
    for start in range(0, n, block):
        size = min(block, n - start)
        src = codes_nk[start:start + size].astype(np.uint8)
        dst = out[start * k // 2: (start + size) * k // 2].reshape(k, size // 2)
        if size == block and layout == "cpu_avx512":
            dst[:, :16] = (src[32:48].T << 4) | src[0:16].T
            dst[:, 16:] = (src[48:64].T << 4) | src[16:32].T
        elif size == block and layout == "cpu_avx2":
            dst[:, :] = (src[16:32].T << 4) | src[0:16].T
        else:
            dst[:, :] = (src[1::2].T << 4) | src[0::2].T
    return out.reshape(n, k // 2)


def _tinygemm_w(codes_nk, sz, g):
    """(q - 8) * s + z rounded once to float32 (torch's fused multiply-add), as [K, N]."""
    s = np.repeat(sz[..., 0].astype(np.float32), g, 0).astype(np.float64)
    z = np.repeat(sz[..., 1].astype(np.float32), g, 0).astype(np.float64)
    return ((codes_nk.T - 8) * s + z).astype(np.float32)


def _bf16_values(shape):
    """float32 numbers that bfloat16 holds exactly (tinygemm's usual scales)."""
    return RNG.standard_normal(shape).astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("layout", ["cpu_avx512", "cpu_avx2", "cpu_default"])
def test_int4pack_cpu_layouts(layout):
    n, k, g = 112, 128, 64  # 112 = 64 + 48: a full block and a partial one
    codes = RNG.integers(0, 16, (n, k))
    sz = _bf16_values((k // g, n, 2))
    qw = interop.from_int4pack(_cpu_pack(codes, layout), sz, layout=layout)
    assert qw.bits == 4 and qw.packed and qw.block_size == g
    _assert_bits_equal(qw, _tinygemm_w(codes, sz, g))


@pytest.mark.torch
def test_int4pack_matches_torch_converter_on_this_machine(torch):
    n, k, g = 80, 256, 128
    codes = RNG.integers(0, 16, (n, k)).astype(np.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes), 2)
    local = interop.int4pack.local_cpu_layout()
    np.testing.assert_array_equal(packed.numpy(), _cpu_pack(codes, local))
    sz = torch.randn(k // g, n, 2).to(torch.bfloat16)
    qw = interop.from_int4pack(packed, sz)
    _assert_bits_equal(qw, _tinygemm_w(codes, sz.float().numpy(), g))


@pytest.mark.torch
def test_int4pack_against_torch_kernel_itself(torch):
    """torch._weight_int4pack_mm_for_cpu with an identity x returns its own
    weight: bf16 scales/zeros import exactly to it; float32 ones are refused
    (its fused multiply-add rounds once, scale * q - zero_point twice) and
    with exact=False differ by at most one ulp."""
    n, k, g = 64, 128, 32
    codes = RNG.integers(0, 16, (n, k)).astype(np.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes), 2)
    eye = torch.eye(k)
    sz_bf16 = torch.randn(k // g, n, 2).to(torch.bfloat16)
    theirs = torch._weight_int4pack_mm_for_cpu(eye.to(torch.bfloat16), packed, g, sz_bf16)
    ours = np.asarray(interop.from_int4pack(packed, sz_bf16).dequantize())  # [N, K] float32
    np.testing.assert_array_equal(torch.from_numpy(ours.T.copy()).to(torch.bfloat16).float(),
                                  theirs.float())
    sz32 = torch.randn(k // g, n, 2)
    theirs32 = torch._weight_int4pack_mm_for_cpu(eye, packed, g, sz32).numpy()  # [K, N]
    np.testing.assert_array_equal(theirs32, _tinygemm_w(codes, sz32.numpy(), g))
    with pytest.raises(ValueError, match="int4pack: .* cannot be represented bit-exactly"):
        interop.from_int4pack(packed, sz32)
    approx = np.asarray(interop.from_int4pack(packed, sz32, exact=False).dequantize()).T
    # Off by the product's rounding (half an ulp of (q - 8) * s) plus the sum's.
    product = (codes.T - 8) * np.repeat(sz32[..., 0].numpy(), g, 0)
    bound = np.spacing(np.abs(product).astype(np.float32)) / 2 + np.spacing(np.abs(theirs32))
    assert np.all(np.abs(approx - theirs32) <= bound) and np.any(approx != theirs32)


@pytest.mark.torch
@pytest.mark.parametrize("capability,layout", [("avx2", "cpu_avx2"), ("default", "cpu_default")])
def test_int4pack_other_capabilities_match_torch(capability, layout, tmp_path, torch):
    """torch's own converter under ATEN_CPU_CAPABILITY, read back by our layout."""
    code = ("import torch,numpy as np,sys;"
            "c=torch.from_numpy(np.load(sys.argv[1]));"
            "np.save(sys.argv[2],torch._convert_weight_to_int4pack_for_cpu(c,2).numpy())")
    codes = RNG.integers(0, 16, (48, 64)).astype(np.int32)
    src, dst = str(tmp_path / "codes.npy"), str(tmp_path / "packed.npy")
    np.save(src, codes)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    subprocess.run([sys.executable, "-c", code, src, dst], env=env, check=True, timeout=120)
    packed = np.load(dst)
    np.testing.assert_array_equal(packed, _cpu_pack(codes, layout))


def _cuda_pack(codes_nk, inner_k_tiles):
    """int4mm.cu: uint8 [n][k/2] (even k high nibble) -> m16n8k16 B layout, thread by thread."""
    n, k = codes_nk.shape
    u8 = ((codes_nk[:, 0::2] << 4) | codes_nk[:, 1::2]).astype(np.uint32)
    out = np.zeros((n // 8, k // (inner_k_tiles * 16), 32, inner_k_tiles // 2), np.uint32)
    for n_tile in range(out.shape[0]):
        for k_outer in range(out.shape[1]):
            for t in range(32):
                for inner in range(0, inner_k_tiles, 2):
                    n0 = n_tile * 8 + t // 4
                    base0 = (k_outer * inner_k_tiles + inner) * 16 // 2
                    ks = [base0 + t % 4, base0 + t % 4 + 4, base0 + 8 + t % 4, base0 + 12 + t % 4]
                    v = [u8[n0, kk] for kk in ks]
                    out[n_tile, k_outer, t, inner // 2] = (
                        ((v[3] & 0xF) << 28) | ((v[2] & 0xF) << 24) | ((v[1] & 0xF) << 20)
                        | ((v[0] & 0xF) << 16) | ((v[3] & 0xF0) << 8) | ((v[2] & 0xF0) << 4)
                        | (v[1] & 0xF0) | ((v[0] & 0xF0) >> 4))
    return out.view(np.int32)


@pytest.mark.torch
@pytest.mark.parametrize("inner_k_tiles", [2, 8])
def test_int4pack_cuda_layout(inner_k_tiles, torch):
    n, k, g = 16, 256, 32
    codes = RNG.integers(0, 16, (n, k))
    sz = RNG.standard_normal((k // g, n, 2)).astype(np.float16)
    packed = _cuda_pack(codes, inner_k_tiles)
    meta = torch.ops.aten._convert_weight_to_int4pack(
        torch.empty(n, k // 2, dtype=torch.uint8, device="meta"), inner_k_tiles)
    assert tuple(meta.shape) == packed.shape
    qw = interop.from_int4pack(packed, sz)
    _assert_bits_equal(qw, _tinygemm_w(codes, sz, g))
    back = interop.to_int4pack(qw, layout="cuda", inner_k_tiles=inner_k_tiles)
    np.testing.assert_array_equal(back.weight.numpy(), packed)


@pytest.mark.torch
@pytest.mark.parametrize("bits_block", [(-1, True), (512, False)])
def test_to_int4pack_product_matches_our_op(bits_block, torch):
    block, symmetric = bits_block
    n, k = 48, 1024
    w = RNG.standard_normal((n, k)).astype(np.float32)
    qw = xla_qops.quantize_weight(jnp.asarray(w), bits=4, block_size=block, symmetric=symmetric)
    packed = interop.to_int4pack(qw)
    assert packed.group_size == 256  # largest tinygemm group dividing K or B
    x = RNG.standard_normal((5, k)).astype(np.float32)
    y_torch = torch.ops.aten._weight_int4pack_mm_for_cpu(
        torch.from_numpy(x), packed.weight, packed.group_size, packed.scales_and_zeros).numpy()
    y_ours = np.asarray(xla_qops.quantized_matmul(jnp.asarray(x), qw))
    args = (x, np.asarray(qw.w), np.asarray(qw.scale),
            None if qw.zero_point is None else np.asarray(qw.zero_point), qw.block_size)
    ref.assert_close(y_torch, *args)
    ref.assert_close(y_ours, *args)
    # and the round trip back is the same weight, bit for bit. exact=False:
    # the importer checks against torch's fused multiply-add, which rounds
    # float32 scales' products once where our convention rounds twice.
    again = interop.from_int4pack(packed.weight, packed.scales_and_zeros, exact=False)
    np.testing.assert_array_equal(np.asarray(again.dequantize()), np.asarray(qw.dequantize()))


def _int4_weight(n, k, block_size):
    """A QuantizedWeight built directly (no JAX op, so no compile for a new shape)."""
    groups = 1 if block_size == -1 else k // block_size
    w = (np.zeros((n, k), np.int8) if block_size == -1
         else np.zeros((groups, block_size, n), np.int8))
    scale = np.ones((n,) if block_size == -1 else (groups, n), np.float32)
    return xla_qops.QuantizedWeight(w=w, scale=scale, zero_point=None, bits=4,
                                    block_size=block_size, packed=False)


@pytest.mark.torch
def test_to_int4pack_errors(torch):
    qw8 = xla_qops.QuantizedWeight(w=np.zeros((16, 64), np.int8), scale=np.ones(16, np.float32),
                                   zero_point=None, bits=8, block_size=-1, packed=False)
    with pytest.raises(ValueError, match="qw: expected a 4-bit"):
        interop.to_int4pack(qw8)
    with pytest.raises(ValueError, match="divisible by 16, got 24"):
        interop.to_int4pack(_int4_weight(24, 64, 32))
    with pytest.raises(ValueError, match="block_size=16"):
        interop.to_int4pack(_int4_weight(16, 64, 16))
    with pytest.raises(ValueError, match="in_features=48"):
        interop.to_int4pack(_int4_weight(16, 48, -1))
    with pytest.raises(ValueError, match="layout: expected 'cpu' or 'cuda'"):
        interop.to_int4pack(_int4_weight(16, 64, 32), layout="mps")


def test_docs_example_runs():
    """docs/interop.md's python example runs as written."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "interop.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, "interop.md", "exec"), namespace)
    qw = namespace["qw"]
    assert (qw.bits, qw.block_size, qw.packed, qw.w.shape) == (4, 128, True, (2, 64, 64))


def test_from_state_dict_gptq_and_mlx(tmp_path):
    """Whole checkpoints: every layer imported, the rest passed through, saved and reloaded."""
    from xla_qops import checkpoint
    t1, w1 = _gptq_fixture(256, 32, 128, 4, 1)
    t2, w2 = _gptq_fixture(256, 64, 64, 4, 1)
    bias = RNG.standard_normal(32).astype(np.float32)
    state = {f"model.q.{k}": v for k, v in t1.items()}
    state.update({f"model.o.{k}": v for k, v in t2.items()})
    state["model.q.bias"], state["model.norm.weight"] = bias, np.ones(32, np.float32)
    weights, others = interop.from_state_dict(state, "gptq")
    assert set(weights) == {"model.q", "model.o"} and set(others) == {"model.q.bias",
                                                                       "model.norm.weight"}
    _assert_bits_equal(weights["model.o"], w2)
    path = tmp_path / "gptq.safetensors"
    checkpoint.save_quantized(path, weights, others)
    _assert_bits_equal(checkpoint.load_quantized(path).weights["model.q"], w1)

    wq, scales, biases, w = _mlx_fixture(32, 256, 64, 4)
    weights, others = interop.from_state_dict(
        {"l.weight": wq, "l.scales": scales, "l.biases": biases, "l.bias": bias}, "mlx")
    assert set(others) == {"l.bias"}
    _assert_bits_equal(weights["l"], w)
    with pytest.raises(ValueError, match="layer 'l' \\(mlx\\) lacks l.scales"):
        interop.from_state_dict({"l.weight": wq, "l.biases": biases}, "mlx")


# ---------------------------------------------------------------- compressed-tensors
# Stored form: signed values + 2**(bits-1), packed along in (weight) or out
# (zero point) into int32 words, little end first, the last word zero-padded;
# the source's dequantization (q - z) * s, here rounded once to float32.

def _ct_fixture(n, k, bits, group, symmetric, scale_dtype=np.float16, g_idx=None):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = RNG.integers(lo, hi + 1, (n, k))
    n_groups = k // group
    z = np.zeros((n, n_groups), np.int64) if symmetric else RNG.integers(lo, hi + 1, (n, n_groups))
    s = RNG.uniform(0.001, 0.05, (n, n_groups)).astype(scale_dtype)
    per = 32 // bits
    padded = np.pad(q + (1 << (bits - 1)), [(0, 0), (0, -k % per)])
    tensors = dict(weight_packed=pack_words(padded, bits, axis=1).view(np.int32),
                   weight_scale=s, weight_shape=np.array([n, k]))
    if not symmetric:
        zp = np.pad(z + (1 << (bits - 1)), [(0, -n % per), (0, 0)])
        tensors["weight_zero_point"] = pack_words(zp, bits, axis=0).view(np.int32)
    groups = np.arange(k) // group if g_idx is None else g_idx
    w = (q - z[:, groups]).astype(np.float32) * s.astype(np.float32)[:, groups]  # [N, K]
    return tensors, w


@pytest.mark.parametrize("bits,n,k,group,symmetric,strategy", [
    (4, 64, 256, 128, True, "group"), (4, 64, 256, 32, False, "group"),
    (4, 40, 20, 20, False, "channel"),   # K = 20: the last word is half padding
    (8, 64, 256, 256, True, "channel"), (8, 24, 128, 64, False, "group")])
def test_compressed_tensors_pack_quantized_exact(bits, n, k, group, symmetric, strategy):
    tensors, w = _ct_fixture(n, k, bits, group, symmetric)
    if strategy == "channel":
        tensors["weight_scale"] = tensors["weight_scale"].reshape(n, 1)
    qw = interop.from_compressed_tensors(tensors, num_bits=bits, group_size=group,
                                         symmetric=symmetric, strategy=strategy)
    assert qw.bits == bits and qw.packed == (bits == 4)
    assert qw.block_size == (-1 if group == k else group)
    assert (qw.zero_point is None) == symmetric
    _assert_bits_equal(qw, w.T)
    _assert_matmul(qw)


def test_compressed_tensors_export_round_trips():
    for bits, group, symmetric in ((4, 32, False), (4, 64, True), (8, 64, False)):
        tensors, w = _ct_fixture(48, 128, bits, group, symmetric, scale_dtype=np.float32)
        qw = interop.from_compressed_tensors(tensors, num_bits=bits, group_size=group,
                                             symmetric=symmetric, exact=False)
        layer = interop.to_compressed_tensors(qw)
        for name in tensors:
            np.testing.assert_array_equal(layer.tensors[name], tensors[name], err_msg=name)
        back = interop.from_compressed_tensors(layer.tensors, num_bits=bits, exact=False,
                                               **{k: layer.config[k] for k in (
                                                   "group_size", "symmetric", "strategy")})
        np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qw.dequantize()))


def test_compressed_tensors_act_order():
    n, k, group = 32, 128, 32
    g_idx = RNG.permutation(np.arange(k) // group)
    tensors, w = _ct_fixture(n, k, 4, group, False, g_idx=g_idx)
    tensors["weight_g_idx"] = g_idx.astype(np.int32)
    with pytest.raises(ValueError, match="weight_g_idx: act-order"):
        interop.from_compressed_tensors(tensors, num_bits=4, group_size=group, symmetric=False,
                                        actorder="group")
    qw, perm = interop.from_compressed_tensors(tensors, num_bits=4, group_size=group,
                                               symmetric=False, actorder="group",
                                               permute_act_order=True)
    _assert_bits_equal(qw, w[:, perm].T)


def test_compressed_tensors_int_quantized_w8a8():
    n, k = 32, 64
    q = RNG.integers(-127, 128, (n, k)).astype(np.int8)
    s = RNG.uniform(0.001, 0.05, (n, 1)).astype(np.float32)
    qw = interop.from_compressed_tensors({"weight": q, "weight_scale": s}, num_bits=8,
                                         strategy="channel",
                                         compression_format="int-quantized")
    _assert_bits_equal(qw, (q.astype(np.float32) * s).T)
    config = {"quant_method": "compressed-tensors", "format": "int-quantized",
              "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                              "strategy": "channel", "dynamic": False},
                  "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                        "strategy": "token", "dynamic": True}}},
              "ignore": ["lm_head"]}
    args = interop.compressed_tensors.scheme_args(config)
    assert args["quantize_activation"] and args["ignore"] == ["lm_head"]
    assert args["importer"]["compression_format"] == "int-quantized"
    same = interop.from_compressed_tensors({"weight": q, "weight_scale": s}, **args["importer"])
    np.testing.assert_array_equal(np.asarray(same.w), np.asarray(qw.w))


def test_compressed_tensors_errors_name_the_argument():
    tensors, _ = _ct_fixture(16, 64, 4, 32, False)
    for fmt in ("sparse-24-bitmask", "marlin-24"):  # the float formats: test_interop_formats
        with pytest.raises(ValueError, match=f"compression_format: '{fmt}' is a compressed-"
                                             f"tensors format this importer does not read"):
            interop.from_compressed_tensors(tensors, num_bits=4, group_size=32,
                                            compression_format=fmt)
    with pytest.raises(ValueError, match="weight_zero_point: symmetric=False needs"):
        interop.from_compressed_tensors({k: v for k, v in tensors.items()
                                         if k != "weight_zero_point"},
                                        num_bits=4, group_size=32, symmetric=False)
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \[16, 4\] "
                                         r"\(group_size 16\), got \[16, 2\]"):
        interop.from_compressed_tensors(tensors, num_bits=4, group_size=16, symmetric=False)
    with pytest.raises(ValueError, match=r"weight_packed: expected shape \[16, 8\], got \[16, 4\]"):
        interop.from_compressed_tensors(dict(tensors, weight_packed=tensors["weight_packed"][:, :4]),
                                        num_bits=4, group_size=32, symmetric=False)
    with pytest.raises(KeyError, match="expected a 'weight_packed' entry"):
        interop.from_compressed_tensors({"weight_scale": tensors["weight_scale"]}, num_bits=4)
    with pytest.raises(ValueError, match="num_bits: expected 4 or 8, got 2"):
        interop.from_compressed_tensors(tensors, num_bits=2)
    # quantize_weight's min/max zero points are not whole numbers of scales.
    qw = xla_qops.quantize_weight(RNG.standard_normal((16, 64)).astype(np.float32), bits=4,
                                  block_size=32, symmetric=False)
    with pytest.raises(ValueError, match="zero points are not an integer number of scales"):
        interop.to_compressed_tensors(qw)
    approx = interop.to_compressed_tensors(qw, exact=False)
    assert approx.tensors["weight_zero_point"].dtype == np.int32


@pytest.fixture
def compressed_tensors_lib(torch):
    """compressed-tensors 0.15 (the last release for torch < 2.10; requirements-nodeps.txt)."""
    import compressed_tensors
    return compressed_tensors


def _their_decompress(tensors, config, fmt, torch):
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**config))
    state = {name: a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
             for name, a in tensors.items()}
    return BaseCompressor.load_from_registry(fmt).decompress(state, scheme)["weight"]


@pytest.mark.torch
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 128, True), (8, -1, False),
                                                  (4, -1, True)])
def test_compressed_tensors_library_reads_our_export(bits, group, symmetric,
                                                     compressed_tensors_lib, torch):
    """Their compressor packs, we import; we export, their decompressor reads
    it back. Equality is bit for bit where its arithmetic, done in the scale's
    dtype, is one float32 rounding like ours (float32 scales); with the bf16
    scales it writes, its own weight is ours rounded once more to bf16."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    n, k = 48, 256
    g = k if group == -1 else group
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = torch.randn(n, k).to(torch.bfloat16)
    s = (torch.rand(n, k // g) * 0.05 + 0.001).to(torch.bfloat16)
    z = None if symmetric else torch.randint(lo, hi + 1, (n, k // g), dtype=torch.int8)
    config = dict(num_bits=bits, type="int", symmetric=symmetric,
                  strategy="group" if group != -1 else "channel",
                  group_size=group if group != -1 else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**config))
    state = {"weight": w, "weight_scale": s}
    if z is not None:
        state["weight_zero_point"] = z
    packed = BaseCompressor.load_from_registry("pack-quantized").compress(state, scheme)
    assert packed["weight_packed"].dtype == torch.int32
    qw = interop.from_compressed_tensors(packed, **{k_: config[k_] for k_ in (
        "num_bits", "group_size", "symmetric", "strategy")})
    ours = np.asarray(qw.dequantize())
    as_f32 = {name: (t.float() if name == "weight_scale" else t).numpy()
              for name, t in packed.items()}
    np.testing.assert_array_equal(
        _their_decompress(as_f32, config, "pack-quantized", torch).numpy(), ours)
    their_bf16 = _their_decompress({name: t for name, t in packed.items()}, config,
                                   "pack-quantized", torch)
    assert their_bf16.dtype == torch.bfloat16
    np.testing.assert_array_equal(their_bf16.float().numpy(),
                                  torch.from_numpy(ours).to(torch.bfloat16).float().numpy())
    layer = interop.to_compressed_tensors(qw)
    again = _their_decompress(layer.tensors, layer.config, "pack-quantized", torch)
    np.testing.assert_array_equal(again.numpy(), ours)


def test_compressed_tensors_state_dict():
    """A two-layer compressed-tensors state dict (one W4A16 g32 asym layer, one
    int-quantized W8A8 layer under another config group) plus a norm."""
    up, w_up = _ct_fixture(32, 64, 4, 32, False, scale_dtype=np.float16)
    tensors = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in up.items()}
    tensors["model.norm.weight"] = np.ones(64, np.float32)
    config = {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "format": "pack-quantized",
        "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                    "group_size": 32}}}}
    importer = interop.compressed_tensors.scheme_args(config)["importer"]
    weights, others = interop.from_state_dict(tensors, "compressed-tensors", **importer)
    assert list(weights) == ["model.layers.0.mlp.up_proj"] and list(others) == ["model.norm.weight"]
    _assert_bits_equal(weights["model.layers.0.mlp.up_proj"], w_up.T)
    del tensors["model.layers.0.mlp.up_proj.weight_packed"], tensors["model.norm.weight"]
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.up_proj' \(compressed-tensors\) "
                                         r"lacks model.layers.0.mlp.up_proj.weight"):
        interop.from_state_dict(tensors, "compressed-tensors", **importer)


# ---------------------------------------------------------------- GGUF (ggml block formats)

GGML = gguf.GGMLQuantizationType


def _ggml_blocks(qtype, n, k, rng=RNG, tiny_min=False):
    """n x k values of `qtype` as random blocks with finite float16 fields."""
    values, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n * k // values, size), dtype=np.uint8)

    def put(offset, lo, hi):
        blocks[:, offset:offset + 2] = rng.uniform(lo, hi, (len(blocks), 1)).astype(
            np.float16).view(np.uint8)
    put(208 if qtype == GGML.Q6_K else 0, *((10, 60) if tiny_min else (1e-3, 0.05)))  # d
    if qtype in (GGML.Q4_1, GGML.Q5_1):
        # tiny_min: a normal float16 m about 20 binades below 8d, with all its bits.
        put(2, *((6.2e-5, 1.2e-4) if tiny_min else (-0.5, 0.5)))  # m
    if qtype == GGML.Q4_K:
        put(2, 1e-3, 0.05)  # dmin
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("name,bits,block", [
    ("Q8_0", 8, 32), ("Q4_0", 4, 32), ("Q4_1", 4, 32), ("Q5_0", 8, 32), ("Q5_1", 8, 32),
    ("Q4_K", 4, 32), ("Q6_K", 8, 16)])
def test_gguf_exact_against_gguf_dequantize(name, bits, block):
    qtype = GGML[name]
    n, k = 40, 512  # out not a multiple of 8
    # Random Q4_K bytes pair large scales with tiny mins now and then (see
    # test_gguf_q4_k_far_apart_min_needs_int8); quantized weights do not.
    data = _q4_k_blocks(RNG.standard_normal((n, k))) if name == "Q4_K" else _ggml_blocks(qtype, n, k)
    theirs = gguf.quants.dequantize(data, qtype)
    qw = interop.from_gguf(data, name, (n, k))
    assert (qw.bits, qw.block_size, qw.packed) == (bits, block, bits == 4)
    assert (qw.zero_point is None) == (name not in ("Q4_1", "Q5_1", "Q4_K"))
    _assert_bits_equal(qw, theirs.T)
    _assert_matmul(qw)
    wide = interop.from_gguf(data, qtype, (n, k), target_bits=8)  # always exact as int8
    _assert_bits_equal(wide, theirs.T)


def _q4_k_blocks(w, sc=None, m=None, d=None, dmin=None):
    """Q4_K blocks of float w [n, k] written from ggml's layout: per 256-value
    super-block fp16 d and dmin, 8 six-bit scales and mins packed in 12 bytes,
    then 4 chunks of 32 bytes (sub-block 2c in the low nibbles, 2c + 1 high).
    A plain min/max quantizer (not llama.cpp's search); sc, m, d, dmin override."""
    n, k = w.shape
    sub = w.reshape(-1, 8, 32)
    lo, hi = np.minimum(sub.min(-1), 0), np.maximum(sub.max(-1), 0)
    scale, mins = (hi - lo) / 15, -lo
    d = (scale.max(-1) / 63).astype(np.float16) if d is None else d
    dmin = (mins.max(-1) / 63).astype(np.float16) if dmin is None else dmin
    if sc is None:
        sc = np.clip(np.rint(scale / np.maximum(d.astype(np.float32), 1e-8)[:, None]), 1, 63)
        m = np.clip(np.rint(mins / np.maximum(dmin.astype(np.float32), 1e-8)[:, None]), 0, 63)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    eff_s = d.astype(np.float32)[:, None] * sc
    eff_m = dmin.astype(np.float32)[:, None] * m
    u = np.clip(np.rint((sub + eff_m[..., None]) / np.maximum(eff_s, 1e-8)[..., None]), 0, 15)
    u = u.astype(np.uint8)
    scales = np.zeros((len(sub), 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    qs = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(len(sub), 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                             scales, qs], axis=1)
    return blocks.reshape(n, -1)


def test_gguf_q4_k_far_apart_min_needs_int8():
    """A sub-block whose min dmin*m sits far below 8*d*sc: dmin*m - 8*d*sc is
    not a float32 number, so int4 is refused naming the exact int8 form."""
    w = RNG.standard_normal((1, 256))
    sc, m = np.full((1, 8), 63), np.full((1, 8), 1)
    data = _q4_k_blocks(w, sc=sc, m=m, d=np.array([0.0471], np.float16),
                        dmin=np.array([1.1e-4], np.float16))
    with pytest.raises(ValueError, match="GGUF Q4_K: .* target_bits=8 is exact"):
        interop.from_gguf(data, "Q4_K", (1, 256))
    _assert_bits_equal(interop.from_gguf(data, "Q4_K", (1, 256), target_bits=8),
                       gguf.quants.dequantize(data, GGML.Q4_K).T)


def test_gguf_quantized_by_gguf_py():
    x = RNG.standard_normal((24, 256)).astype(np.float32)
    for qtype in (GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1):
        data = gguf.quants.quantize(x, qtype)
        _assert_bits_equal(interop.from_gguf(data, qtype, x.shape),
                           gguf.quants.dequantize(data, qtype).T)


def test_gguf_q4_0_layout_from_the_spec():
    """One Q4_0 block written by hand: fp16 d, then 16 bytes whose low nibbles
    are values 0-15 and high nibbles 16-31; w = d * (q - 8)."""
    u = RNG.integers(0, 16, 32)
    d = np.float16(0.03125)
    block = np.concatenate([np.array([d]).view(np.uint8),
                            (u[:16] | (u[16:] << 4)).astype(np.uint8)])
    qw = interop.from_gguf(block, "Q4_0", (1, 32))
    np.testing.assert_array_equal(np.asarray(qw.dequantize())[0],
                                  np.float32(d) * (u - 8).astype(np.float32))


def test_gguf_q4_1_tiny_min_needs_int8():
    """m + 8d is not a float32 number when m is ~20 binades below 8d: int4 is
    refused with the exact alternative named; int8 (q = u, zero_point = -m) is exact."""
    data = _ggml_blocks(GGML.Q4_1, 8, 64, tiny_min=True)
    with pytest.raises(ValueError, match="GGUF Q4_1: .* target_bits=8 is exact"):
        interop.from_gguf(data, "Q4_1", (8, 64))
    _assert_bits_equal(interop.from_gguf(data, "Q4_1", (8, 64), target_bits=8),
                       gguf.quants.dequantize(data, GGML.Q4_1).T)


def test_gguf_errors_name_the_argument():
    data = _ggml_blocks(GGML.Q4_0, 4, 64)
    with pytest.raises(ValueError, match="ggml_type: Q2_K is a ggml type with no int4/int8"):
        interop.from_gguf(data, "Q2_K", (4, 64))
    with pytest.raises(ValueError, match="ggml_type: F16 is unquantized"):
        interop.from_gguf(data, GGML.F16, (4, 64))
    with pytest.raises(ValueError, match="ggml_type: 'Q9_9' is not a ggml type"):
        interop.from_gguf(data, "Q9_9", (4, 64))
    with pytest.raises(ValueError, match=r"data: Q4_0 \[4, 96\] takes 216 bytes, got 144"):
        interop.from_gguf(data, "Q4_0", (4, 96))
    with pytest.raises(ValueError, match="in=48 is not a multiple"):
        interop.from_gguf(data, "Q4_0", (4, 48))
    with pytest.raises(ValueError, match="target_bits: expected one of \\[8\\]"):
        interop.from_gguf(_ggml_blocks(GGML.Q6_K, 2, 256), "Q6_K", (2, 256), target_bits=4)


def test_read_gguf_file(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    q4k = _q4_k_blocks(RNG.standard_normal((16, 256)))
    q8 = _ggml_blocks(GGML.Q8_0, 8, 64)
    q2k = _ggml_blocks(GGML.Q2_K, 4, 256)
    norm = RNG.standard_normal(256).astype(np.float32)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.ffn_up.weight", q4k, raw_dtype=GGML.Q4_K)
    writer.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=GGML.Q8_0)
    writer.add_tensor("output_norm.weight", norm)
    writer.add_tensor("blk.0.ffn_gate.weight", q2k, raw_dtype=GGML.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"1 tensors of types with no int4/int8 form here: "
                                         r"blk.0.ffn_gate.weight \(Q2_K, shape \[4, 256\]\)"):
        interop.read_gguf(path)
    weights, others, metadata = interop.read_gguf(path, dequantize_unsupported=True)
    assert sorted(weights) == ["blk.0.attn_q.weight", "blk.0.ffn_up.weight"]
    _assert_bits_equal(weights["blk.0.ffn_up.weight"], gguf.quants.dequantize(q4k, GGML.Q4_K).T)
    _assert_bits_equal(weights["blk.0.attn_q.weight"], gguf.quants.dequantize(q8, GGML.Q8_0).T)
    np.testing.assert_array_equal(others["output_norm.weight"], norm)
    np.testing.assert_array_equal(others["blk.0.ffn_gate.weight"],
                                  gguf.quants.dequantize(q2k, GGML.Q2_K))
    assert metadata["general.architecture"] == "llama" and metadata["llama.block_count"] == 1


def test_read_checkpoint_detects_awq_and_gptq_by_shape(tmp_path):
    """No config.json: GPTQ packs along in ([K/8, N]), AWQ along out ([K, N/8])."""
    from safetensors.numpy import save_file
    k, n, g = 256, 48, 64
    codes, zeros = RNG.integers(0, 16, (k, n)), RNG.integers(0, 16, (k // g, n))
    scales = _f16((k // g, n))
    save_file({"m.qweight": _awq_pack(codes), "m.qzeros": _awq_pack(zeros), "m.scales": scales,
               "norm.weight": np.ones(4, np.float32)}, str(tmp_path / "awq.safetensors"))
    ckpt = interop.read_checkpoint(tmp_path / "awq.safetensors")
    assert ckpt.format == "awq" and list(ckpt.tensors) == ["norm.weight"]
    w = np.repeat(scales.astype(np.float32), g, 0) * (codes - np.repeat(zeros, g, 0))
    _assert_bits_equal(ckpt.weights["m"], w.astype(np.float32))
    tensors, w = _gptq_fixture(k, n, g, 4, 1)
    (tmp_path / "gptq").mkdir()
    save_file({f"m.{name}": np.ascontiguousarray(a) for name, a in tensors.items()},
              str(tmp_path / "gptq" / "model.safetensors"))
    ckpt = interop.read_checkpoint(tmp_path / "gptq")
    assert ckpt.format == "gptq" and not ckpt.quantize_activation["m"]
    _assert_bits_equal(ckpt.weights["m"], w)
