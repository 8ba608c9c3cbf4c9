"""Torch CPU tensors straight into the C++ kernels: no JAX, no DLPack.

``torch_bridge._torch_ops`` (csrc/torch_ops.cc, built when torch is present at
install time) registers ::

    torch.ops.xla_qops_cpu.quantized_matmul(x, w, scale, zero_point, block_size, bits,
                                             quantize_activation, weight_format="int",
                                             activation_format="int8") -> Tensor

the same kernels as the XLA FFI target of ``impl="custom_call"`` (bit-identical
results), run on torch's intra-op thread pool. It takes the weight in the form
the kernels read (`PreparedWeight`); `prepare` makes that form once, and
`XlaQuantizedLinear` keeps it with the module, so a call only runs the kernel.

Where the extension is missing (torch was not importable when the package
was built), `available()` is False and torch_bridge uses the DLPack route
into JAX instead (`_jax_interop.run_on_cpu`).
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from xla_qops.spec import check_args

try:
    from torch_bridge import _torch_ops  # noqa: F401  (registers the operator)
    _OP = torch.ops.xla_qops_cpu.quantized_matmul.default
    _HADAMARD = torch.ops.xla_qops_cpu.hadamard_rows.default
except ImportError:
    _OP = _HADAMARD = None

# impl values the direct route serves: the C++ kernels are what "auto" picks
# on the host CPU, and what "custom_call" names.
DIRECT_IMPLS = ("auto", "custom_call")


def available() -> bool:
    """Whether the torch operator was built (and registered)."""
    return _OP is not None


def hadamard_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """`torch_bridge.rotation.rotate_input` for a CPU x, in C++ (a fast Walsh-Hadamard
    transform per row; no torch mm call, which costs more than its work at decode
    sizes). Eager only: the op has no fake kernel for torch.compile."""
    return _HADAMARD(x, block)


# How many weights `prepare` has made: a call that re-prepares a module's
# weight is a bug the tests look for with this count.
_preparations = 0
_preparations_lock = threading.Lock()


def preparations() -> int:
    return _preparations


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedWeight:
    """A quantized weight in the form the C++ kernels read.

    Attributes:
      w: contiguous; int8 (`bits` 8) or packed int4 as uint8 (`bits` 4), in
        API.md's layout. An unpacked int4 weight (int8 holding [-8, 7]) is
        packed, except where pairs do not fit (odd `in` per-channel, odd
        block size): there it runs as int8, which holds [-8, 7] exactly, as
        the JAX custom_call backend does, so the two routes agree bit for bit.
      scale, zero_point: contiguous float32 (None: symmetric).
      block_size: -1 per-channel, else B.
      bits: what the kernels are told: 8, or 4 for packed nibbles.
      weight_format: the kernels' name of the element format: "int" (int8 or
        int4 by `bits`), "fp8" (`w` holds the e4m3fn bits as uint8) or "fp4"
        (packed e2m1 codes, uint8; a float4_e2m1fn_x2 tensor is viewed so).
      sources: the tensors it was made from with their version counters;
        `is_current` compares them, so in-place edits and reassignment of a
        module's buffers are noticed.
    """

    w: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    block_size: int
    bits: int
    sources: tuple
    weight_format: str = "int"

    def is_current(self, w, scale, zero_point) -> bool:
        (w0, wv), (s0, sv), (z0, zv) = self.sources  # unrolled: this runs every call
        return (w is w0 and scale is s0 and zero_point is z0 and w._version == wv
                and scale._version == sv and (z0 is None or zero_point._version == zv))


def pack_int4(q: torch.Tensor, blockwise: bool) -> torch.Tensor:
    """int8 in [-8, 7] -> uint8 pairs along the input features (API.md section 2;
    `xla_qops.packing.pack_int4` for torch tensors)."""
    axis = 1 if blockwise else q.dim() - 1
    pairs = q.unflatten(axis, (q.shape[axis] // 2, 2)).to(torch.uint8)
    low, high = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
    return ((low & 0xF) | ((high & 0xF) << 4)).contiguous()


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(torch.float32).contiguous()  # no copy when it already is


def prepare(w, scale, zero_point, spec, *, kept: bool = True) -> PreparedWeight:
    """The kernels' form of a validated weight (`spec`: xla_qops.spec.MatmulSpec).

    No copy is made of tensors already in that form (contiguous packed or
    int8 weight, contiguous float32 scale and zero point): the result then
    aliases the module's buffers.

    `kept`: the result is kept (a module's attribute, a graph input to
    torch.compile) and its tensors are marked static for dynamo. The op's
    per-call preparation passes False: marking would change the caller's own
    tensors (aliased above), and torch >= 2.10 guards on that marking, so an
    eager call would make compiled code that closes over the same weight
    recompile.
    """
    global _preparations
    bits = 8 if spec.bits == 8 or not spec.packed else 4
    weight = w
    weight_format = spec.weight_format if spec.float_weight else "int"
    if weight_format in ("fp8", "fp4") and weight.dtype != torch.uint8:
        weight = weight.view(torch.uint8)  # float8_e4m3fn / float4_e2m1fn_x2: the same bytes
    if spec.bits == 4 and not spec.packed:
        pairs_along = spec.block_size if spec.blockwise else spec.in_features
        if pairs_along % 2 == 0:
            weight, bits = pack_int4(w, spec.blockwise), 4
    with _preparations_lock:
        _preparations += 1
    prepared = PreparedWeight(
        w=weight.contiguous(), scale=_float32(scale), zero_point=_float32(zero_point),
        block_size=spec.block_size, bits=bits,
        sources=tuple((t, None if t is None else t._version) for t in (w, scale, zero_point)),
        weight_format=weight_format)
    for t in (prepared.w, prepared.scale, prepared.zero_point) if kept else ():
        if t is not None:
            # A module's plain tensor attributes are graph inputs to dynamo;
            # static shapes keep torch.compile(dynamic=True) from duck-sizing
            # a weight dim with the batch dim (and then specializing both).
            torch._dynamo.mark_static(t)
    return prepared


def matmul(x: torch.Tensor, weight: PreparedWeight, quantize_activation: bool,
           activation_format: str | None = None) -> torch.Tensor:
    """``[..., in] -> [..., out]`` in x's dtype, for a validated CPU `x`.

    `activation_format` (with `quantize_activation`): "int8" or "fp8"; None is
    API.md's default, "fp8" for float weights and "int8" for integer ones.
    """
    if activation_format is None:
        activation_format = "int8" if weight.weight_format == "int" else "fp8"
    return _OP(x, weight.w, weight.scale, weight.zero_point, weight.block_size, weight.bits,
               quantize_activation, weight.weight_format, activation_format)


if _OP is not None:
    @torch.library.register_fake("xla_qops_cpu::quantized_matmul")
    def _fake(x, w, scale, zero_point, block_size, bits, quantize_activation,
              weight_format="int", activation_format="int8"):
        # The op's validation (what eager reports for the module's x), so that
        # torch.compile raises the same errors.
        import jax.numpy as jnp
        import numpy as np
        from torch_bridge._jax_interop import Abstract, abstract
        if weight_format == "fp8":  # the e4m3fn bits, possibly viewed as uint8
            w_abstract = Abstract(tuple(int(d) for d in w.shape), np.dtype(jnp.float8_e4m3fn))
        else:
            w_abstract = abstract(w, "w")
        spec = check_args(abstract(x, "x", batch_dims=True), w_abstract,
                          abstract(scale, "scale"),
                          None if zero_point is None else abstract(zero_point, "zero_point"),
                          block_size, bits == 4 and weight_format == "int", quantize_activation,
                          weight_format=None if weight_format == "int" else weight_format,
                          activation_format=activation_format if quantize_activation else None)
        return x.new_empty((*x.shape[:-1], spec.out_features))
