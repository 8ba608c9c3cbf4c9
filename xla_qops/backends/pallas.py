"""pallas backend: the Pallas kernels of `pallas_kernels` for each platform.

* ``"tpu"``: the Mosaic kernel (`pallas_kernels.tpu.quantized_matmul`).
* ``"cuda"`` / ``"gpu"``: the Triton kernel (`pallas_kernels.gpu.quantized_matmul`).
* ``"cpu"``: the TPU kernel body in Pallas interpret mode -- how the tests and
  the torch bridge exercise the kernels on a machine without an accelerator.
  It is slow (a checking path, not a fast one), so impl="auto" never picks it.

Both kernels take every weight format of API.md section 7 (int8, int4, fp8,
fp4) and both activation formats (int8, fp8); what the dot multiplies on each
target is `pallas_kernels.block_sizes.tpu_operands` / `gpu_operands`.
Each kernel declines a spec it cannot tile (`supports`); impl="auto" then
falls back to the fused XLA backend, and impl="pallas" fails the lowering for
that platform with a ValueError (`xla_qops.dispatch`), or fails at once if no
platform's kernel takes the spec. ROCm has no kernel here.
"""

from __future__ import annotations

import jax

_TPU = ("tpu", "cpu")
_GPU = ("cuda", "gpu")


def available() -> bool:
    try:
        import pallas_kernels.gpu.quantized_matmul  # noqa: F401
        import pallas_kernels.tpu.quantized_matmul  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel_module(platform: str):
    if platform in _TPU:
        from pallas_kernels.tpu import quantized_matmul as kernel
    elif platform in _GPU:
        from pallas_kernels.gpu import quantized_matmul as kernel
    else:
        return None
    return kernel


def supports(spec, platform) -> bool:
    kernel = _kernel_module(platform or jax.default_backend())
    if kernel is None:
        return False
    return kernel.supports(block_size=spec.block_size, packed=spec.packed,
                           x_dtype=spec.x_dtype, quantize_activation=spec.quantize_activation,
                           weight_format=spec.weight_format,
                           activation_format=spec.activation_format)


def matmul(x, w, scale, zero_point, spec, platform=None):
    platform = platform or jax.default_backend()
    kernel = _kernel_module(platform)
    if kernel is None:
        raise ValueError(f"platform: the pallas backend has kernels for tpu, cuda/gpu "
                         f"and cpu (interpret mode), got {platform!r}")
    kwargs = dict(block_size=spec.block_size, quantize_activation=spec.quantize_activation,
                  weight_format=spec.weight_format, activation_format=spec.activation_format)
    if platform == "cpu":
        kwargs["interpret"] = True
    return kernel.quantized_matmul(x, w, scale, zero_point, **kwargs)
