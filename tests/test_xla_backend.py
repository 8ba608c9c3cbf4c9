"""The fused XLA backend multiplies in the activation dtype on accelerators.

* Lowering (StableHLO of ``jax.export`` for tpu and cuda, from this CPU):
  with bfloat16 x every dot that carries the weight multiplies bf16 by bf16
  into float32 at default precision, and no float32 copy of the weight exists
  (per-channel, blockwise decode); blockwise prefill splits the float32
  weight into three bf16 terms for one bf16 dot. float16 x does the same on
  CUDA, and stays float32 on TPU (no f16 MXU). float32 x, and the host CPU,
  keep float32 operands at HIGHEST precision.
* Numerics: each platform's plan, run here on the CPU (XLA:CPU executes bf16
  and f16 dots too), against the float64 reference for every scheme row,
  decode and prefill, on both JAX versions; and the gradient through it.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import numpy_reference as ref
import xla_qops
from cases import Scheme, all_schemes, make_weight, make_x
from pallas_kernels import shapes
from xla_qops.backends import xla as backend
from xla_qops.spec import check_args

S = jax.ShapeDtypeStruct
DOT = re.compile(r"stablehlo\.dot_general (.*?) : \((tensor<[^>]*>), (tensor<[^>]*>)\) "
                 r"-> (tensor<[^>]*>)")
K, N = shapes.LLAMA3_8B[1]  # 4096 -> 14336


def element(tensor_type: str) -> str:
    return tensor_type.rsplit("x", 1)[-1].rstrip(">")


def dots(text):
    """(attributes, lhs, rhs, result) of every dot_general in a module."""
    return DOT.findall(text)


def contraction_sizes(attrs, lhs):
    """Sizes of the lhs dims a dot_general contracts."""
    dims = [int(d) for d in re.search(r"contracting_dims = \[([0-9, ]*)\]", attrs)
            .group(1).split(",") if d.strip()]
    shape = [int(d) for d in lhs[len("tensor<"):].split("x")[:-1]]
    return [shape[d] for d in dims]


def avals(m, bits, block_size, x_dtype, zero_point=True):
    p = 2 if bits == 4 else 1
    w_dtype = jnp.uint8 if bits == 4 else jnp.int8
    if block_size == -1:
        w, s = S((N, K // p), w_dtype), S((N,), jnp.float32)
    else:
        w, s = S((K // block_size, block_size // p, N), w_dtype), S((K // block_size, N),
                                                                     jnp.float32)
    return S((m, K), x_dtype), w, s, (s if zero_point else None)


def lowered(platform, m, bits, block_size, x_dtype, qa=False):
    def fn(x, w, s, z):
        return xla_qops.quantized_matmul(x, w, s, z, block_size, bits == 4, qa, impl="xla")
    args = avals(m, bits, block_size, x_dtype)
    if platform == "cpu":
        return jax.jit(fn).lower(*args).as_text()
    return export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def weight_sized_f32(text, bits, block_size):
    """Float32 tensors with as many elements as the (logical) weight half or
    whole: a float32 copy of the weight."""
    sizes = {K * N, K * N // 2}
    found = []
    for t in re.findall(r"tensor<([0-9x]+)xf32>", text):
        if int(np.prod([int(d) for d in t.split("x")])) in sizes:
            found.append(t)
    return found


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("bits,block_size,m", [(8, -1, 1), (4, -1, 256), (8, 128, 1),
                                               (4, 128, 16)])
def test_bf16_products_on_accelerators(platform, bits, block_size, m):
    """Per-channel (any M) and blockwise decode: bf16 x bf16 -> f32 weight
    dots at default precision, no float32 weight; the only float32 dots
    contract over the K/B blocks (or 1 term): the blocks' scaled partial sums
    and the zero-point correction."""
    text = lowered(platform, m, bits, block_size, jnp.bfloat16)
    weight_dots = [d for d in dots(text) if element(d[1]) == "bf16"]
    assert weight_dots and all(element(d[2]) == "bf16" and element(d[3]) == "f32"
                               and "HIGHEST" not in d[0] for d in weight_dots), weight_dots
    groups = 1 if block_size == -1 else K // block_size
    for attrs, lhs, rhs, out in dots(text):
        if element(lhs) == "f32":
            assert contraction_sizes(attrs, lhs) == [groups], (attrs, lhs, rhs)
    assert not weight_sized_f32(text, bits, block_size)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_blockwise_prefill_uses_a_three_term_bf16_weight(platform):
    text = lowered(platform, 256, 4, 128, jnp.bfloat16)
    weight_dots = [d for d in dots(text) if element(d[1]) == "bf16"]
    # Two nibble halves, each one dot over 3 x K/2 features.
    assert len(weight_dots) == 2
    assert all(f"x{3 * K // 2}xbf16" in d[1] and element(d[3]) == "f32" for d in weight_dots)


def test_float16_products_on_cuda_not_on_tpu():
    cuda = [d for d in dots(lowered("cuda", 16, 8, -1, jnp.float16)) if element(d[1]) != "f32"]
    assert cuda and all(element(d[1]) == element(d[2]) == "f16" for d in cuda)
    tpu = dots(lowered("tpu", 16, 8, -1, jnp.float16))
    assert tpu and all(element(d[1]) == "f32" and "HIGHEST" in d[0] for d in tpu)


@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
def test_float32_x_keeps_float32_at_highest_precision(platform):
    found = dots(lowered(platform, 16, 4, 128, jnp.float32))
    assert found and all(element(d[1]) == element(d[2]) == "f32" and "HIGHEST" in d[0]
                         for d in found)


def test_host_cpu_multiplies_in_float32():
    """XLA:CPU's bf16 dots are far slower than its f32 ones."""
    found = dots(lowered("cpu", 16, 8, -1, jnp.bfloat16))
    assert found and all(element(d[1]) == "f32" and "HIGHEST" in d[0] for d in found)


