"""custom_call backend: host-CPU C++ kernels called through the XLA FFI.

The kernels live in the compiled module `xla_qops._cpu_kernels` (csrc/, built
at install time; docs/cpu_kernels.md). They take API.md's layouts as they are,
every call, with no prepare step:

* x ``[M, K]`` bfloat16 / float16 / float32 (vmap adds leading dims, which the
  kernel folds into M when only x is batched);
* w int8 ``[N, K]`` / ``[K/B, B, N]``, or packed int4 uint8 ``[N, K/2]`` /
  ``[K/B, B/2, N]``. Unpacked int4 (int8 container) is packed here, in the
  graph, first: one kernel per storage form keeps packed and unpacked results
  bit-identical (an odd block size or ``in`` cannot be packed; such weights
  run as int8, which holds [-8, 7] exactly);
* fp8 weights (float8_e4m3fn, int8's layouts) and fp4 weights (e2m1 codes
  packed as int4, uint8), API.md section 7: decoded to exact bf16 in the
  kernels;
* scale, zero_point: cast to float32 (a no-op for `quantize_weight`'s output).

All eight integer schemes and the float formats (W8A16-fp8, W4A16-fp4, and
with quantize_activation int8 or fp8 activations times any weight format),
per-channel and any block size, on the ``cpu`` platform.
Results are deterministic: identical for any thread count
(`set_num_threads`) and across concurrent calls.
"""

from __future__ import annotations

import functools
import os
import platform

import jax
import jax.numpy as jnp

from xla_qops import packing

TARGET = "xla_qops_quantized_matmul"


@functools.cache
def _extension():
    """The compiled module with its FFI target registered, or None."""
    try:
        from xla_qops import _cpu_kernels
    except ImportError:
        return None
    for name, capsule in _cpu_kernels.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return _cpu_kernels


def available() -> bool:
    return _extension() is not None


# What the kernels implement (csrc/qmm.h): every weight format with float
# activations (A16), and with quantized activations in either format.
WEIGHT_FORMATS = ("int8", "int4", "fp8", "fp4")
ACTIVATION_FORMATS = (None, "int8", "fp8")


def supports(spec, platform) -> bool:
    # Every scheme, block size and activation dtype of these formats.
    return (platform == "cpu" and spec.weight_format in WEIGHT_FORMATS
            and spec.activation_format in ACTIVATION_FORMATS)


def kernel_formats(spec) -> tuple[str, str]:
    """The kernels' (weight_format, activation_format) attributes of a spec:
    "int" (bits say 8 or 4), "fp8" or "fp4"; "int8" or "fp8"."""
    weight = spec.weight_format if spec.float_weight else "int"
    return weight, spec.activation_format or "int8"


def isa() -> str:
    """The kernel set in use on this CPU: "avx512", "avx2" or "generic" (portable C++)."""
    return _extension().isa()


def cpu_description() -> str:
    """This CPU and the kernels on it, for benchmark headers: the model name
    /proc/cpuinfo gives (else the machine type), the CPU count, the kernel
    set, where its decode streams prefetch ("t0" on Intel, "nta"
    elsewhere) and whether prefill multiplies on AMX (docs/cpu_kernels.md)."""
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    features = _extension().cpu_features()
    prefill = ", prefill on AMX" if features.get("amx") else ""
    return (f"{model}, {os.cpu_count()} CPUs, kernels '{isa()}' "
            f"(decode prefetch {features.get('stream_prefetch', '?')}{prefill})")


def num_threads() -> int:
    """Threads the kernels use (default: the CPUs this process may run on)."""
    return _extension().num_threads()


def set_num_threads(n: int) -> None:
    """Sets the kernels' thread count (results do not depend on it)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    _extension().set_num_threads(n)


def matmul(x, w, scale, zero_point, spec, platform=None):
    del platform  # only called for "cpu"
    if _extension() is None:
        raise RuntimeError("xla_qops._cpu_kernels is not built; reinstall the package")
    bits = spec.bits
    if spec.bits == 4 and not spec.packed:
        pairs_along = spec.block_size if spec.blockwise else spec.in_features
        if pairs_along % 2 == 0:
            w = packing.pack_int4(w, packing.input_axis(spec.blockwise))
        else:  # odd block / in: not packable, and [-8, 7] is valid int8
            bits = 8
    scale = scale.astype(jnp.float32)
    # Without a zero point the kernel ignores this operand; scale stands in.
    zero_point = scale if zero_point is None else zero_point.astype(jnp.float32)
    m = x.shape[0]
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((m, spec.out_features), x.dtype),
        vmap_method="expand_dims")
    weight_format, activation_format = kernel_formats(spec)
    return call(x, w, scale, zero_point,
                block_size=int(spec.block_size), bits=int(bits),
                has_zero_point=int(spec.has_zero_point),
                quantize_activation=int(spec.quantize_activation),
                weight_format=weight_format, activation_format=activation_format)
