"""Implementations of `quantized_matmul`, one module per backend.

Each backend module implements `Backend`: the three functions below, as
module-level functions. `xla_qops.dispatch` is the one place that picks among
them (and checks that a module it loads has all three).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:
    import jax

    from xla_qops.spec import MatmulSpec


@runtime_checkable
class Backend(Protocol):
    """The contract between `xla_qops.dispatch` and a backend module."""

    def available(self) -> bool:
        """Whether this installation can run the backend at all (e.g. the
        compiled C++ module is built, the Pallas modules import)."""

    def supports(self, spec: MatmulSpec, platform: str) -> bool:
        """Whether the backend runs the problem `spec` on `platform` ("cpu",
        "tpu", "cuda", "rocm"). Called at trace time, for every platform the
        function might be lowered for."""

    def matmul(self, x: jax.Array, w: jax.Array, scale: jax.Array,
               zero_point: Optional[jax.Array], spec: MatmulSpec,
               platform: Optional[str]) -> jax.Array:
        """``y = x @ (scale * q - zero_point).T``.

        `x` is flattened to ``[M, K]``, the other arguments are in API.md's
        layouts and already validated (`xla_qops.spec.check_args`), and the
        result is ``[M, N]`` in x's dtype. `platform` is the platform being
        lowered for, or None when the backend's result does not depend on it
        (then a backend that does depend on it chooses at lowering itself).
        """


__all__ = ["Backend"]
