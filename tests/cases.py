"""Shared test-case builders: random float weights quantized with each scheme."""

import dataclasses

import jax.numpy as jnp
import numpy as np

import xla_qops

X_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class Scheme:
    bits: int
    block_size: int
    symmetric: bool
    packed: bool
    quantize_activation: bool

    @property
    def id(self) -> str:
        layout = "pc" if self.block_size == -1 else f"g{self.block_size}"
        zp = "sym" if self.symmetric else "asym"
        pack = "-packed" if self.packed else ("-unpacked" if self.bits == 4 else "")
        return f"w{self.bits}a{8 if self.quantize_activation else 16}-{layout}-{zp}{pack}"


def all_schemes(block_size: int):
    """Every scheme row x symmetric/asymmetric x packed/unpacked int4."""
    out = []
    for bits in (8, 4):
        for block in (-1, block_size):
            for symmetric in (True, False):
                for packed in ((True, False) if bits == 4 else (False,)):
                    for qa in (False, True):
                        out.append(Scheme(bits, block, symmetric, packed, qa))
    return out


def make_weight(rng, n, k, scheme: Scheme):
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    if not scheme.symmetric:
        w = w + rng.uniform(-0.05, 0.05, (n, 1)).astype(np.float32)  # offset channels
    return xla_qops.quantize_weight(w, bits=scheme.bits, block_size=scheme.block_size,
                                    symmetric=scheme.symmetric, pack=scheme.packed)


def make_x(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)


def op_args(qw):
    """QuantizedWeight -> the positional arguments of quantized_matmul after x."""
    return (qw.w, qw.scale, qw.zero_point, qw.block_size, qw.int4_weight)


def pack_words(codes, bits, axis):
    """int32 words of unsigned `bits`-wide codes along `axis`, little end first
    (value j of a word at bits [j*bits, (j+1)*bits)): GPTQ's and compressed-tensors' packing."""
    per = 32 // bits
    c = np.moveaxis(codes.astype(np.uint64), axis, 0)
    words = np.zeros((c.shape[0] // per,) + c.shape[1:], np.uint64)
    for j in range(per):
        words |= c[j::per] << np.uint64(bits * j)
    # C order: safetensors' numpy writer takes the raw buffer.
    return np.ascontiguousarray(np.moveaxis(words.astype(np.uint32), 0, axis))


def assert_same_at_every_thread_count(call, cases, counts=(1, 2, 3)):
    """`call(*case)` for every case under each of the host kernels' thread counts:
    bit-identical results; the count is restored afterwards."""
    from xla_qops.backends import custom_call

    before = custom_call.num_threads()
    try:
        outs = []
        for n in counts:
            custom_call.set_num_threads(n)
            outs.append([np.asarray(call(*c)) for c in cases])
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                np.testing.assert_array_equal(a, b)
    finally:
        custom_call.set_num_threads(before)
