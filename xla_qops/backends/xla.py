"""Fused pure-XLA implementation: runs on every backend XLA has.

The scale and zero point are applied to the *output* of an integer-weight
contraction instead of to the weight, so no float weight is formed for
per-channel weights:

    y = (x @ q.T) * scale - (sum_k x) * zero_point

Packed int4 is unpacked in the graph with shifts (`xla_qops.packing`); the
low nibbles (even input features) and high nibbles (odd ones) are contracted
against ``x[:, 0::2]`` and ``x[:, 1::2]`` separately, so the nibbles are never
interleaved back into a full-size int8 weight.

Blockwise weights ``[in/B, B, out]`` need one scale per block and output:

* ``M <= B`` (decode): a dot batched over blocks, ``[in/B, M, out]`` partial
  sums scaled and reduced. That intermediate is no bigger than the weight.
* ``M > B`` (prefill): the intermediate would outgrow the weight, so the
  weight is dequantized (a fusion XLA can feed into the dot) and one matmul
  is done.

With ``quantize_activation`` the products are int8 x int8 with int32
accumulation and both scales are applied to the int32 sums.

Float element formats (API.md section 7) take the same paths: an fp8
weight's e4m3fn values, like int8's integers, are exact in every activation
dtype; fp4's e2m1 codes are widened to e4m3fn with bit arithmetic
(`pallas_kernels.formats`), low and high nibbles apart as for int4. With fp8
activations (or float weights and int8 activations) every product of the two
quantized operands is exact in float32, which is what they are multiplied and
accumulated in.

What the products are computed in depends on the platform, chosen when the
function is lowered (`lax.platform_dependent`; `matmul` receives the platform
when dispatch already knows it):

* bfloat16 x on TPU and GPUs, float16 x on GPUs: the integer weight is
  converted to x's dtype, which holds every int8 and int4 value exactly, and
  the dots multiply in that dtype with float32 accumulation
  (``preferred_element_type=float32``, default precision): the products are
  exact, so the result is that of the float32 formula up to summation order,
  at the MXU's / tensor cores' native rate. Blockwise prefill multiplies the
  float32-dequantized weight split exactly into three bfloat16 terms
  (``w = t1 + t2 + t3``; 3 x 8 significand bits cover float32's 24) in one
  dot with K tripled, so no float32 dot is needed there either.
* float32 x everywhere, float16 x on TPU (which has no float16 MXU), and
  every dtype on the host CPU (where XLA's bf16 dots are far slower than its
  float32 ones): float32 operands at ``precision=HIGHEST``.

The backward (`vjp`, the custom VJP of `xla_qops.quantized_matmul` for every
impl) follows the same per-platform plan. With float32 products it is JAX's
transpose of the float32 formula. With bf16 / f16 products it is written out,
so that no weight-sized dot sees a float32 operand (JAX's transpose would
contract the float32 cotangent of the float32 accumulation against the weight
promoted to float32: a float32 copy of the weight per training step):

* dx, per-channel and blockwise decode: ``dx = (g * scale) @ q`` per block,
  minus ``(g @ zero_point.T)`` broadcast over the block's features. The
  scale varies along the contracted ``out`` axis, so it goes with the
  cotangent (``[M, out]`` per block, no bigger than the weight for M <= B),
  which is rounded once to x's dtype (after dividing by a power of two >= the
  block's largest |scale|, exact, so that float16 neither underflows nor
  overflows); the integer weight is exact in that dtype and the dot
  accumulates in float32. The rounding is that of a bf16 / f16
  ``nn.Linear``'s backward, whose float weight is rounded the same way.
* dx, blockwise prefill: ``g @ w.T`` with ``w = scale * q - zero_point``
  dequantized (in float32, as the forward's prefill) and rounded once to x's
  dtype; ``g`` is exact in it. (The per-block scaled cotangent would be
  ``[in/B, M, out]``, larger than the weight for M > B.)
* dscale, dzero_point: from the forward's partial sums ``x @ q`` per block
  (per-channel, decode), or from ``x.T @ g`` (prefill: both operands exact in
  x's dtype, float32 accumulation); the zero point's from the per-block
  activation sums.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from xla_qops import packing
from pallas_kernels import formats
from xla_qops.activation import quantize_activation_as

_HIGHEST = lax.Precision.HIGHEST
# platform_dependent's names; an unknown platform gets the float32 plan.
PLATFORMS = ("cpu", "tpu", "cuda", "rocm")
_GPUS = ("cuda", "rocm")


def available() -> bool:
    return True


def supports(spec, platform) -> bool:
    del spec, platform
    return True


def product_dtype(x_dtype: str, platform: str | None):
    """The dtype A16 products are computed in on `platform`: x's own dtype
    where that is exact and native (module docstring), else float32."""
    if x_dtype == "bfloat16" and platform in ("tpu",) + _GPUS:
        return jnp.bfloat16
    if x_dtype == "float16" and platform in _GPUS:
        return jnp.float16
    return jnp.float32


def _weight_pairs(x, w, spec):
    """Splits the contraction into (activation part, int8 weight part) pairs.

    Blockwise: x [M, nb, B'] with weight parts [nb, B', N]; per-channel:
    x [M, K'] with weight parts [N, K']. For int4, B' / K' are halved: even
    input features pair with the low nibbles, odd ones with the high nibbles.
    """
    m = x.shape[0]
    if spec.blockwise:
        x = x.reshape(m, spec.n_blocks, spec.block_size)
    if spec.bits == 8:
        return [(x, w)]  # int8, or fp8 (e4m3fn: exact in every activation dtype)
    if spec.weight_format == "fp4":
        # e2m1 codes widened to e4m3fn (exact), low and high nibbles apart.
        low, high = formats.fp4_to_fp8(w & 0xF), formats.fp4_to_fp8(w >> 4)
    elif spec.packed:
        low, high = packing.unpack_int4_halves(w)
    else:
        # Unpacked int4 is split the same way so that both int4 forms sum in the
        # same order and give bit-identical results.
        axis = packing.input_axis(spec.blockwise)
        low, high = (lax.slice_in_dim(w, start, None, 2, axis % w.ndim) for start in (0, 1))
    return [(x[..., 0::2], low), (x[..., 1::2], high)]


def _contract(pairs, spec, operand_dtype, acc_dtype):
    """Sum over pairs of the integer-weight contraction.

    Per-channel: [M, N]. Blockwise: [nb, M, N] (one partial sum per block).
    """
    # float32 operands need HIGHEST (else TPUs and GPUs round them to bf16 /
    # tf32); bf16, f16 and int8 operands are exact at the default precision.
    precision = _HIGHEST if operand_dtype == jnp.float32 else None
    total = None
    for x_part, q_part in pairs:
        a, b = x_part.astype(operand_dtype), q_part.astype(operand_dtype)
        if spec.blockwise:
            # a [M, nb, B'] . b [nb, B', N] -> [nb, M, N], batched over blocks.
            dims = (((2,), (1,)), ((1,), (0,)))
        else:
            # a [M, K'] . b [N, K'] -> [M, N].
            dims = (((1,), (1,)), ((), ()))
        part = lax.dot_general(a, b, dims, precision=precision,
                               preferred_element_type=acc_dtype)
        total = part if total is None else total + part
    return total


def _dequantized_parts(pairs, scale, zero_point):
    """(x part [M, K'], float32 weight part [K', N]) of a blockwise weight."""
    for x_part, q_part in pairs:
        w_part = q_part.astype(jnp.float32) * scale[:, None, :]
        if zero_point is not None:
            w_part = w_part - zero_point[:, None, :]
        yield x_part.reshape(x_part.shape[0], -1), w_part.reshape(-1, w_part.shape[-1])


def _dequantized_matmul(pairs, scale, zero_point):
    """Blockwise prefill: dequantize each weight part, then one f32 matmul."""
    total = None
    for x_part, w_part in _dequantized_parts(pairs, scale, zero_point):
        part = lax.dot_general(x_part.astype(jnp.float32), w_part, (((1,), (0,)), ((), ())),
                               precision=_HIGHEST, preferred_element_type=jnp.float32)
        total = part if total is None else total + part
    return total


def _leading_bf16(v):
    """The float32 `v` cut to its top 8 significand bits (exactly a bfloat16).

    A bit mask rather than a bf16 round trip: XLA may elide a f32 -> bf16 ->
    f32 conversion pair (excess precision), a mask it cannot.
    """
    bits = lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0xFFFF0000)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _bf16_split_matmul(pairs, scale, zero_point):
    """Blockwise prefill in bf16: x @ (t1 + t2 + t3) for w = t1 + t2 + t3 exactly.

    t1 holds w's top 8 significand bits, t2 the next 8 of the rest, t3 what
    is left (at most 8 bits: exact in bf16, as t1 and t2 are); the
    differences are exact in float32. One bf16 dot with K tripled and
    float32 accumulation then gives the float32 formula up to summation order.
    """
    total = None
    for x_part, w_part in _dequantized_parts(pairs, scale, zero_point):
        t1 = _leading_bf16(w_part)
        rest = w_part - t1
        t2 = _leading_bf16(rest)
        t3 = rest - t2
        w3 = jnp.concatenate([t1, t2, t3], axis=0).astype(jnp.bfloat16)  # [3K', N]
        x3 = jnp.tile(x_part.astype(jnp.bfloat16), (1, 3))  # [M, 3K']
        part = lax.dot_general(x3, w3, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
        total = part if total is None else total + part
    return total


def _reduce_blocks(subscripts, *operands):
    """The scaled sum of per-block partials [nb, M, N] over the blocks.

    A float32 contraction over the K/B blocks only (the weight has been
    contracted already). A dot rather than a multiply-and-reduce: XLA:CPU's
    reduction order depends on the output width, a dot's does not, which
    keeps column-parallel shards bit-identical to one device.
    """
    return jnp.einsum(subscripts, *operands, precision=_HIGHEST)


def _matmul(x, w, scale, zero_point, spec, products):
    m = x.shape[0]
    scale = scale.astype(jnp.float32)
    zero_point = None if zero_point is None else zero_point.astype(jnp.float32)

    if spec.quantize_activation:
        x_q, x_scale = quantize_activation_as(spec.activation_format, x, spec.block_size)
        if spec.float_format:
            # e4m3fn activations, or float weights: every product of the two
            # quantized operands is exact in float32 (at most 8 x 4 significand
            # bits), so float32 operands at HIGHEST with float32 accumulation.
            acc = _contract(_weight_pairs(x_q, w, spec), spec, jnp.float32, jnp.float32)
        else:
            acc = _contract(_weight_pairs(x_q, w, spec), spec, jnp.int8, jnp.int32)
            acc = acc.astype(jnp.float32)
        # Activation sum per group in the quantized domain (for the zero point;
        # int8 sums are exact in float32 up to K = 2**24 / 127).
        x_sum = x_q.astype(jnp.float32).reshape(m, x_scale.shape[1], -1).sum(-1)
        x_sum = x_sum * x_scale  # [M, groups]
        if spec.blockwise:
            y = _reduce_blocks("bmn,mb,bn->mn", acc, x_scale, scale)
        else:
            y = acc * x_scale * scale[None, :]
    else:
        x_sum = x.astype(jnp.float32).reshape(m, spec.n_blocks, -1).sum(-1)  # [M, groups]
        pairs = _weight_pairs(x, w, spec)
        if spec.blockwise and m > spec.block_size:
            prefill = _bf16_split_matmul if products == jnp.bfloat16 else _dequantized_matmul
            y = prefill(pairs, scale, zero_point)
            zero_point = None  # already in the dequantized weight
        else:
            acc = _contract(pairs, spec, products, jnp.float32)
            y = _reduce_blocks("bmn,bn->mn", acc, scale) if spec.blockwise else acc * scale[None, :]

    if zero_point is not None:
        zp = zero_point if spec.blockwise else zero_point[None, :]  # [groups, N]
        # [M, groups] x [groups, N]: a contraction over K/B (or 1) terms only.
        y = y - lax.dot_general(x_sum, zp, (((1,), (0,)), ((), ())), precision=_HIGHEST)
    return y.astype(x.dtype)


def matmul(x, w, scale, zero_point, spec, platform=None):
    """The fused formula; products per `platform` (module docstring).

    `platform` None: chosen when the function is lowered, per platform.
    """
    if platform is not None or spec.quantize_activation:
        return _matmul(x, w, scale, zero_point, spec, product_dtype(spec.x_dtype, platform))
    plans = {p: product_dtype(spec.x_dtype, p) for p in PLATFORMS}
    if len(set(plans.values())) == 1:
        return _matmul(x, w, scale, zero_point, spec, plans["cpu"])
    branches = {p: functools.partial(_matmul, spec=spec, products=d) for p, d in plans.items()}
    return lax.platform_dependent(
        x, w, scale, zero_point,
        default=functools.partial(_matmul, spec=spec, products=jnp.float32), **branches)


# ---------------------------------------------------------------------- backward

def vjp(x, w, scale, zero_point, spec, g, platform=None):
    """(dx, dscale, dzero_point) of the float formula (`matmul` without
    activation quantization: straight-through) for the cotangent `g`
    (``[M, out]``, x's dtype); dzero_point is None without a zero point.

    Products per `platform` as in `matmul` (module docstring); `platform`
    None: chosen when the function is lowered.
    """
    spec = dataclasses.replace(spec, quantize_activation=False)
    if platform is not None:
        return _vjp(x, w, scale, zero_point, g, spec=spec,
                    products=product_dtype(spec.x_dtype, platform))
    plans = {p: product_dtype(spec.x_dtype, p) for p in PLATFORMS}
    if len(set(plans.values())) == 1:
        return _vjp(x, w, scale, zero_point, g, spec=spec, products=plans["cpu"])
    branches = {p: functools.partial(_vjp, spec=spec, products=d) for p, d in plans.items()}
    return lax.platform_dependent(
        x, w, scale, zero_point, g,
        default=functools.partial(_vjp, spec=spec, products=jnp.float32), **branches)


def _vjp(x, w, scale, zero_point, g, spec, products):
    if products == jnp.float32:
        # JAX's transpose of the float32 formula: float32 operands at HIGHEST.
        def forward(x, scale, zero_point):
            return _matmul(x, w, scale, zero_point, spec, jnp.float32)

        _, pullback = jax.vjp(forward, x, scale, zero_point)
        return pullback(g)
    return _low_precision_vjp(x, w, scale, zero_point, g, spec, products)


def _power_of_two_above(v):
    """2**e >= v for v >= 0 (1 for 0): dividing by it is exact."""
    _, exponent = jnp.frexp(v)
    return jnp.ldexp(jnp.ones_like(v), exponent)


def _interleave(parts, m):
    """dx parts [M, groups, K'] (one, or even/odd features) -> [M, K]."""
    dx = parts[0] if len(parts) == 1 else jnp.stack(parts, axis=-1)
    return dx.reshape(m, -1)


def _low_precision_vjp(x, w, scale, zero_point, g, spec, products):
    """The backward with bf16 / f16 operands for every weight-sized dot
    (module docstring)."""
    m = x.shape[0]
    s = scale.astype(jnp.float32)
    zp = None if zero_point is None else zero_point.astype(jnp.float32)
    g32 = g.astype(jnp.float32)
    g_p = g.astype(products)  # g has x's dtype: exact
    pairs = _weight_pairs(x, w, spec)
    # [groups, out] (groups = in/B, or 1 per-channel)
    s_groups = s if spec.blockwise else s[None, :]

    if spec.blockwise and m > spec.block_size:
        # Prefill: g @ w.T with w dequantized to x's dtype; x.T @ g for dscale.
        dx_parts, dscale = [], 0.0
        for x_part, q_part in pairs:
            q_part = q_part.astype(jnp.float32)
            w_part = q_part * s[:, None, :]
            if zp is not None:
                w_part = w_part - zp[:, None, :]
            w_part = w_part.astype(products)  # [nb, B', N], rounded once
            # g [M, N] . w [nb, B', N] -> [M, nb, B']
            dx_parts.append(lax.dot_general(g_p, w_part, (((1,), (2,)), ((), ())),
                                            preferred_element_type=jnp.float32))
            # x [M, nb, B'] . g [M, N] -> [nb, B', N]
            dw = lax.dot_general(x_part.astype(products), g_p, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            dscale = dscale + jnp.sum(dw * q_part, axis=1)
        dx = _interleave(dx_parts, m)
    else:
        # Per-channel and blockwise decode: (g * scale) @ q per block.
        c = _power_of_two_above(jnp.max(jnp.abs(s_groups), axis=1))  # [groups]
        gs = (g32[None] * (s_groups / c[:, None])[:, None, :]).astype(products)  # [groups, M, N]
        dx_parts = []
        for _, q_part in pairs:
            q_part = q_part.astype(products)
            if spec.blockwise:
                # gs [nb, M, N] . q [nb, B', N] -> [nb, M, B'], batched over blocks.
                part = lax.dot_general(gs, q_part, (((2,), (2,)), ((0,), (0,))),
                                       preferred_element_type=jnp.float32)
            else:
                # gs [M, N] . q [N, K'] -> [1, M, K'].
                part = lax.dot_general(gs[0], q_part, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)[None]
            dx_parts.append(jnp.transpose(part * c[:, None, None], (1, 0, 2)))
        dx = _interleave(dx_parts, m)
        if zp is not None:
            zp_groups = zp if spec.blockwise else zp[None, :]
            # [M, N] x [groups, N] -> [M, groups]: a contraction over out only.
            shift = lax.dot_general(g32, zp_groups, (((1,), (1,)), ((), ())), precision=_HIGHEST)
            dx = (dx.reshape(m, spec.n_blocks, -1) - shift[:, :, None]).reshape(m, -1)
        acc = _contract(pairs, spec, products, jnp.float32)  # the forward's partial sums
        if spec.blockwise:
            dscale = _reduce_blocks("bmn,mn->bn", acc, g32)
        else:
            dscale = jnp.sum(acc * g32, axis=0)

    dzero = None
    if zero_point is not None:
        x_sum = x.astype(jnp.float32).reshape(m, spec.n_blocks, -1).sum(-1)  # [M, groups]
        # -(x_sum.T @ g): [groups, N], a contraction over M.
        dzero = -lax.dot_general(x_sum, g32, (((0,), (0,)), ((), ())), precision=_HIGHEST)
        dzero = dzero.reshape(zero_point.shape).astype(zero_point.dtype)
    return dx.astype(x.dtype), dscale.reshape(scale.shape).astype(scale.dtype), dzero
