"""The one dispatch point: which backend runs a `quantized_matmul`.

``impl`` values:

* ``"reference"``: the plain formula (`backends/reference.py`), for checking.
* ``"xla"``: fused pure-JAX (`backends/xla.py`), runs anywhere.
* ``"pallas"``: the Pallas kernel for the current backend (Mosaic on TPU,
  Triton on GPU, interpret mode on CPU).
* ``"custom_call"``: the host-CPU C++ kernels (XLA FFI).
* ``"auto"``: per platform, the first entry of `AUTO_ORDER` whose backend is
  available and supports the problem. The choice is made when the function is
  *lowered* (`jax.lax.platform_dependent`), so exporting for ``tpu`` from a
  CPU machine yields the TPU choice.

A backend module provides ``available() -> bool``,
``supports(spec, platform) -> bool`` and
``matmul(x, w, scale, zero_point, spec, platform) -> y``. Adding a backend
means adding it to `BACKENDS` and, if it should be picked automatically, to
`AUTO_ORDER`; nothing else changes.
"""

from __future__ import annotations

import importlib

import jax
from jax import lax

BACKENDS = {
    "reference": "xla_qops.backends.reference",
    "xla": "xla_qops.backends.xla",
    "pallas": "xla_qops.backends.pallas",
    "custom_call": "xla_qops.backends.custom_call",
}

# Preference per platform for impl="auto"; "xla" supports everything, so it
# always ends the list.
AUTO_ORDER = {
    "cpu": ("custom_call", "xla"),
    "tpu": ("pallas", "xla"),
    "cuda": ("pallas", "xla"),
    "rocm": ("xla",),
}

IMPLS = ("auto",) + tuple(BACKENDS)


def check_impl(impl) -> None:
    known = ("auto",) + tuple(BACKENDS)
    if impl not in known:
        raise ValueError(f"impl: expected one of {', '.join(map(repr, known))}, got {impl!r}")


def _module(name: str):
    return importlib.import_module(BACKENDS[name])  # cached by sys.modules


def _bound(name: str, spec, platform: str):
    matmul = _module(name).matmul
    return lambda x, w, scale, zp: matmul(x, w, scale, zp, spec, platform)


def auto_choice(spec, platform: str) -> str:
    """The backend name impl="auto" uses for `spec` on `platform`."""
    for name in AUTO_ORDER.get(platform, ("xla",)):
        module = _module(name)
        if module.available() and module.supports(spec, platform):
            return name
    raise AssertionError("unreachable: the xla backend supports every spec")


def resolve(impl: str, spec):
    """Returns ``f(x, w, scale, zero_point) -> y`` for the given impl and spec."""
    check_impl(impl)
    if impl != "auto":
        platform = jax.default_backend()
        module = _module(impl)
        if not module.available():
            raise ValueError(f"impl: {impl!r} is not available on this installation "
                             f"({module.__doc__.strip().splitlines()[0]})")
        if not module.supports(spec, platform):
            raise ValueError(f"impl: {impl!r} does not support {spec.scheme} "
                             f"block_size={spec.block_size} on {platform}")
        return _bound(impl, spec, platform)

    choices = {p: auto_choice(spec, p) for p in AUTO_ORDER}
    if len(set(choices.values())) == 1 and next(iter(choices.values())) in ("xla", "reference"):
        # Platform-independent backend: no need for a lowering-time switch.
        return _bound(next(iter(choices.values())), spec, None)
    branches = {p: _bound(name, spec, p) for p, name in choices.items()}

    def run(x, w, scale, zp):
        return lax.platform_dependent(x, w, scale, zp,
                                      default=_bound("xla", spec, None), **branches)
    return run
