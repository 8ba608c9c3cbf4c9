"""`torch.ops.xla.quantized_matmul`, run by xla_qops.

Schema (torch_xla's, unchanged, so code written for
``torch_xla.experimental.xla_quantized_matmul`` keeps working)::

    xla::quantized_matmul(Tensor x, Tensor w, Tensor scale, Tensor? zero_point=None,
        int? block_size=-1, bool? int4_weight=False, bool? quantize_activation=False)

plus two overloads with appended arguments, which PyTorch picks by the
arguments of a call to ``torch.ops.xla.quantized_matmul`` (it tries the
overloads in the order they were defined, the default first, and takes the
first whose schema fits)::

    xla::quantized_matmul.formats(..., str? weight_format=None,
        str? activation_format=None, str impl="auto")
    xla::quantized_matmul.with_impl(..., str impl="auto")

``formats`` carries API.md section 7's float element formats, appended after
torch_xla's arguments, and is defined before ``with_impl`` so that an eighth
positional argument is `weight_format` (``quantized_matmul(x, w, s, None, -1,
False, False, "fp8")``), as section 7 says; ``impl`` is reached by keyword.
``with_impl`` (``impl`` the eighth argument) is kept for callers that name it.
The extra arguments live in overloads rather than in the default schema
because torch_xla defines the default schema itself when its module is
imported; a schema cannot be redefined, but overloads can be added to it.

Float formats: ``w`` may be ``torch.float8_e4m3fn`` (fp8, inferred from the
dtype) or, for fp4, uint8 packed e2m1 codes with ``weight_format="fp4"`` or a
``torch.float4_e2m1fn_x2`` tensor of the same shape (fp4 inferred from the
dtype). They cross into JAX as their bytes (`_jax_interop.as_bytes`).

Registration, in this order, whatever the import order of the user's code:

1. import ``torch_xla.experimental.xla_quantized_matmul`` if torch_xla is
   installed (it defines the op and its own kernels), else define the op here;
2. register this project's kernels with ``allow_override=True`` for the
   ``CompositeExplicitAutograd`` key (CPU tensors) and the ``XLA`` key, on both
   overloads. A later import of torch_xla's module is then a no-op (Python
   caches the module), so our kernels stay in place;
3. a fake (meta) kernel returning ``[..., out]`` in ``x``'s dtype, and an
   autograd formula for ``x``, ``scale`` and ``zero_point`` through the op
   ``xla_qops::quantized_matmul_backward`` (same CPU / XLA kernels, the JAX
   VJP of xla_qops.quantized_matmul).

Validation is xla_qops.spec.check_args, applied to tensor shapes and dtypes
before anything is converted (also in the fake kernel, so torch.compile
reports the same errors as eager), once per distinct signature.

Routes: CPU tensors with ``impl`` "auto" or "custom_call" go straight to the
C++ kernels (`_cpu_ops`, a torch operator on torch's thread pool) where those
kernels support the problem (`xla_qops.backends.custom_call.supports`; the
float formats wait for them); other impls on CPU tensors, the problems the
kernels decline, and every backward pass, go to JAX by DLPack
(`_jax_interop`); XLA tensors are embedded in torch_xla's graph by call_jax.
"""

from __future__ import annotations

import functools
import warnings

import torch

from torch_bridge import _cpu_ops
from torch_bridge import _jax_interop as interop
from xla_qops import dispatch
from xla_qops.backends import custom_call as _custom_call
from xla_qops.spec import MatmulSpec, check_args

try:  # step 1: let torch_xla define the op (and register its kernels) first
    import torch_xla.experimental.xla_quantized_matmul  # noqa: F401
    HAS_TORCH_XLA = True
except ImportError:
    HAS_TORCH_XLA = False

_ARGS = ("Tensor x, Tensor w, Tensor scale, Tensor? zero_point=None, int? block_size=-1, "
         "bool? int4_weight=False, bool? quantize_activation=False")
