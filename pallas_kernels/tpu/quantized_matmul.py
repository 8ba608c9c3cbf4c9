"""Quantized matmul TPU (Mosaic) kernels: W8A16, W4A16, W8A8, W4A8, and fp8 / fp4.

Computes ``y[M, N] = x_hat[M, K] @ (scale * q - zero_point).T`` (API.md) for
int8 weights, int4 weights unpacked in an int8 container, and packed int4
(uint8, two features per byte along K, even feature in the low nibble), with
one scale per output channel (``block_size=-1``) or per output channel and
block of B input features. With ``quantize_activation`` x is quantized to int8
per token (and block) by `pallas_kernels.activation` in the prologue and the MXU
multiplies int8 by int8 (int4 weights widened to int8 in VMEM) with int32
accumulation. The algebra is `pallas_kernels.reference` (the pure-JAX
statement of these kernels on their operands): scales and zero points are
applied to partial sums, never to weight elements.

Float formats (API.md section 7): fp8 weights are float8_e4m3fn with int8's
shapes; fp4 weights are uint8 with two e2m1 codes per byte, packed and walked
exactly as packed int4 (``p`` = 2). With fp8 activations x is quantized per
token (and block) to e4m3fn by `pallas_kernels.formats.quantize_activation_fp8`
in the prologue, with float32 accumulation. What the MXU multiplies is
`block_sizes.tpu_operands` of the target chip (one place):

  v7 (fp8 MXU):  A16 bf16 x e4m3fn; A8-fp8 e4m3fn x e4m3fn. An fp8 tile goes
                 to the dot as stored; fp4 codes become e4m3fn in VMEM
                 (`formats.e2m1_codes_to_e4m3`, integer ops and a bitcast).
  v4/v5e/v5p/v6e: e4m3fn and e2m1 are decoded to bf16 in VMEM by their bits
                 (`formats.e4m3_bits_to_float32` / `e2m1_codes_to_float32`:
                 32-bit integer ops; Mosaic lowers no f8 -> bf16 cast with
                 jaxlib 0.7.1), bf16 x bf16 (float32 x float32 for f32 x).

Every e4m3 / e2m1 value is exact in bf16 and e4m3fn, and every product of two
quantized operands exact in float32, so all forms compute the same sums up to
summation order. int4 / int8 weights with fp8 activations multiply bf16 x bf16
(int8 values are not all e4m3 values).

Memory (HBM) layouts of the kernel operands are those of
`pallas_kernels.operands` (``p`` = 2 packed, else 1; ``Ks = K/p``; ``Bs = B/p``):

  per-channel: xs [p, M, Ks], w [N, Ks], scale/zero [1, N], x_scale [M, 1]
  blockwise:   xs [p, K/B, M, Bs], w [K/B, Bs, N], scale/zero [K/B, 1, N],
               x_scale [K/B, M, 1]
  output:      [M, N] (x's dtype; float32 when x is float16, cast after)

  xs is bf16 / f32 (A16), int8 (A8) or float8_e4m3fn (A8-fp8); w int8,
  uint8 (packed int4 or fp4) or float8_e4m3fn (fp8); zero only for int.

The weight stays in its storage form in HBM and VMEM: packed int4 moves as
packed bytes and is unpacked chunk by chunk in VMEM (`operands.weight_part`).

Grid ``(M/tm, N/tn, K/tk)``, axes (parallel, parallel, arbitrary):

  i  (axis 0): output row block, tm rows of x.
  j  (axis 1): output column block, tn output channels.
  kk (axis 2): reduction step over tk input features. The float32 (int32 for
               int8 x int8 per-channel) accumulator lives in VMEM scratch across
               kk; the output tile is written at the last kk.

Blocks (all chosen by `pallas_kernels.block_sizes.tpu_blocks`):

  per-channel: xs (p, tm, tk/p), w (tn, tk/p), scale/zero (1, tn),
               x_scale (tm, 1). Inside a step the tile is walked in chunks of
               ``k_chunk`` features (a 128*p multiple) so the unpacked weight
               temporary stays small.
  blockwise:   xs (p, tk/B, tm, Bs), w (tk/B, Bs, tn), scale/zero (tk/B, 1, tn),
               x_scale (tk/B, tm, 1). Inside a step the kernel loops over the
               tk/B quantization blocks: one (tm, Bs) x (Bs, tn) MXU product per
               part, scaled by the block's scale row and, for A8, the block's
               activation scale column.

Block constraints: last two dims of each block divisible by (8, 128) or equal
to the array's (tn, tk/p multiples of 128 or full; tm a multiple of the
activation's sublane packing -- 32 rows for int8 and e4m3fn; Bs is always a
full dim), which the block rule guarantees; blockwise B/p a multiple of 8
(`supports`: fp4's MXFP4 B = 32 and NVFP4 B = 16 qualify). M, N and K are
padded to tile multiples in the activations and scales, never in the weight:
where a tile does not divide N or K the weight's last block is partial
(`pallas_kernels.operands`), and the result is sliced.

Zero points: the kernel keeps a running activation sum (per row, and per
block), and subtracts ``sum(x) * zero`` from the accumulator -- per-channel
once at the last step, blockwise once per quantization block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import block_sizes, formats, operands

_HIGHEST = lax.Precision.HIGHEST


def _precision(dtype):
    # float32 operands: full-precision (multi-pass) MXU; bf16 and int8 are exact.
    return _HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _split_refs(refs, has_zero, has_x_scale):
    """(xs, w, scale, zero|None, x_scale|None, out, acc, x_sum|None) from the flat refs."""
    refs = list(refs)
    xs, w, scale = refs[:3]
    rest = refs[3:]
    zero = rest.pop(0) if has_zero else None
    x_scale = rest.pop(0) if has_x_scale else None
    out, acc = rest[:2]
    x_sum = rest[2] if len(rest) > 2 else None
    return xs, w, scale, zero, x_scale, out, acc, x_sum


def _per_channel_kernel(*refs, parts, packed, weight_format, form, has_zero, has_x_scale,
                        k_chunk):
    xs_ref, w_ref, scale_ref, zero_ref, xsc_ref, o_ref, acc_ref, xsum_ref = _split_refs(
        refs, has_zero, has_x_scale)
    kk = pl.program_id(2)
    chunk = k_chunk // parts  # stored elements per chunk (multiple of 128)
    n_chunks = xs_ref.shape[-1] // chunk

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if has_zero:
            xsum_ref[...] = jnp.zeros_like(xsum_ref)

    def chunk_step(c, carry):
        # One chunk: a static full slice (the tile may be a full K that is no
        # multiple of 128, which a dynamic lane offset could not address);
        # several: 128-aligned dynamic offsets Mosaic can prove aligned.
        off = 0 if n_chunks == 1 else pl.multiple_of(c * chunk, chunk)
        w_tile = w_ref[:, pl.ds(off, chunk)]  # (tn, chunk)
        for part in range(parts):
            x = xs_ref[part, :, pl.ds(off, chunk)]  # (tm, chunk)
            q = operands.weight_part(w_tile, part, packed, form.rhs, weight_format)
            # x (tm, chunk) . q (tn, chunk) over the chunk -> (tm, tn)
            acc_ref[...] += lax.dot_general(
                formats.activation_operand(x, form.lhs), q, (((1,), (1,)), ((), ())),
                precision=_precision(form.lhs), preferred_element_type=acc_ref.dtype)
            if has_zero:
                # float32 sum: exact for int8 rows up to K = 2**24 / 127.
                xsum_ref[...] += jnp.sum(formats.to_float32(x), axis=1, keepdims=True)
        return carry

    if n_chunks == 1:
        chunk_step(0, 0)
    else:
        lax.fori_loop(0, n_chunks, chunk_step, 0)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _finish():
        y = acc_ref[...].astype(jnp.float32)
        if has_x_scale:
            y = y * xsc_ref[...]  # (tm, 1): per-token activation scale
        y = y * scale_ref[...]  # (1, tn)
        if has_zero:
            x_sum = xsum_ref[...]
            if has_x_scale:
                x_sum = x_sum * xsc_ref[...]
            y = y - x_sum * zero_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


def _blockwise_kernel(*refs, parts, packed, weight_format, form, has_zero, has_x_scale,
                      blocks_per_step):
    xs_ref, w_ref, scale_ref, zero_ref, xsc_ref, o_ref, acc_ref, _ = _split_refs(
        refs, has_zero, has_x_scale)
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def block_step(b, carry):
        w_tile = w_ref[b]  # (Bs, tn)
        partial, x_sum = None, None
        for part in range(parts):
            x = xs_ref[part, b]  # (tm, Bs)
            q = operands.weight_part(w_tile, part, packed, form.rhs, weight_format)
            d = lax.dot_general(formats.activation_operand(x, form.lhs), q,
                                (((1,), (0,)), ((), ())), precision=_precision(form.lhs),
                                preferred_element_type=form.acc)
            partial = d if partial is None else partial + d
            if has_zero:
                s = jnp.sum(formats.to_float32(x), axis=1, keepdims=True)  # (tm, 1)
                x_sum = s if x_sum is None else x_sum + s
        y = partial.astype(jnp.float32)
        if has_x_scale:
            y = y * xsc_ref[b]  # (tm, 1): this block's per-token activation scale
        update = y * scale_ref[b]  # (1, tn): this block's weight scale
        if has_zero:
            if has_x_scale:
                x_sum = x_sum * xsc_ref[b]
            update = update - x_sum * zero_ref[b]
        acc_ref[...] += update
        return carry

    lax.fori_loop(0, blocks_per_step, block_step, 0)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def supports(*, block_size: int, packed: bool, x_dtype, quantize_activation: bool,
             weight_format: str | None = None, activation_format: str | None = None) -> bool:
    """Every scheme of API.md, the float formats of section 7 included (fp4 is
    packed like int4); blockwise needs B/p to be a multiple of 8 so a block's
    rows fill whole sublanes (B = 32, 64, 128, ... all qualify; NVFP4's B = 16
    packs to 8 rows and qualifies too)."""
    del x_dtype, quantize_activation, weight_format, activation_format
    if block_size == -1:
        return True
    return (block_size // (2 if packed else 1)) % 8 == 0


def quantized_matmul(x, w, scale, zero_point=None, *, block_size: int = -1,
                     quantize_activation: bool = False, weight_format: str | None = None,
                     activation_format: str | None = None, chip: str | None = None,
                     blocks: block_sizes.TpuBlocks | None = None, interpret=False):
    """``x [M, K] @ dequantized(w).T -> [M, N]`` in x's dtype, on the TPU kernel.

    Args:
      x: ``[M, K]`` bfloat16, float16 or float32.
      w, scale, zero_point: API.md layouts (validated by `xla_qops.spec`);
        `w` int8, uint8 (packed int4 or fp4), or float8_e4m3fn (fp8).
      block_size: -1 per-channel, else B.
      quantize_activation: W8A8 / W4A8.
      weight_format, activation_format: API.md section 7 (None: inferred as
        `formats.kernel_formats` says; "fp4" must be named).
      chip: target TPU for the block rule and the operand form ("v4", "v5e",
        "v5p", "v6e", "v7"); default `block_sizes.tpu_chip()` (the TPU
        lowered for). `block_sizes.tpu_operands` decides what the MXU
        multiplies: on v7 an fp8 / fp4 weight tile reaches it as e4m3fn.
      blocks: explicit tiles (tests), else `block_sizes.tpu_blocks` (which
        applies `override_tiles` and a measured table, so it is called here,
        outside the jit, on every call).
      interpret: False to compile with Mosaic; True or a
        ``pltpu.InterpretParams()`` to run the same kernel on the CPU.
    """
    m, k = x.shape
    packed = w.dtype == jnp.uint8
    n = w.shape[-1] if block_size != -1 else w.shape[0]
    if m == 0:  # no rows: nothing to tile
        return jnp.zeros((0, n), x.dtype)
    weight_format, activation_format = formats.kernel_formats(
        w.dtype, weight_format, activation_format, quantize_activation)
    form = block_sizes.tpu_operands(x.dtype, quantize_activation=quantize_activation,
                                    weight_format=weight_format,
                                    activation_format=activation_format,
                                    chip=block_sizes.tpu_chip(chip))
    if blocks is None:
        blocks = block_sizes.tpu_blocks(m, k, n, block_size=block_size, packed=packed,
                                        x_dtype=x.dtype, quantize_activation=quantize_activation,
                                        chip=chip)
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
    out_dtype = jnp.float32 if x.dtype == jnp.float16 else x.dtype
    # Past the end of a partial weight block lie unspecified bytes, which meet
    # zero activations: harmless for integers, e2m1 codes and decoded e4m3
    # (all finite), but an e4m3fn tile that reaches the MXU as stored could
    # hold NaN patterns there, so that weight is padded (a copy) when K is.
    nan_prone = form.rhs == block_sizes.FP8 and weight_format == "fp8" and blocks.k_pad != k
    xs, wk, sk, zk, xsck = operands.kernel_operands(
        x, w, scale, zero_point, block_size=block_size,
        quantize_activation=quantize_activation, op_dtype=form.x,
        m_pad=blocks.m_pad, n_pad=blocks.n_pad, k_pad=blocks.k_pad, pad_weight=nan_prone,
        activation_format=activation_format or "int8")
    tm, tn, tk = blocks.tm, blocks.tn, blocks.tk
    has_zero, has_x_scale = zk is not None, xsck is not None

    if block_size == -1:
        ts = tk // parts
        in_specs = [pl.BlockSpec((parts, tm, ts), lambda i, j, kk: (0, i, kk)),
                    pl.BlockSpec((tn, ts), lambda i, j, kk: (j, kk)),
                    pl.BlockSpec((1, tn), lambda i, j, kk: (0, j))]
        if has_zero:
            in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        if has_x_scale:
            in_specs.append(pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0)))
        scratch = [pltpu.VMEM((tm, tn), form.acc)]
        if has_zero:
            scratch.append(pltpu.VMEM((tm, 1), jnp.float32))
        kernel = functools.partial(_per_channel_kernel, parts=parts, packed=packed,
                                   weight_format=weight_format, form=form,
                                   has_zero=has_zero, has_x_scale=has_x_scale,
                                   k_chunk=blocks.k_chunk)
    else:
        bps = tk // block_size  # quantization blocks per grid step
        bs = block_size // parts
        in_specs = [pl.BlockSpec((parts, bps, tm, bs), lambda i, j, kk: (0, kk, i, 0)),
                    pl.BlockSpec((bps, bs, tn), lambda i, j, kk: (kk, 0, j)),
                    pl.BlockSpec((bps, 1, tn), lambda i, j, kk: (kk, 0, j))]
        if has_zero:
            in_specs.append(pl.BlockSpec((bps, 1, tn), lambda i, j, kk: (kk, 0, j)))
        if has_x_scale:
            in_specs.append(pl.BlockSpec((bps, tm, 1), lambda i, j, kk: (kk, i, 0)))
        scratch = [pltpu.VMEM((tm, tn), jnp.float32)]
        kernel = functools.partial(_blockwise_kernel, parts=parts, packed=packed,
                                   weight_format=weight_format, form=form,
                                   has_zero=has_zero, has_x_scale=has_x_scale,
                                   blocks_per_step=bps)

    args = [xs, wk, sk] + ([zk] if has_zero else []) + ([xsck] if has_x_scale else [])
    w_bytes = wk.size * wk.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * blocks.m_pad * blocks.n_pad * blocks.k_pad, transcendentals=0,
        bytes_accessed=int(w_bytes * blocks.grid[0] + xs.size * xs.dtype.itemsize * blocks.grid[1]
                           + blocks.m_pad * blocks.n_pad * jnp.dtype(out_dtype).itemsize))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((blocks.m_pad, blocks.n_pad), out_dtype),
        grid=blocks.grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=blocks.vmem_limit_bytes,
            # Let XLA fuse the activation prologue (part split, block-major
            # transpose, int8 quantization) into the kernel's x operand.
            allow_input_fusion=[True] + [False] * (len(args) - 1)),
        cost_estimate=cost,
        interpret=interpret,
        name=formats.kernel_name(block_size, packed, weight_format, activation_format),
    )(*args)
    return out[:m, :n].astype(x.dtype)

