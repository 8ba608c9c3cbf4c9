"""Process-wide settings for the test session, applied before any test module
imports torch or torch_xla, and the rule that keeps torch tests out of a
torch-free environment.

`make test` runs this suite twice: in .venv (the pinned torch_xla stack,
everything runs) and in .venv-current (the newest JAX and torch, no
torch_xla); `make test-jax` runs it in .venv-jax (the newest JAX, no torch).
Tests that need what an environment lacks are left out at collection, the
same way for torch, torch_xla and torchax: whole files (`TORCH_FILES`,
`TORCH_XLA_FILES`) are not collected, and tests marked ``@pytest.mark.torch``,
``@pytest.mark.torch_xla`` or ``@pytest.mark.torchax`` in mixed files are
deselected -- and the session header and summary say how many.

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
import subprocess
import sys
import zlib

# torch's OpenMP workers busy-wait after each parallel region; on this 2-core
# machine they then starve XLA's and the C++ kernels' threads (60 LoRA steps on
# CPU tensors: ~15 s spinning vs ~0.15 s passive). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_TORCH_XLA = HAVE_TORCH and importlib.util.find_spec("torch_xla") is not None
# torchax (the torch model -> one jitted JAX step route) has no release for
# torch >= 2.13 yet; .venv-current goes without it (docs/torch.md).
HAVE_TORCHAX = HAVE_TORCH and importlib.util.find_spec("torchax") is not None
# Test files that import torch (or torch_bridge) at module level.
TORCH_FILES = ("test_torch_*.py", "torch_spmd_child.py", "test_pallas_torch_bridge.py",
               "test_lora_torch.py")
# Test files about torch_xla itself (XLA tensors, SPMD, its seeds' drop-in, the
# MiniLM checks on the XLA device); mixed files import torch_xla only where
# HAVE_TORCH_XLA and mark their XLA tests ``torch_xla``.
TORCH_XLA_FILES = ("test_torch_seeds.py", "test_torch_spmd.py", "torch_spmd_child.py",
                   "test_torch_xla_generate.py", "test_torch_minilm.py")
HERE = pathlib.Path(__file__).resolve().parent

collect_ignore_glob = ([] if HAVE_TORCH_XLA else list(TORCH_XLA_FILES)) + (
    [] if HAVE_TORCH else list(TORCH_FILES))

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


AVX2_FLAGS = ("avx2", "fma", "f16c")


def _cpu_flags() -> list:
    try:
        return pathlib.Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []


def isa_expected(forced: str | None = None) -> str:
    """The kernel set xla_qops._cpu_kernels must pick here: the best the CPU
    has ("avx512", else "avx2", else "generic"), or at most `forced`
    (XLA_QOPS_CPU_ISA: "generic", or "avx2" where the CPU has it)."""
    forced = forced if forced is not None else os.environ.get("XLA_QOPS_CPU_ISA")
    if not cpu_kernels_expected() or forced == "generic":
        return "generic"
    flags = _cpu_flags()
    if forced != "avx2" and all(flag in flags for flag in AVX512_FLAGS):
        return "avx512"
    return "avx2" if all(flag in flags for flag in AVX2_FLAGS) else "generic"


def run_with_env(script: str, timeout: int = 600, **variables) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh Python with the environment `variables` set (the
    kernels read XLA_QOPS_* once per process), JAX on the CPU, tests/ and the
    repository on its path."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu", **variables,
               PYTHONPATH=os.pathsep.join([here, os.path.dirname(here),
                                           os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_under_isa(forced: str, script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh Python with XLA_QOPS_CPU_ISA=forced (the kernel set
    is chosen once per process)."""
    return run_with_env(script, timeout, XLA_QOPS_CPU_ISA=forced)


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


def _files(patterns):
    return sorted({p.name for pattern in patterns for p in HERE.glob(pattern)})


def _missing():
    """What this environment lacks: the markers of the tests to deselect and
    the patterns of the files not collected."""
    markers = [name for name, have in (("torch", HAVE_TORCH), ("torch_xla", HAVE_TORCH_XLA),
                                       ("torchax", HAVE_TORCHAX)) if not have]
    files = (() if HAVE_TORCH else TORCH_FILES) + (() if HAVE_TORCH_XLA else TORCH_XLA_FILES)
    return markers, files


def pytest_report_header(config):
    import jax

    line = f"jax {jax.__version__}"
    line += (f", C++ kernels {'required' if cpu_kernels_expected() else 'optional'}"
             f"{' (AVX-512)' if avx512_expected() else ''}")
    if HAVE_TORCH:
        import torch
        line += f", torch {torch.__version__}"
    markers, files = _missing()
    if not markers:
        return line + ", torch_xla and torchax: all tests collected"
    return line + f", no {', '.join(markers)}: {len(_files(files))} test files not collected"


