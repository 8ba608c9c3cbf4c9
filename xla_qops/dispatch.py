"""The one dispatch point: which backend runs a `quantized_matmul`.

``impl`` values (`Impl`):

* ``"reference"``: the plain formula (`backends/reference.py`), for checking.
* ``"xla"``: fused pure-JAX (`backends/xla.py`), runs anywhere.
* ``"pallas"``: the Pallas kernel for the platform (Mosaic on TPU, Triton on
  CUDA GPUs, the TPU kernel in interpret mode on the host CPU).
* ``"custom_call"``: the host-CPU C++ kernels (XLA FFI).
* ``"auto"``: per platform, the first entry of `AUTO_ORDER` whose backend is
  available and supports the problem.

Every impl is resolved when the function is *lowered*, per platform
(`jax.lax.platform_dependent`), not when it is traced: exporting for ``tpu``
from a CPU machine yields the TPU choice, for ``cuda`` the CUDA one. An
explicit impl that cannot run on the platform being lowered for -- not
available there, or not supporting the problem -- fails that lowering with a
ValueError naming the impl, the scheme and the platform (it cannot fail
earlier: the same traced function may be lowered for another platform). An
impl that supports the problem on no platform at all, or is not installed,
fails at once.

A backend module implements `xla_qops.backends.Backend` (``available``,
``supports``, ``matmul``). Adding a backend means adding it to `BACKENDS` and
`Impl` and, if it should be picked automatically, to `AUTO_ORDER`; nothing
else changes.
"""

from __future__ import annotations

import importlib
import typing
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from xla_qops.backends import Backend

Impl = Literal["auto", "xla", "pallas", "custom_call", "reference"]
IMPLS: tuple[str, ...] = typing.get_args(Impl)

BACKENDS = {
    "reference": "xla_qops.backends.reference",
    "xla": "xla_qops.backends.xla",
    "pallas": "xla_qops.backends.pallas",
    "custom_call": "xla_qops.backends.custom_call",
}

# Preference per platform for impl="auto"; "xla" supports everything, so it
# always ends the list. The keys are the platforms every impl is resolved for.
AUTO_ORDER = {
    "cpu": ("custom_call", "xla"),
    "tpu": ("pallas", "xla"),
    "cuda": ("pallas", "xla"),
    "rocm": ("xla",),
}
PLATFORMS = tuple(AUTO_ORDER)
# Backends whose result does not depend on the platform (no switch needed).
_PORTABLE = ("xla", "reference")


def check_impl(impl) -> None:
    known = ("auto",) + tuple(BACKENDS)
    if impl not in known:
        raise ValueError(f"impl: expected one of {', '.join(map(repr, known))}, got {impl!r}")


def _module(name: str) -> Backend:
    module = importlib.import_module(BACKENDS[name])  # cached by sys.modules
    if not isinstance(module, Backend):
        missing = [f for f in ("available", "supports", "matmul") if not hasattr(module, f)]
        raise TypeError(f"impl: backend {name!r} ({BACKENDS[name]}) lacks "
                        f"{', '.join(missing)} of the Backend protocol")
    return module


def _bound(name: str, spec, platform: str | None):
    matmul = _module(name).matmul
    return lambda x, w, scale, zp: matmul(x, w, scale, zp, spec, platform)


def auto_choice(spec, platform: str) -> str:
    """The backend name impl="auto" uses for `spec` on `platform`."""
    for name in AUTO_ORDER.get(platform, ("xla",)):
        module = _module(name)
        if module.available() and module.supports(spec, platform):
            return name
    raise AssertionError("unreachable: the xla backend supports every spec")


def _describe(spec) -> str:
    return f"{spec.scheme} block_size={spec.block_size} ({spec.x_dtype} x)"


def resolve(impl: str, spec):
    """Returns ``f(x, w, scale, zero_point) -> y`` for the given impl and spec,
    choosing per platform when it is lowered (module docstring)."""
    check_impl(impl)
    if impl == "auto":
        choices = {p: auto_choice(spec, p) for p in PLATFORMS}
        default = _bound("xla", spec, None)
    else:
        module = _module(impl)
        if not module.available():
            raise ValueError(f"impl: {impl!r} is not available on this installation "
                             f"({module.__doc__.strip().splitlines()[0]})")
        choices = {p: impl for p in PLATFORMS if module.supports(spec, p)}
        if not choices:
            raise ValueError(f"impl: {impl!r} does not support {_describe(spec)} on "
                             f"{', '.join(PLATFORMS[:-1])} or {PLATFORMS[-1]}")
        default = _refusal(impl, spec, "this platform")

    names = set(choices.values())
    if len(names) == 1 and names <= set(_PORTABLE) and len(choices) == len(PLATFORMS):
        # The same platform-independent backend everywhere: no switch needed.
        return _bound(names.pop(), spec, None)
    branches = {p: (_bound(choices[p], spec, p) if p in choices else _refusal(impl, spec, p))
                for p in PLATFORMS}

    def run(x, w, scale, zp):
        return lax.platform_dependent(x, w, scale, zp, default=default, **branches)
    return run


# ------------------------------------------------- refusing at lowering time

def _refusal(impl: str, spec, platform: str):
    """A branch that traces fine (the function may never be lowered for
    `platform`) and fails the lowering if it is."""
    where = "on the host CPU only" if impl == "custom_call" else ""
    message = (f"impl: {impl!r} cannot run {_describe(spec)} on {platform}"
               f"{' (it runs ' + where + ')' if where else ''}; lowering for {platform} "
               f"needs impl='auto' or an impl that supports it there "
               f"(see xla_qops.dispatch.AUTO_ORDER)")
    out_features = spec.out_features

    def refuse(x, w, scale, zp):
        del w, scale, zp
        return _unsupported_p.bind(x, out_features=out_features, message=message)
    return refuse


_unsupported_p = Primitive("xla_qops_unsupported_impl")


def _unsupported_abstract_eval(x, *, out_features, message):
    del message
    return jax.core.ShapedArray((*x.shape[:-1], out_features), x.dtype)


def _unsupported_lowering(ctx, x, *, out_features, message):
    del ctx, x, out_features
    raise ValueError(message)


def _unsupported_batching(args, dims, **params):
    (x,), (d,) = args, dims
    if d is not None and d != 0:  # None: not mapped
        x, d = jnp.moveaxis(x, d, 0), 0  # the output's batch axis, before [..., N]
    return _unsupported_p.bind(x, **params), d


_unsupported_p.def_abstract_eval(_unsupported_abstract_eval)
mlir.register_lowering(_unsupported_p, _unsupported_lowering)
batching.primitive_batchers[_unsupported_p] = _unsupported_batching