SCHEMA = f"quantized_matmul({_ARGS}) -> Tensor"
_FORMAT_ARGS = "str? weight_format=None, str? activation_format=None"
SCHEMA_FORMATS = f'quantized_matmul.formats({_ARGS}, {_FORMAT_ARGS}, str impl="auto") -> Tensor'
SCHEMA_WITH_IMPL = f'quantized_matmul.with_impl({_ARGS}, str impl="auto") -> Tensor'
SCHEMA_BACKWARD = (
    "quantized_matmul_backward(Tensor grad, Tensor x, Tensor w, Tensor scale, "
    "Tensor? zero_point, int block_size, bool int4_weight, bool quantize_activation, "
    f"str impl, {_FORMAT_ARGS}) -> (Tensor, Tensor, Tensor)")
OVERLOADS = ("quantized_matmul", "quantized_matmul.formats", "quantized_matmul.with_impl")

# Library objects must stay alive: their registrations vanish with them.
_xla_def = torch.library.Library("xla", "FRAGMENT")
_xla_impl = torch.library.Library("xla", "IMPL")
_ours = torch.library.Library("xla_qops", "DEF")

if not HAS_TORCH_XLA:
    _xla_def.define(SCHEMA)
_xla_def.define(SCHEMA_FORMATS)  # before with_impl: see the module docstring
_xla_def.define(SCHEMA_WITH_IMPL)
_ours.define(SCHEMA_BACKWARD)


# ---------------------------------------------------------------------------
# Validation (delegated to xla_qops.spec) and static arguments.

def _statics(block_size, int4_weight, quantize_activation, impl, weight_format=None,
             activation_format=None) -> dict:
    """The non-tensor arguments with torch_xla's `None` meaning the default."""
    return dict(block_size=-1 if block_size is None else block_size,
                int4_weight=bool(int4_weight) if int4_weight is not None else False,
                quantize_activation=(bool(quantize_activation)
                                     if quantize_activation is not None else False),
                impl=impl, weight_format=weight_format, activation_format=activation_format)


def _resolved(static, spec: MatmulSpec) -> dict:
    """`static` with the formats the spec resolved (an fp8 weight crosses into JAX as
    bytes, so its format must be named there)."""
    return dict(static, weight_format=spec.weight_format,
                activation_format=spec.activation_format)


def _check(x, w, scale, zero_point, static) -> MatmulSpec:
    """All argument checks of the op, run once per distinct signature (devices,
    dtypes, the shapes validation reads, static arguments); later calls with the
    same signature reuse the spec. Symbolic shapes (torch.compile) are never
    cached."""
    key = (x.device, x.dtype, x.dim(), x.shape[-1] if x.dim() else None,
           w.device, w.dtype, w.shape, scale.device, scale.dtype, scale.shape,
           None if zero_point is None else (zero_point.device, zero_point.dtype,
                                             zero_point.shape),
           static["block_size"], static["int4_weight"], static["quantize_activation"],
           static["impl"], static["weight_format"], static["activation_format"])
    try:
        spec = _SPECS.get(key)
    except TypeError:  # unhashable symbolic sizes
        return _check_uncached(x, w, scale, zero_point, static)
    if spec is None:
        spec = _check_uncached(x, w, scale, zero_point, static)
        if len(_SPECS) >= _MAX_SPECS:
            _SPECS.clear()
        _SPECS[key] = spec
    return spec


_SPECS: dict = {}
_MAX_SPECS = 4096


def check(x, w, scale, zero_point=None, block_size=-1, int4_weight=False,
          quantize_activation=False, impl="auto", weight_format=None,
          activation_format=None) -> MatmulSpec:
    """The op's validation (what a call with these arguments would raise)."""
    return _check(x, w, scale, zero_point,
                  _statics(block_size, int4_weight, quantize_activation, impl, weight_format,
                           activation_format))


def _weight_format(w, weight_format):
    """A `torch.float4_e2m1fn_x2` weight says fp4 by its dtype (its bytes are the uint8
    packed form that xla_qops.spec checks); anything else is spec's to check."""
    if not interop.is_float4_x2(w):
        return weight_format
    if weight_format is None:
        return "fp4"
    if weight_format != "fp4":
        raise TypeError(f"w: a torch.float4_e2m1fn_x2 tensor holds e2m1 codes "
                        f"(weight_format='fp4'), got weight_format={weight_format!r}")
    return weight_format


