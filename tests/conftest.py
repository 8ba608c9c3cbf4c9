"""Process-wide settings for the test session, applied before any test module
imports torch or torch_xla, and the rule that keeps torch tests out of a
torch-free environment.

`make test` runs this suite twice: in .venv (the pinned torch_xla stack,
everything runs) and in .venv-jax (the newest JAX, no torch). There, tests
that need torch are left out at collection -- whole files that import torch
(`TORCH_FILES`) are not collected, and tests marked ``@pytest.mark.torch`` in
mixed files are deselected -- and the session header says how many.
"""

import importlib.util
import os
import pathlib

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


def _torch_files():
    return sorted({p.name for pattern in TORCH_FILES for p in HERE.glob(pattern)})


def pytest_report_header(config):
    import jax

    line = f"jax {jax.__version__}"
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
