"""Glue between torch tensors and the JAX implementation in `xla_qops`.

Two ways in, one per device kind:

* CPU tensors: DLPack. ``jax.dlpack.from_dlpack`` aliases the torch buffer
  (no copy, bf16 and uint8 included) and ``torch.from_dlpack`` aliases the
  JAX result, so a call copies neither the weight nor the activations. The
  JAX function is `jax.jit`-compiled once per static configuration and shape.
* XLA tensors: ``torch_xla.core.xla_builder.call_jax`` lowers the same JAX
  function to HLO and embeds it in torch_xla's lazy graph, so the quantized
  matmul fuses into the model's graph and nothing leaves the device.

Also here: `abstract`, a shape/dtype stand-in for a torch tensor, so that
`xla_qops.spec.check_args` (the one validation point) can check torch
arguments (including fake tensors under torch.compile) before any conversion.

Float element formats (API.md section 7) cross by bit views, never by value:
on CPU an fp8 weight (``torch.float8_e4m3fn``) goes over DLPack as its uint8
bytes (DLPack does not carry float8 here) and is bitcast back to
``jnp.float8_e4m3fn`` inside the JAX function, a no-op; call_jax takes float8
XLA tensors as they are; fp4 codes
(``torch.float4_e2m1fn_x2``, one byte holding two codes) are the very bytes of
the uint8 packed form, so they are viewed as uint8 before anything else.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import torch

import xla_qops

_NUMPY_DTYPES = {
    torch.bfloat16: np.dtype(jnp.bfloat16),
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.bool: np.dtype(np.bool_),
    torch.float8_e4m3fn: np.dtype(jnp.float8_e4m3fn),
}

FLOAT4_X2 = getattr(torch, "float4_e2m1fn_x2", None)  # torch >= 2.8
if FLOAT4_X2 is not None:
    # The same bytes as the packed uint8 form (two e2m1 codes per byte);
    # the op names the format (weight_format="fp4").
    _NUMPY_DTYPES[FLOAT4_X2] = np.dtype(np.uint8)


def is_float4_x2(t) -> bool:
    return FLOAT4_X2 is not None and t is not None and t.dtype == FLOAT4_X2


def as_bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    """An fp8 or fp4 tensor as its uint8 bytes (same shape: one byte per element); other
    tensors as they are."""
    if t is not None and (t.dtype == torch.float8_e4m3fn or is_float4_x2(t)):
        return t.view(torch.uint8)
    return t


@dataclasses.dataclass(frozen=True)
class Abstract:
    """Shape and numpy dtype of a tensor, for `xla_qops.spec.check_args`.

    Not a `jax.ShapeDtypeStruct`: that one canonicalizes float64 to float32
    when x64 is off, which would let a float64 activation through.
    """

    shape: tuple
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def abstract(t: torch.Tensor, name: str, *, batch_dims: bool = False) -> Abstract:
    """`t`'s shape and dtype.

    With `batch_dims` (the activation), symbolic leading dims (torch.compile
    with dynamic shapes) become 1: validation needs only the trailing dim, and
    not reading them keeps dynamo from specializing on the batch size. Every
    other dim is read (a guard on the weight's fixed shape).
    """
    if t.dtype not in _NUMPY_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {t.dtype}")
    if batch_dims and t.dim():
        shape = tuple(d if isinstance(d, int) else 1 for d in t.shape[:-1])
        shape += (int(t.shape[-1]),)
    else:
        shape = tuple(int(d) for d in t.shape)
    return Abstract(shape, _NUMPY_DTYPES[t.dtype])


# jaxlib aliases a DLPack CPU buffer only if it is 64-byte aligned, and copies
# it otherwise. torch's CPU allocator aligns to 64 bytes; numpy-allocated
# tensors (torch.from_numpy) and offset views may not be.
ALIGNMENT = 64


def is_aligned(t: torch.Tensor) -> bool:
    return t.device.type != "cpu" or t.data_ptr() % ALIGNMENT == 0


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when JAX can alias it, else a contiguous torch-allocated copy."""
    t = t.contiguous()
    return t if is_aligned(t) else t.clone()


# The torch tensors whose memory JAX arrays alias (to_jax). A tensor that JAX
# still references keeps its Python object alive, so it stays in this set
# until JAX lets go of it.
_ALIASED: weakref.WeakSet = weakref.WeakSet()


def to_jax(t: torch.Tensor | None):
    """A CPU tensor as a `jax.Array` sharing its memory (DLPack).

    No copy for contiguous, aligned tensors (the module's buffers always are,
    see XlaQuantizedLinear.load_quantized_weight); otherwise one torch-side
    copy, the same one jaxlib would make.
    """
    if t is None:
        return None
    # detach: DLPack refuses tensors that require grad.
    t = aligned(t.detach())
    _ALIASED.add(t)
    return jax.dlpack.from_dlpack(t)


def to_torch(a) -> torch.Tensor:
    """A CPU `jax.Array` as a torch tensor sharing its memory (DLPack)."""
    return torch.from_dlpack(a)


def _references_from_jax() -> int:
    """How many references JAX holds to the aliased tensors (each tensor's
    Python object holds one of its own)."""
    return sum(t._use_count() - 1 for t in list(_ALIASED))


@atexit.register
def _release_aliases_before_exit(quiet_s: float = 0.05, limit_s: float = 2.0):
    """Lets JAX drop its references to torch tensors while threads may still
    take the GIL.

    Dropping such a reference releases the torch tensor, which takes the GIL.
    JAX drops an execution's inputs on one of XLA's threads just after the
    outputs are ready, and arrays left to the interpreter's last garbage
    collection (autograd graphs hold them in cycles) may be released there
    too. During finalization Python >= 3.12 ends a thread that asks for the
    GIL, and ending an XLA thread that way aborts the process ("terminate
    called without an active exception": one exit in four of a script whose
    last call ran the op through JAX on CPU tensors, torch 2.14 and jax 0.12).
    So: wait for every computation, collect the cycles, then wait until the
    references JAX holds stop falling (those left belong to arrays still
    alive, released by this thread during finalization). Registered after
    JAX's own exit hook, so it runs before it.
    """
    for array in jax.live_arrays():
        if not array.is_deleted():
            array.block_until_ready()
    gc.collect()
    _wait_for_jax_releases(quiet_s, limit_s)


def _wait_for_jax_releases(quiet_s: float, limit_s: float) -> None:
    """Waits until JAX holds no aliased tensor, or its count has not fallen for
    `quiet_s` (the rest belong to live arrays), or `limit_s` has passed."""
    start = changed = time.monotonic()
    held = _references_from_jax()
    while held and time.monotonic() - changed < quiet_s and time.monotonic() - start < limit_s:
        time.sleep(0.001)
        now_held = _references_from_jax()
        if now_held != held:
            held, changed = now_held, time.monotonic()


# ---------------------------------------------------------------------------
# The JAX functions. Module-level so their identity is stable: call_jax caches
# its lowering by id(function) plus argument shapes and static values.

def _weight(w, weight_format):
    """The weight as xla_qops takes it: fp8 arrives as its uint8 bytes (`as_bytes`)."""
    if weight_format == "fp8" and w.dtype == jnp.uint8:
        return jax.lax.bitcast_convert_type(w, jnp.float8_e4m3fn)
    return w


def jax_forward(x, w, scale, zero_point, *, block_size, int4_weight,
                quantize_activation, impl, weight_format=None, activation_format=None):
    """y = xla_qops.quantized_matmul(...) (shapes and layouts: API.md sections 2 and 7).

    `weight_format` is the resolved format (never None for an fp8 weight,
    which arrives as uint8 bytes)."""
    return xla_qops.quantized_matmul(x, _weight(w, weight_format), scale, zero_point,
                                     block_size, int4_weight, quantize_activation,
                                     weight_format=weight_format,
                                     activation_format=activation_format, impl=impl)


def jax_backward(grad, x, w, scale, zero_point, *, block_size, int4_weight,
                 quantize_activation, impl, weight_format=None, activation_format=None):
    """(dx, dscale, dzero_point) of `jax_forward` for the cotangent `grad`.

    xla_qops' custom VJP supplies the formula (the fused-XLA backward, with
    activation quantization treated as the identity). Without a zero point
    dzero_point is zeros shaped like `scale`, so the op has a fixed output
    arity.
    """
    def forward(x, scale, zero_point):
        return jax_forward(x, w, scale, zero_point, block_size=block_size,
                           int4_weight=int4_weight,
                           quantize_activation=quantize_activation, impl=impl,
                           weight_format=weight_format, activation_format=activation_format)

    _, vjp = jax.vjp(forward, x, scale, zero_point)
    dx, dscale, dzero = vjp(grad)
    if dzero is None:
        dzero = jnp.zeros_like(scale)
    return dx, dscale, dzero


_STATIC = ("block_size", "int4_weight", "quantize_activation", "impl", "weight_format",
           "activation_format")
_jit_forward = jax.jit(jax_forward, static_argnames=_STATIC)
_jit_backward = jax.jit(jax_backward, static_argnames=_STATIC)


def _weight_as_bytes(tensors) -> tuple:
    """`tensors` (..., x, w, scale, zero_point) with w as its bytes (`as_bytes`)."""
    tensors = list(tensors)
    tensors[-3] = as_bytes(tensors[-3])
    return tuple(tensors)


def run_on_cpu(backward: bool, tensors, **static):
    """Runs the jitted forward or backward on CPU tensors, zero-copy both ways."""
    fn = _jit_backward if backward else _jit_forward
    out = fn(*(to_jax(t) for t in _weight_as_bytes(tensors)), **static)
    if isinstance(out, tuple):
        return tuple(to_torch(a) for a in out)
    return to_torch(out)


@functools.cache
def _call_jax():
    from torch_xla.core.xla_builder import call_jax
    return call_jax


def run_on_xla(backward: bool, tensors, **static):
    """Embeds the forward or backward in torch_xla's graph (no host transfer)."""
    fn = jax_backward if backward else jax_forward
    # call_jax carries float8 XLA tensors as they are (torchax's dtype map has
    # them); a dtype view of one would not stay a plain XLA tensor in backward.
    out = _call_jax()(fn, tuple(tensors), static)
    return tuple(out) if isinstance(out, (tuple, list)) else out