def _check_uncached(x, w, scale, zero_point, static) -> MatmulSpec:
    """All argument checks of the op: devices here, the rest in xla_qops.spec."""
    dispatch.check_impl(static["impl"])
    if x.device.type not in ("cpu", "xla", "meta"):
        raise ValueError(f"x: torch_bridge runs on CPU and XLA tensors, got a tensor on "
                         f"{x.device}")
    if x.device.type == "xla":
        _impl_for_xla_tensors(static["impl"])  # raises for impls that cannot run there
    for name, t in (("w", w), ("scale", scale), ("zero_point", zero_point)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, "
                             f"got one on {t.device}")
    for name in ("weight_format", "activation_format"):
        if static[name] is not None and not isinstance(static[name], str):
            raise TypeError(f"{name}: expected a str or None, got {type(static[name]).__name__}")
    return check_args(interop.abstract(x, "x", batch_dims=True), interop.abstract(w, "w"),
                      interop.abstract(scale, "scale"),
                      None if zero_point is None else interop.abstract(zero_point, "zero_point"),
                      static["block_size"], static["int4_weight"],
                      static["quantize_activation"],
                      _weight_format(w, static["weight_format"]), static["activation_format"])


@functools.cache
def _xla_device_type() -> str:
    import torch_xla.runtime
    return torch_xla.runtime.device_type()


def _impl_for_xla_tensors(impl: str) -> str:
    """impl="auto" inside a torch_xla graph on the CPU device means "xla".

    xla_qops' auto choice on the cpu platform prefers the host C++ kernels
    (an XLA FFI custom call). Their targets are registered in jaxlib's copy of
    XLA; torch_xla's PJRT CPU client is a separate copy that does not know
    them, so the embedded HLO would fail to compile. The fused XLA backend is
    plain HLO and runs in any client. On TPU/GPU "auto" is kept (xla_qops
    then picks per platform when call_jax lowers the function).
    """
    if _xla_device_type() == "CPU":
        if impl == "custom_call":
            raise ValueError("impl: 'custom_call' runs on CPU tensors only; torch_xla's CPU "
                             "client cannot call its FFI target. Use 'auto' or 'xla' for "
                             "XLA tensors")
        if impl == "auto":
            return "xla"
    return impl


# ---------------------------------------------------------------------------
# Kernels.

def _run(backward: bool, tensors, static):
    """Forward or backward on `tensors` (x is tensors[-4]) through JAX: DLPack
    on CPU, call_jax on XLA."""
    if tensors[-4].device.type == "xla":
        static = dict(static, impl=_impl_for_xla_tensors(static["impl"]))
        return interop.run_on_xla(backward, tensors, **static)
    return interop.run_on_cpu(backward, tensors, **static)


def direct_supports(spec: MatmulSpec) -> bool:
    """Whether the C++ kernels run this problem (the float formats once they have them)."""
    return _custom_call.supports(spec, "cpu")


def runs_direct(x, impl: str, spec: MatmulSpec | None = None) -> bool:
    """Whether a forward on `x` goes straight to the C++ kernels (`_cpu_ops`)."""
    return (x.device.type == "cpu" and impl in _cpu_ops.DIRECT_IMPLS and _cpu_ops.available()
            and (spec is None or direct_supports(spec)))


def direct_matmul(x, prepared, spec: MatmulSpec):
    """`_cpu_ops.matmul` for a validated CPU `x` and a weight prepared for `spec`."""
    if spec.float_format:  # named: an fp weight may take int8 activations too
        return _cpu_ops.matmul(x, prepared, spec.quantize_activation,
                               activation_format=spec.activation_format)
    return _cpu_ops.matmul(x, prepared, spec.quantize_activation)


def _forward(x, w, scale, zero_point=None, block_size=-1, int4_weight=False,
             quantize_activation=False, weight_format=None, activation_format=None,
             impl="auto"):
    static = _statics(block_size, int4_weight, quantize_activation, impl, weight_format,
                      activation_format)
    spec = _check(x, w, scale, zero_point, static)
    if runs_direct(x, static["impl"], spec):
        prepared = _cpu_ops.prepare(interop.as_bytes(w) if spec.weight_format == "fp4" else w,
                                    scale, zero_point, spec, kept=False)
        return direct_matmul(x, prepared, spec)
    return _run(False, (x, w, scale, zero_point), _resolved(static, spec))


