"""scripts/gpu_check.sh (scripts/gpu_check.py), exercised on this CPU.

No GPU here: ``--dry-run`` runs the same code with the Triton kernel in
Pallas interpret mode and small shapes. What only a GPU can show (Triton's
compilation, real timings) is in docs/pallas_kernels.md as not yet run.
"""

import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and "x" in line
            and not line.startswith("| shape")]


def test_dry_run_checks_every_gpu_scheme(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--dry-run", "--reps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "DRY RUN" in text and 'impl="pallas" lowers to the Triton kernel: yes' in text
    rows = table_rows(text)
    # Every scheme of API.md (8 rows) x the dry-run shapes x M.
    assert len(rows) == 8 * len(gpu_check.DRY_RUN_SHAPES) * len(gpu_check.DRY_RUN_MS)
    schemes = {row.split("|")[3].strip() for row in rows}
    assert schemes == {s.name for s in gpu_check.SCHEMES} and len(schemes) == 8
    for row in rows:
        ratio = float(row.split("|")[4])
        assert 0 < ratio <= 1, row


def test_error_ratio_flags_a_wrong_result(gpu_check):
    rng = np.random.default_rng(0)
    import xla_qops
    qw = xla_qops.quantize_weight(rng.standard_normal((256, 256)).astype(np.float32),
                                  bits=4, block_size=128, symmetric=False)
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)
    y = xla_qops.quantized_matmul(x, qw, impl="reference")
    cols = gpu_check.check_columns(256, 128, rng)
    assert gpu_check.error_ratio(y, x, qw, False, cols) <= 1
    wrong = y.at[2, 255].add(0.05 * jnp.abs(y).max())  # one entry, in the last tile
    assert gpu_check.error_ratio(wrong, x, qw, False, cols) > 1


def test_time_budget_cuts_the_run_short_and_says_so(gpu_check, tmp_path):
    out = tmp_path / "cut.md"
    assert gpu_check.main(["--dry-run", "--budget", "0", "--out", str(out)]) == 1
    assert "CUT SHORT: 16 cases not run" in out.read_text()


def test_without_a_gpu_it_refuses_clearly(tmp_path):
    proc = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), "--out",
                           str(tmp_path / "x.md")], env=dict(os.environ, PYTHON=sys.executable,
                                                             JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "gpu_check: error: no GPU: JAX's default backend is 'cpu'" in proc.stderr
    assert not (tmp_path / "x.md").exists()