@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
def test_product_dtype_table(platform):
    expected = {"cpu": ("float32", "float32"), "tpu": ("bfloat16", "float32"),
                "cuda": ("bfloat16", "float16")}[platform]
    got = tuple(jnp.dtype(backend.product_dtype(d, platform)).name
                for d in ("bfloat16", "float16"))
    assert got == expected
    assert backend.product_dtype("float32", platform) == jnp.float32


# ---- numerics of every plan, executed on this CPU

PLAN_SCHEMES = [s for s in all_schemes(block_size=32)
                if not s.quantize_activation and (s.packed or s.bits == 8)]


@pytest.mark.parametrize("platform,x_dtype", [("tpu", "bfloat16"), ("cuda", "float16"),
                                              ("cuda", "bfloat16")])
@pytest.mark.parametrize("scheme", PLAN_SCHEMES, ids=lambda s: s.id)
@pytest.mark.parametrize("m", [3, 40])  # blockwise: decode (M <= B) and prefill (M > B)
def test_accelerator_plans_match_the_reference(platform, x_dtype, scheme, m):
    rng = np.random.default_rng(m)
    qw = make_weight(rng, n=48, k=256, scheme=scheme)
    x = make_x(rng, (m, 256), x_dtype)
    spec = check_args(x, qw.w, qw.scale, qw.zero_point, qw.block_size, qw.int4_weight, False)
    y = jax.jit(lambda x: backend.matmul(x, qw.w, qw.scale, qw.zero_point, spec, platform))(x)
    assert y.dtype == x.dtype
    ref.assert_close(y, x, qw.w, qw.scale, qw.zero_point, qw.block_size)


def test_three_term_split_is_exact():
    """t1 + t2 + t3 == w in float32 for every float32 w of a normal range,
    each term exactly representable in bf16."""
    rng = np.random.default_rng(0)
    w = jnp.asarray((rng.standard_normal(1 << 16) * np.exp(rng.uniform(-20, 20, 1 << 16)))
                    .astype(np.float32))
    t1 = backend._leading_bf16(w)
    t2 = backend._leading_bf16(w - t1)
    t3 = (w - t1) - t2
    for t in (t1, t2, t3):
        np.testing.assert_array_equal(np.asarray(t.astype(jnp.bfloat16).astype(jnp.float32)),
                                      np.asarray(t))
    np.testing.assert_array_equal(np.asarray((t1 + t2) + t3), np.asarray(w))


def test_gradient_through_the_bf16_prefill_plan():
    """d/dx sum(y * c) = c @ W through the three-term split (its bit masks
    carry no gradient; the terms sum to w, and so do their gradients)."""
    rng = np.random.default_rng(5)
    scheme = Scheme(4, 32, False, True, False)
    qw = make_weight(rng, n=24, k=64, scheme=scheme)
    x = make_x(rng, (40, 64), "float32").astype(jnp.bfloat16)
    c = rng.standard_normal((40, 24))
    spec = check_args(x, qw.w, qw.scale, qw.zero_point, 32, True, False)

    def loss(x, scale):
        y = backend.matmul(x, qw.w, scale, qw.zero_point, spec, "tpu")
        return jnp.sum(y.astype(jnp.float32) * c)

    dx, dscale = jax.grad(loss, argnums=(0, 1))(x, qw.scale)
    # y is bf16, so its cotangent is bf16(c): each c off by up to u = 2^-8 of
    # itself; the gradients the bf16 operands produce are bf16 too (dx like x,
    # and dL/dw = x^T g before the scale's chain rule), each rounded once to
    # within u of itself. The split terms' products are exact and summed in
    # float32 ((n + 2) 2^-24 of the sum of |terms|). So every element is off by
    # at most u times its sum of |terms| plus u times what was rounded to bf16
    # (measured: dx up to 0.77 of this, mostly its own bf16 rounding; dscale
    # 0.07). The leading term t1 dropped or counted twice by the masks would be
    # off by its whole size.
    u = 2.0 ** -8
    w64 = ref.dequantize(qw.w, qw.scale, qw.zero_point, 32, True)
    dx_ref = c @ w64
    dx_terms = np.abs(c) @ np.abs(w64)
    dx_bound = u * dx_terms + u * np.abs(dx_ref) + (24 + 2) * 2.0 ** -24 * dx_terms
    dx_err = np.abs(np.asarray(dx, np.float64) - dx_ref)
    assert np.all(dx_err <= dx_bound), (dx_err / dx_bound).max()
    # d/dscale[b, n] = sum_m c[m, n] * sum_{k in b} x[m, k] q[k, n]
    q = ref.unpack_int4(np.asarray(qw.w), 1).astype(np.float64)  # [K/B, B, N]
    xb = np.asarray(x, np.float64).reshape(40, 2, 32)
    expected = np.einsum("mn,mbk,bkn->bn", c, xb, q)
    ds_terms = np.einsum("mn,mbk,bkn->bn", np.abs(c), np.abs(xb), np.abs(q))
    dw = np.abs(np.einsum("mn,mbk->bkn", c, xb))  # |dL/dw| before its bf16 rounding
    ds_bound = (u * ds_terms + u * np.einsum("bkn,bkn->bn", np.abs(q), dw)
                + (40 + 32 + 2) * 2.0 ** -24 * ds_terms)
    ds_err = np.abs(np.asarray(dscale, np.float64) - expected)
    assert np.all(ds_err <= ds_bound), (ds_err / ds_bound).max()