def _forward_with_impl(x, w, scale, zero_point=None, block_size=-1, int4_weight=False,
                       quantize_activation=False, impl="auto"):
    return _forward(x, w, scale, zero_point, block_size, int4_weight, quantize_activation,
                    impl=impl)


def _backward(grad, x, w, scale, zero_point, block_size, int4_weight,
              quantize_activation, impl, weight_format=None, activation_format=None):
    static = _statics(block_size, int4_weight, quantize_activation, impl, weight_format,
                      activation_format)
    spec = _check(x, w, scale, zero_point, static)
    return _run(True, (grad, x, w, scale, zero_point), _resolved(static, spec))


def _forward_fake(x, w, scale, zero_point=None, block_size=-1, int4_weight=False,
                  quantize_activation=False, weight_format=None, activation_format=None,
                  impl="auto"):
    static = _statics(block_size, int4_weight, quantize_activation, impl, weight_format,
                      activation_format)
    spec = _check(x, w, scale, zero_point, static)
    return x.new_empty((*x.shape[:-1], spec.out_features))


def _forward_fake_with_impl(x, w, scale, zero_point=None, block_size=-1, int4_weight=False,
                            quantize_activation=False, impl="auto"):
    return _forward_fake(x, w, scale, zero_point, block_size, int4_weight,
                         quantize_activation, impl=impl)


def _backward_fake(grad, x, w, scale, zero_point, block_size, int4_weight,
                   quantize_activation, impl, weight_format=None, activation_format=None):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


# ---------------------------------------------------------------------------
# Autograd.

def _setup_context(ctx, inputs, output):
    # inputs: all schema arguments, defaults filled in: 7 for the default schema,
    # 8 for with_impl (impl), 10 for formats (weight_format, activation_format, impl).
    x, w, scale, zero_point, block_size, int4_weight, quantize_activation, *rest = inputs
    weight_format = activation_format = None
    if len(rest) == 3:
        weight_format, activation_format, impl = rest
    else:
        impl = rest[0] if rest else "auto"
    ctx.static = _statics(block_size, int4_weight, quantize_activation, impl, weight_format,
                          activation_format)
    ctx.has_zero_point = zero_point is not None
    ctx.save_for_backward(x, w, scale, zero_point)


def _autograd_backward(ctx, grad):
    x, w, scale, zero_point = ctx.saved_tensors
    s = ctx.static
    dx, dscale, dzero = torch.ops.xla_qops.quantized_matmul_backward(
        grad, x, w, scale, zero_point if ctx.has_zero_point else None, s["block_size"],
        s["int4_weight"], s["quantize_activation"], s["impl"], s["weight_format"],
        s["activation_format"])
    needs = ctx.needs_input_grad
    grads = [dx if needs[0] else None, None, dscale if needs[2] else None,
             dzero if (ctx.has_zero_point and needs[3]) else None]
    # One gradient per entry of needs_input_grad: torch 2.9 has one per schema
    # argument; torch >= 2.10 may count only the tensors passed (3 when
    # zero_point is None), and refuses a longer tuple.
    return tuple((grads + [None] * len(needs))[:len(needs)])


# ---------------------------------------------------------------------------
# Registration (step 2 and 3 of the module docstring).

def _register():
    with warnings.catch_warnings():
        # Overriding torch_xla's kernels is the point; torch warns about it.
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        for name in OVERLOADS:
            forward, fake = ((_forward_with_impl, _forward_fake_with_impl)
                             if name.endswith("with_impl") else (_forward, _forward_fake))
            _xla_impl.impl(name, forward, "CompositeExplicitAutograd", allow_override=True)
            if HAS_TORCH_XLA:
                _xla_impl.impl(name, forward, "XLA", allow_override=True)
            torch.library.register_fake(f"xla::{name}", fake, lib=_xla_def)
            torch.library.register_autograd(f"xla::{name}", _autograd_backward,
                                            setup_context=_setup_context, lib=_xla_def)
        _ours.impl("quantized_matmul_backward", _backward, "CompositeExplicitAutograd")
        if HAS_TORCH_XLA:
            _ours.impl("quantized_matmul_backward", _backward, "XLA")
        torch.library.register_fake("xla_qops::quantized_matmul_backward", _backward_fake,
                                    lib=_ours)


_register()