# The parametrized matrices of these files are split between the two stacks of
# `make test` (scripts/test_stacks.sh sets XLA_QOPS_TEST_SHARE to "0,1/3" on the
# current stack and "2/3" on the pinned one, whose other tests take longer): every
# test function runs on both stacks, each of
# its cases on at least one of them. A version break (a JAX or torch API that
# moved) fails every case of a function, so one stack's half finds it; the full
# matrices on one stack are `make test-pinned` / `make test-current`. These
# files are ~60% of the suite's time, most of it in the product of formats,
# schemes, dtypes and shapes (pinned suite, --junitxml, 2026-12-06: 536 of
# its 883 s of test time).
SHARED_MATRIX_FILES = (
    "test_sharding.py", "test_sharding_formats.py", "test_custom_call.py",
    "test_custom_call_formats.py", "test_matmul.py", "test_pallas_kernels.py",
    "test_pallas_lowering.py", "test_pallas_formats.py", "test_pallas_backend.py",
    "test_xla_backend.py", "test_xla_backward_dtype.py", "test_interop.py",
    "test_interop_formats.py", "test_formats.py", "test_quantize.py",
    "test_quantizers.py", "test_quantizers_formats.py", "test_reference_checker.py",
    "test_lora.py", "test_torch_formats.py", "test_torch_cpu_direct.py", "test_torch_op.py")


def matrix_share():
    """(indices, count) from XLA_QOPS_TEST_SHARE ("i/n" or "i,j,.../n": the cases
    whose hash mod n is one of the indices), or None: run every case."""
    share = os.environ.get("XLA_QOPS_TEST_SHARE")
    if not share:
        return None
    try:
        indices, count = share.split("/")
        indices, count = frozenset(int(i) for i in indices.split(",")), int(count)
    except ValueError:
        indices, count = frozenset({-1}), 0
    if not all(0 <= i < count for i in indices):
        raise ValueError("XLA_QOPS_TEST_SHARE must be 'i/n' or 'i,j,.../n' with "
                         f"0 <= i < n, got {share!r}")
    return indices, count


def cases_of_other_shares(items, share):
    """The parametrized cases of SHARED_MATRIX_FILES that another stack runs.

    A case's share is a hash of its id mod n, so it is the same on every stack
    even where a stack collects cases another does not. Each test function
    keeps at least its first case here, and cases only the pinned stack can
    run (marked torch_xla or torchax) are never given away."""
    indices, count = share
    by_function = {}
    for item in items:
        if (item.path.name in SHARED_MATRIX_FILES and hasattr(item, "callspec")
                and not any(item.get_closest_marker(m) for m in ("torch_xla", "torchax"))):
            by_function.setdefault((item.path.name, item.originalname), []).append(item)
    given_away = []
    for cases in by_function.values():
        others = [item for item in cases
                  if zlib.crc32(item.nodeid.encode()) % count not in indices]
        if len(others) == len(cases):
            others = others[1:]
        given_away += others
    return given_away


def pytest_collection_modifyitems(config, items):
    markers, _ = _missing()
    left_out = [item for item in items
                if any(item.get_closest_marker(m) for m in markers)]
    config._missing_deselected = len(left_out)
    share = matrix_share()
    left_out_ids = {id(item) for item in left_out}
    other_shares = cases_of_other_shares(
        [item for item in items if id(item) not in left_out_ids], share) if share else []
    config._other_shares_deselected = len(other_shares)
    if left_out or other_shares:
        dropped = {id(item) for item in left_out + other_shares}
        items[:] = [item for item in items if id(item) not in dropped]
        config.hook.pytest_deselected(items=left_out + other_shares)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Also under -q: say what was left out for want of torch, torch_xla or
    torchax, and the matrix cases left to the other stack."""
    share = matrix_share()
    if share:
        terminalreporter.write_line(
            f"XLA_QOPS_TEST_SHARE={os.environ['XLA_QOPS_TEST_SHARE']}: "
            f"{config._other_shares_deselected} "
            f"cases of the {len(SHARED_MATRIX_FILES)} matrix files deselected (the other "
            "stack runs them; tests/conftest.py)")
    markers, files = _missing()
    if not markers:
        return
    import jax

    names = _files(files)
    terminalreporter.write_line(
        f"jax {jax.__version__}, no {', '.join(markers)}: {len(names)} test files not "
        f"collected ({', '.join(names) or 'none'}); {getattr(config, '_missing_deselected', 0)} "
        f"tests marked {' or '.join(repr(m) for m in markers)} deselected")
