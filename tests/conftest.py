"""Process-wide settings for the test session, applied before any test module
imports torch or torch_xla, and the rule that keeps torch tests out of a
torch-free environment.

`make test` runs this suite twice: in .venv (the pinned torch_xla stack,
everything runs) and in .venv-jax (the newest JAX, no torch). There, tests
that need torch are left out at collection -- whole files that import torch
(`TORCH_FILES`) are not collected, and tests marked ``@pytest.mark.torch`` in
mixed files are deselected -- and the session header says how many.

It also says which compiled parts and backends must exist here
(`cpu_kernels_expected`, `torch_ops_expected`, `expected_impls`): tests skip
for a missing part only where the build does not make it, so an extension
that fails to import (an ABI break on a new jaxlib or torch) fails the suite
instead of turning the kernel tests into skips.
"""

import contextlib
import importlib
import importlib.util
import os
import pathlib
import platform

# torch's OpenMP workers busy-wait after each parallel region; on this 2-core
# machine they then starve XLA's and the C++ kernels' threads (60 LoRA steps on
# CPU tensors: ~15 s spinning vs ~0.15 s passive). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAVE_TORCH = importlib.util.find_spec("torch") is not None
# Test files that import torch (or torch_xla, torch_bridge) at module level.
TORCH_FILES = ("test_torch_*.py", "torch_spmd_child.py", "test_pallas_torch_bridge.py",
               "test_lora_torch.py")
HERE = pathlib.Path(__file__).resolve().parent

collect_ignore_glob = [] if HAVE_TORCH else list(TORCH_FILES)

# CMakeLists.txt builds the host-CPU kernels (xla_qops._cpu_kernels, and
# torch_bridge._torch_ops when torch imports at build time) on every x86-64;
# the AVX-512 ones run where CPUID reports the features below
# (docs/cpu_kernels.md). XLA_QOPS_EXPECT_CPU_KERNELS=0 / =1 overrides the
# platform rule (a build made without them on purpose, or another platform
# that has them).
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni",
                "avx512vbmi")


def cpu_kernels_expected() -> bool:
    """Whether xla_qops._cpu_kernels must import in this environment."""
    forced = os.environ.get("XLA_QOPS_EXPECT_CPU_KERNELS")
    if forced is not None:
        return forced != "0"
    return platform.machine().lower() in ("x86_64", "amd64")


def torch_ops_expected() -> bool:
    """Whether torch_bridge._torch_ops (the kernels as a torch operator) must import."""
    return HAVE_TORCH and cpu_kernels_expected()


def avx512_expected() -> bool:
    """Whether the kernels must pick their AVX-512 set here (the CPU has every
    feature they need and XLA_QOPS_CPU_ISA does not force the portable ones)."""
    if os.environ.get("XLA_QOPS_CPU_ISA") or not cpu_kernels_expected():
        return False
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(flag in flags for flag in AVX512_FLAGS)


def expected_impls() -> set:
    """The backends of xla_qops.dispatch.BACKENDS that must be available here:
    the pure-JAX ones and the Pallas kernels (pure Python, interpret mode on a
    CPU) everywhere, custom_call where the C++ kernels are built."""
    impls = {"reference", "xla", "pallas"}
    if cpu_kernels_expected():
        impls.add("custom_call")
    return impls


@contextlib.contextmanager
def recorded_cpu_matmuls():
    """Records every call of the C++ kernels through the torch operator
    (torch_bridge._cpu_ops.matmul, the route of XlaQuantizedLinear on CPU
    tensors) with an integer weight and int8 (or no) activation quantization
    as numpy ``(y, x, w, scale, zero_point, block_size, quantize_activation)``:
    a model test checks each layer's product against tests/numpy_reference on
    the inputs that layer really got, before its bias."""
    from unittest import mock

    import torch
    from torch_bridge import _cpu_ops

    def to_numpy(t):
        if t is None:
            return None
        t = t.detach()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy().copy()

    calls, real = [], _cpu_ops.matmul

    def recording(x, weight, quantize_activation, *args, **kwargs):
        y = real(x, weight, quantize_activation, *args, **kwargs)
        activation_format = args[0] if args else kwargs.get("activation_format")
        if getattr(weight, "weight_format", "int") == "int" and activation_format in (None, "int8"):
            # (the integer formats of API.md sections 1-2, which numpy_reference states)
            calls.append((to_numpy(y), to_numpy(x), to_numpy(weight.w), to_numpy(weight.scale),
                          to_numpy(weight.zero_point), weight.block_size, quantize_activation))
        return y

    with mock.patch.object(_cpu_ops, "matmul", recording):
        yield calls


def import_error(module: str):
    """The exception importing `module` raises (None if it imports): for the
    message of a test that finds an expected extension missing."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or an ABI break's other errors
        return e
    return None


def _torch_files():
    return sorted({p.name for pattern in TORCH_FILES for p in HERE.glob(pattern)})


def pytest_report_header(config):
    import jax

    line = f"jax {jax.__version__}"
    line += (f", C++ kernels {'required' if cpu_kernels_expected() else 'optional'}"
             f"{' (AVX-512)' if avx512_expected() else ''}")
    if HAVE_TORCH:
        return line + ", torch installed: all tests collected"
    return line + f", no torch: {len(_torch_files())} torch test files not collected"


def pytest_collection_modifyitems(config, items):
    if HAVE_TORCH:
        return
    needs_torch = [item for item in items if item.get_closest_marker("torch")]
    config._torch_deselected = len(needs_torch)
    if needs_torch:
        items[:] = [item for item in items if not item.get_closest_marker("torch")]
        config.hook.pytest_deselected(items=needs_torch)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Also under -q: say what was left out for want of torch."""
    if HAVE_TORCH:
        return
    import jax

    files = _torch_files()
    terminalreporter.write_line(
        f"jax {jax.__version__}, no torch: {len(files)} torch test files not collected "
        f"({', '.join(files)}); {getattr(config, '_torch_deselected', 0)} tests marked "
        f"'torch' deselected")
