"""Every difference between the JAX versions xla-qops supports, in one place.

xla-qops runs on jax/jaxlib from 0.7.1 (what torch_xla 2.9, its last release,
needs) to the newest release. Code elsewhere asks this module instead of
testing versions or attributes itself. The differences that matter here:

| what | jax 0.7.1 | newer (checked on 0.12) |
|---|---|---|
| lowering a Triton kernel for ``cuda`` on a machine without a GPU | works | asks for a GPU unless an abstract GPU device is set (`lowering_target`) |
| the TPU a kernel is lowered for | the attached TPU only | also an abstract TPU device (`lowering_target`), read by `pltpu.get_tpu_info` |
| `pltpu.get_tpu_info` (VMEM, MXU width, generation of the target) | absent | present (`tpu_info`) |
| Mosaic's layout passes (``tpu-infer-memref-layout`` ...) in jaxlib | registered | gone from jaxlib >= 0.8.2 (`mosaic_layout_passes_available`) |
| `jaxprs_in_params` | `jax.core` | `jax.extend.core` |
| Mosaic GPU's `plgpu.kernel` output argument | ``out_shape`` | ``out_type`` (`mosaic_gpu_kernel`) |
| Pallas' Triton backend | supported | deprecated: a DeprecationWarning at every lowering (0.12) |

Not here, because they are not version differences but settings every version
has: the axis types of a mesh (`jax.make_mesh` defaults to Explicit axes from
0.8 on; the project and its docs pass ``axis_types`` explicitly), and XLA's
rewrite of a division by a broadcast into a multiplication by the reciprocal
(which both versions do under jit; `pallas_kernels.numerics` is written so it
cannot apply).

This module sits at the bottom of the project (it imports only JAX), so that
`pallas_kernels` and `xla_qops` can both use it.
"""

from __future__ import annotations

import contextlib
import functools
import re

import jax

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in re.findall(r"\d+", jax.__version__)[:3])

# What `lowering_target` assumes when no device kind is given: an H100 (sm90)
# for cuda, a v6e for tpu -- the project's main targets.
DEFAULT_TARGET_KIND = {"cuda": "NVIDIA H100", "tpu": "TPU v6 lite"}
_TARGET_CORES = {"cuda": 132, "tpu": 1}

try:  # jax >= 0.8: public, with a platform field
    from jax.sharding import AbstractDevice as _AbstractDevice
    from jax.sharding import use_abstract_mesh as _use_abstract_mesh
except ImportError:  # jax 0.7.1: lowering reads the attached device only
    _AbstractDevice = _use_abstract_mesh = None

try:
    from jax.extend.core import jaxprs_in_params  # noqa: F401  (jax >= 0.8)
except ImportError:
    from jax.core import jaxprs_in_params  # noqa: F401  (jax 0.7.1)


def abstract_devices_supported() -> bool:
    """Whether this JAX lowers for an abstract device (`lowering_target` has an effect)."""
    return _AbstractDevice is not None


def lowering_target(platform: str, device_kind: str | None = None):
    """Context manager: lower as if for one `device_kind` of `platform`.

    Newer JAX reads the target device's kind while lowering a Pallas kernel
    (Triton needs a compute capability, `pltpu.get_tpu_info` a TPU
    generation), and without a GPU attached it refuses to lower Triton for
    ``cuda`` at all. Inside this context it uses the abstract device instead,
    so ``jax.export(..., platforms=["cuda"])`` works on a CPU-only machine.
    On JAX versions without abstract devices it does nothing: there Triton
    lowers without a GPU, and the TPU block rule falls back to its default
    chip (``$XLA_QOPS_TPU_CHIP`` chooses another).

    Args:
      platform: "cuda" or "tpu".
      device_kind: as `jax.Device.device_kind` reports it ("NVIDIA H100",
        "TPU v5 lite", ...); default `DEFAULT_TARGET_KIND[platform]`.
    """
    if platform not in DEFAULT_TARGET_KIND:
        raise ValueError(f"platform: expected one of {', '.join(DEFAULT_TARGET_KIND)}, "
                         f"got {platform!r}")
    if _AbstractDevice is None:
        return contextlib.nullcontext()
    device = _AbstractDevice(device_kind=device_kind or DEFAULT_TARGET_KIND[platform],
                             num_cores=_TARGET_CORES[platform],
                             platform="gpu" if platform == "cuda" else platform)
    # One Explicit axis: an abstract mesh set outside jit only takes effect
    # when all of its axes are Explicit.
    mesh = jax.sharding.AbstractMesh((1,), ("_target",),
                                     axis_types=(jax.sharding.AxisType.Explicit,),
                                     abstract_device=device)
    return _use_abstract_mesh(mesh)


