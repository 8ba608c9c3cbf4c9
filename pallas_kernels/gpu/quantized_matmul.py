"""Quantized matmul GPU kernels (Pallas on Triton): W8A16 and W4A16 (+ A8), fp8 / fp4.

Same problem and algebra as the TPU kernel (`pallas_kernels.reference`):
``y[M, N] = x_hat[M, K] @ (scale * q - zero_point).T`` with the scale applied
to partial sums and the zero point folded in through a running activation sum.
Packed int4 (uint8, two features per byte along K, even feature in the low
nibble) is loaded as bytes and unpacked in registers; the even/odd activation
parts of the prologue (`pallas_kernels.operands`) meet the low/high nibbles.
The pure-JAX statement of the algebra is `pallas_kernels.reference`.

Float formats (API.md section 7): fp8 weights (float8_e4m3fn, int8's shapes)
and fp4 (uint8, two e2m1 codes per byte, walked as packed int4); with fp8
activations x is quantized per token (and block) to e4m3fn in the prologue
(`formats.quantize_activation_fp8`). The dot's operands are
`block_sizes.gpu_operands` of the target GPU (`device_kind`):

  fp8 tensor cores (Hopper sm_90; Ada, Blackwell): A8-fp8 with an fp8 / fp4
      weight multiplies e4m3fn x e4m3fn (fp4 codes become e4m3fn in
      registers with integer ops and a bitcast), float32 accumulation.
  otherwise, and A16 everywhere (Triton's dot takes one operand type): the
      e4m3fn / e2m1 tiles are decoded in registers by their bits to x's
      dtype (bf16 for quantized activations) -- integer ops only, since
      Triton converts no float8 before sm_89.

Memory (global) layouts, from `pallas_kernels.operands` (``p`` = 2 packed,
else 1; ``Ks = K/p``; ``Bs = B/p``):

  per-channel: xs [p, M, Ks], w [N, Ks], scale/zero [1, N], x_scale [M, 1]
  blockwise:   xs [p, K/B, M, Bs], w [K/B, Bs, N], scale/zero [K/B, 1, N],
               x_scale [K/B, M, 1]
  output:      [M, N] in x's dtype

  xs is x's dtype (A16), int8 (A8) or float8_e4m3fn (A8-fp8); w int8, uint8
  (packed int4 or fp4) or float8_e4m3fn (fp8); zero only for int.

Grid ``(M/bm, N/bn)``; one program computes a (bm, bn) output tile:

  i (axis 0): output row block of bm rows.
  j (axis 1): output column block of bn channels.

Each program walks K in a `lax.fori_loop` (Triton pipelines it over
``num_stages``): per-channel in steps of ``bk/p`` stored elements -- a
(bm, bk/p) x (bn, bk/p) dot per part -- accumulating float32 (int32 for A8)
and applying scale and zero point once at the end; blockwise one quantization
block per step -- a (bm, Bs) x (Bs, bn) dot per part, scaled by the block's
scale row before it is added.

Block constraints (Triton): every loaded array has a power-of-2 size and dot
operands are >= 16 along every dim (K >= 32 for e4m3fn x e4m3fn,
`block_sizes.gpu_dot_k_min`), so bm, bn >= 16 are powers of 2, per-channel
``bk/p`` is a power of 2 >= 16 (32), and blockwise needs ``B/p`` to be a power
of 2 >= 16 (32) (`supports`). M and N are padded to tile multiples and the result
sliced (N only when it is no multiple of 16, which no real model has: the
weight is then copied). K is never padded: where no power-of-2 step divides
it, the last step's loads are masked (``plgpu.load(..., mask=, other=0)``).

Pallas' Triton backend is deprecated from JAX 0.12 on in favour of Mosaic GPU;
docs/pallas_kernels.md has what that means here and the plan.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import block_sizes, formats, jax_compat, operands

_HIGHEST = lax.Precision.HIGHEST


def _precision(dtype):
    # float32 operands: IEEE fp32 dot (not TF32); 16-bit and int8 dots are exact.
    return _HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _split_refs(refs, has_zero, has_x_scale):
    refs = list(refs)
    xs, w, scale = refs[:3]
    rest = refs[3:]
    zero = rest.pop(0) if has_zero else None
    x_scale = rest.pop(0) if has_x_scale else None
    return xs, w, scale, zero, x_scale, rest[0]


def _load_chunk(ref, lead, off, chunk, k_stored, masked):
    """``ref[*lead, :, off:off+chunk]`` (2-D); with `masked`, columns past
    `k_stored` read as 0. One indexer: Triton lowering takes no chained ones."""
    idx = (*lead, slice(None), pl.ds(off, chunk))
    if not masked:
        return ref[idx]
    # Leading indices as arrays: the interpreter's masked load takes no ints.
    view = ref.at[(*(jnp.int32(i) for i in lead), slice(None), pl.ds(off, chunk))]
    cols = off + lax.broadcasted_iota(jnp.int32, view.shape, len(view.shape) - 1)
    return plgpu.load(view, mask=cols < k_stored, other=0)


def _per_channel_kernel(*refs, parts, packed, weight_format, form, has_zero, has_x_scale,
                        chunk, n_chunks, k_stored):
    xs_ref, w_ref, scale_ref, zero_ref, xsc_ref, o_ref = _split_refs(refs, has_zero, has_x_scale)
    acc_dtype = form.acc
    bm, bn = o_ref.shape
    # A last, partial step (no power-of-2 step divides K): masked loads, zeros
    # past the end of K in both operands.
    masked = n_chunks * chunk != k_stored

    def step(c, carry):
        acc, x_sum = carry
        off = pl.multiple_of(c * chunk, chunk)
        w_tile = _load_chunk(w_ref, (), off, chunk, k_stored, masked)  # (bn, chunk)
        for part in range(parts):
            x = _load_chunk(xs_ref, (part,), off, chunk, k_stored, masked)  # (bm, chunk)
            q = operands.weight_part(w_tile, part, packed, form.rhs, weight_format)
            acc += lax.dot_general(formats.activation_operand(x, form.lhs), q,
                                   (((1,), (1,)), ((), ())), precision=_precision(form.lhs),
                                   preferred_element_type=acc_dtype)
            if has_zero:
                x_sum += jnp.sum(formats.to_float32(x), axis=1, keepdims=True)
        return acc, x_sum

    init = (jnp.zeros((bm, bn), acc_dtype), jnp.zeros((bm, 1), jnp.float32))
    acc, x_sum = lax.fori_loop(0, n_chunks, step, init)
    y = acc.astype(jnp.float32)
    if has_x_scale:
        x_scale = xsc_ref[...]  # (bm, 1)
        y, x_sum = y * x_scale, x_sum * x_scale
    y = y * scale_ref[...]  # (1, bn)
    if has_zero:
        y = y - x_sum * zero_ref[...]
    o_ref[...] = y.astype(o_ref.dtype)


def _blockwise_kernel(*refs, parts, packed, weight_format, form, has_zero, has_x_scale,
                      n_blocks):
    xs_ref, w_ref, scale_ref, zero_ref, xsc_ref, o_ref = _split_refs(refs, has_zero, has_x_scale)
    bm, bn = o_ref.shape

    def step(b, acc):
        w_tile = w_ref[b]  # (Bs, bn)
        partial, x_sum = None, None
        for part in range(parts):
            x = xs_ref[part, b]  # (bm, Bs)
            q = operands.weight_part(w_tile, part, packed, form.rhs, weight_format)
            d = lax.dot_general(formats.activation_operand(x, form.lhs), q,
                                (((1,), (0,)), ((), ())), precision=_precision(form.lhs),
                                preferred_element_type=form.acc)
            partial = d if partial is None else partial + d
            if has_zero:
                s = jnp.sum(formats.to_float32(x), axis=1, keepdims=True)  # (bm, 1)
                x_sum = s if x_sum is None else x_sum + s
        y = partial.astype(jnp.float32)
        if has_x_scale:
            x_scale = xsc_ref[b]  # (bm, 1)
            y = y * x_scale
            if has_zero:
                x_sum = x_sum * x_scale
        acc += y * scale_ref[b]  # (1, bn)
        if has_zero:
            acc -= x_sum * zero_ref[b]
        return acc

    acc = lax.fori_loop(0, n_blocks, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def supports(*, block_size: int, packed: bool, x_dtype, quantize_activation: bool,
             weight_format: str | None = None, activation_format: str | None = None,
             device_kind: str | None = None) -> bool:
    """Per-channel: always (K is padded). Blockwise: B/p a power of 2 of at
    least the dot's minimum K (`block_sizes.gpu_dot_k_min`): 16, and 32 where
    the target multiplies e4m3fn x e4m3fn (A8-fp8 with a float weight on
    Hopper, `_operand_form`), so MXFP4 (B = 32, 16 bytes) and NVFP4 (B = 16)
    with fp8 activations fall back to XLA there. `device_kind` as in
    `quantized_matmul`."""
    if block_size == -1:
        return True
    weight_format, activation_format = formats.kernel_formats(
        jnp.uint8 if packed else jnp.int8, weight_format, activation_format, quantize_activation)
    bs = block_size // (2 if packed else 1)
    return _is_pow2(bs) and bs >= block_sizes.gpu_dot_k_min(
        _operand_form(x_dtype, quantize_activation, weight_format, activation_format,
                      device_kind).lhs == block_sizes.FP8)


def _operand_form(x_dtype, quantize_activation, weight_format, activation_format,
                  device_kind):
    """`block_sizes.gpu_operands` for a call, with the defaults of `quantized_matmul`."""
    return block_sizes.gpu_operands(x_dtype, quantize_activation=quantize_activation,
                                    weight_format=weight_format,
                                    activation_format=activation_format,
                                    device_kind=device_kind or jax_compat.cuda_target_kind())


def quantized_matmul(x, w, scale, zero_point=None, *, block_size: int = -1,
                     quantize_activation: bool = False, weight_format: str | None = None,
                     activation_format: str | None = None, device_kind: str | None = None,
                     blocks: block_sizes.GpuBlocks | None = None, interpret=False):
    """``x [M, K] @ dequantized(w).T -> [M, N]`` in x's dtype, on the Triton kernel.

    Args as `pallas_kernels.tpu.quantized_matmul.quantized_matmul`, but
    `device_kind` names the target GPU for the operand form
    (`block_sizes.gpu_operands`: e4m3fn x e4m3fn dots for A8-fp8 on Hopper
    and other fp8 tensor cores, conversion in registers otherwise); default
    the GPU lowered for (`jax_compat.cuda_target_kind`, an H100 when none is
    known). `blocks` defaults to `block_sizes.gpu_blocks` (which applies
    `override_tiles` and a measured table, so it is called here, outside the
    jit, on every call); ``interpret=True`` runs the same kernel body on the
    CPU (Pallas' generic interpreter).
    """
    m, k = x.shape
    packed = w.dtype == jnp.uint8
    n = w.shape[-1] if block_size != -1 else w.shape[0]
    if m == 0:  # no rows: nothing to tile
        return jnp.zeros((0, n), x.dtype)
    weight_format, activation_format = formats.kernel_formats(
        w.dtype, weight_format, activation_format, quantize_activation)
    form = _operand_form(x.dtype, quantize_activation, weight_format, activation_format,
                         device_kind)
    if blocks is None:
        blocks = block_sizes.gpu_blocks(m, k, n, block_size=block_size, packed=packed,
                                        x_dtype=x.dtype, quantize_activation=quantize_activation,
                                        dot_k_min=block_sizes.gpu_dot_k_min(
                                            form.lhs == block_sizes.FP8))
    return _quantized_matmul(x, w, scale, zero_point, block_size=block_size,
                             quantize_activation=quantize_activation,
                             weight_format=weight_format, activation_format=activation_format,
                             form=form, blocks=blocks, interpret=interpret)


@functools.partial(jax.jit, static_argnames=(
    "block_size", "quantize_activation", "weight_format", "activation_format", "form",
    "blocks", "interpret"))
def _quantized_matmul(x, w, scale, zero_point, *, block_size, quantize_activation,
                      weight_format, activation_format, form, blocks, interpret):
    m, k = x.shape
    packed = w.dtype == jnp.uint8
    parts = 2 if packed else 1
    n = w.shape[-1] if block_size != -1 else w.shape[0]
    xs, wk, sk, zk, xsck = operands.kernel_operands(
        x, w, scale, zero_point, block_size=block_size,
        quantize_activation=quantize_activation, op_dtype=form.x,
        m_pad=blocks.m_pad, n_pad=blocks.n_pad, k_pad=blocks.k_pad, pad_weight=True,
        activation_format=activation_format or "int8")
    bm, bn = blocks.bm, blocks.bn
    has_zero, has_x_scale = zk is not None, xsck is not None

    if block_size == -1:
        ks = blocks.k_pad // parts
        chunk = blocks.bk // parts
        in_specs = [pl.BlockSpec((parts, bm, ks), lambda i, j: (0, i, 0)),
                    pl.BlockSpec((bn, ks), lambda i, j: (j, 0)),
                    pl.BlockSpec((1, bn), lambda i, j: (0, j))]
        if has_zero:
            in_specs.append(pl.BlockSpec((1, bn), lambda i, j: (0, j)))
        if has_x_scale:
            in_specs.append(pl.BlockSpec((bm, 1), lambda i, j: (i, 0)))
        kernel = functools.partial(_per_channel_kernel, parts=parts, packed=packed,
                                   weight_format=weight_format, form=form, has_zero=has_zero,
                                   has_x_scale=has_x_scale,
                                   chunk=chunk, n_chunks=-(-ks // chunk), k_stored=ks)
    else:
        nb, bs = k // block_size, block_size // parts
        in_specs = [pl.BlockSpec((parts, nb, bm, bs), lambda i, j: (0, 0, i, 0)),
                    pl.BlockSpec((nb, bs, bn), lambda i, j: (0, 0, j)),
                    pl.BlockSpec((nb, 1, bn), lambda i, j: (0, 0, j))]
        if has_zero:
            in_specs.append(pl.BlockSpec((nb, 1, bn), lambda i, j: (0, 0, j)))
        if has_x_scale:
            in_specs.append(pl.BlockSpec((nb, bm, 1), lambda i, j: (0, i, 0)))
        kernel = functools.partial(_blockwise_kernel, parts=parts, packed=packed,
                                   weight_format=weight_format, form=form, has_zero=has_zero,
                                   has_x_scale=has_x_scale, n_blocks=nb)

    args = [xs, wk, sk] + ([zk] if has_zero else []) + ([xsck] if has_x_scale else [])
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((blocks.m_pad, blocks.n_pad), x.dtype),
        grid=blocks.grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name=formats.kernel_name(block_size, packed, weight_format, activation_format),
    )(*args)
    return out[:m, :n]