def _abstract_device():
    mesh = jax.sharding.get_abstract_mesh()
    return getattr(mesh, "abstract_device", None)


def abstract_target() -> tuple | None:
    """(platform, device kind) of the abstract device set by `lowering_target`, or None."""
    device = _abstract_device()
    if device is None:
        return None
    return (getattr(device, "platform", None), device.device_kind)


def tpu_target_kind() -> str | None:
    """The device kind of the TPU being lowered for, or None when that is unknown.

    An abstract TPU device set by `lowering_target` wins; otherwise the
    attached TPU; None on a machine without one (exporting for TPU from a CPU).
    """
    device = _abstract_device()
    if device is not None and device.device_kind.upper().startswith("TPU"):
        return device.device_kind
    if jax.default_backend() == "tpu":
        return jax.devices()[0].device_kind
    return None


def cuda_target_kind() -> str | None:
    """The device kind of the GPU being lowered for, or None when that is unknown.

    An abstract GPU device set by `lowering_target` wins; otherwise the
    attached GPU; None on a machine without one (on JAX 0.7.1, which has no
    abstract devices, exporting for cuda from a CPU).
    """
    device = _abstract_device()
    if device is not None and getattr(device, "platform", None) == "gpu":
        return device.device_kind
    if jax.default_backend() == "gpu":
        return jax.devices()[0].device_kind
    return None


def tpu_info():
    """`pltpu.get_tpu_info()` for the target TPU where this JAX has it, else None.

    None also when no TPU is attached or set by `lowering_target`, or when
    JAX does not know the chip.
    """
    from jax.experimental.pallas import tpu as pltpu

    get = getattr(pltpu, "get_tpu_info", None)
    if get is None or tpu_target_kind() is None:
        return None
    try:
        return get()
    except ValueError:  # a kind this JAX has no table entry for
        return None


def mosaic_gpu_kernel(body, out_type, **kwargs):
    """`jax.experimental.pallas.mosaic_gpu.kernel` with its output types.

    The argument was ``out_shape`` in JAX 0.7.1 and is ``out_type`` since.
    """
    import inspect

    from jax.experimental.pallas import mosaic_gpu as plgpu

    name = "out_type" if "out_type" in inspect.signature(plgpu.kernel).parameters else "out_shape"
    return plgpu.kernel(body, **{name: out_type}, **kwargs)


@functools.cache
def mosaic_layout_passes_available() -> bool:
    """Whether jaxlib registers Mosaic's layout passes (gone from jaxlib 0.8.2 on)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import tpu as tpu_dialect
    from jaxlib.mlir.passmanager import PassManager

    ctx = jax_mlir.make_ir_context()
    tpu_dialect.register_dialect(ctx)
    with ctx:
        try:
            PassManager.parse(
                "builtin.module(func.func(tpu-infer-memref-layout{hardware-generation=6}))")
        except Exception:  # MLIR reports an unknown pass as a ValueError/MLIRError
            return False
    return True


__all__ = ["JAX_VERSION", "DEFAULT_TARGET_KIND", "abstract_devices_supported",
           "lowering_target", "abstract_target", "tpu_target_kind", "cuda_target_kind",
           "tpu_info", "mosaic_gpu_kernel", "mosaic_layout_passes_available", "jaxprs_in_params"]
