"""scripts/gpu_check.sh (scripts/gpu_check.py) and scripts/tpu_check.sh
(scripts/tpu_check.py), exercised on this CPU.

No GPU or TPU here: ``--dry-run`` runs the same code with the kernels in
Pallas interpret mode and small shapes (the TPU script also lowers
impl="pallas" for each TPU generation). What only a device can show
(Triton's and Mosaic's compilation, real timings) is in
docs/pallas_kernels.md as not yet run.
"""

import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
FLOAT_SECTION = "## Float element formats"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    yield _load("gpu_check")
    del sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def tpu_check(gpu_check):
    # tpu_check imports gpu_check by name: the same module object as the fixture's.
    yield _load("tpu_check")
    del sys.modules["tpu_check"]


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and "x" in line
            and not line.startswith(("| shape", "| operands"))]


def cells(row):
    return [c.strip() for c in row.split("|")[1:-1]]


def check_format_rows(rows, schemes, impls, n_cases):
    """Every (scheme, impl) has its rows; each passed the float64 check
    (0 < err/tol <= 1) or says why the impl declined; the fused XLA path
    takes every format."""
    assert len(rows) == len(schemes) * len(impls) * n_cases
    seen = {(cells(r)[2], cells(r)[3]) for r in rows}
    assert seen == {(s.name, i) for s in schemes for i in impls}
    for row in rows:
        err = cells(row)[4]
        if err.startswith("DECLINED: "):
            assert cells(row)[3] == "pallas" and len(err) > len("DECLINED: "), row
        else:
            assert 0 < float(err) <= 1, row


def test_dry_run_checks_every_gpu_scheme(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.md"
    # No time budget here: a loaded CI machine must not cut the dry run short.
    assert gpu_check.main(["--dry-run", "--reps", "1", "--budget", "1e9", "--out",
                           str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "DRY RUN" in text and 'impl="pallas" lowers to the Triton kernel: yes' in text
    int_text, float_text = text.split(FLOAT_SECTION)
    rows = table_rows(int_text)
    # Every scheme of API.md (8 rows) x the dry-run shapes x M.
    n_cases = len(gpu_check.DRY_RUN_SHAPES) * len(gpu_check.DRY_RUN_MS)
    assert len(rows) == 8 * n_cases
    schemes = {row.split("|")[3].strip() for row in rows}
    assert schemes == {s.name for s in gpu_check.SCHEMES} and len(schemes) == 8
    for row in rows:
        ratio = float(row.split("|")[4])
        assert 0 < ratio <= 1, row
    # The float formats (issue F): bf16 x fp8, fp8 x fp8, bf16 x fp4 (MX, NV),
    # through impl="pallas" and impl="xla".
    check_format_rows(table_rows(float_text), gpu_check.FLOAT_SCHEMES, gpu_check.FLOAT_IMPLS,
                      n_cases)
    assert {s.format for s in gpu_check.FLOAT_SCHEMES} == {"fp8", "mxfp4", "nvfp4"}
    assert gpu_check.FLOAT_MS == (1, 16, 256, 4096)


@pytest.mark.parametrize("fmt,block,qa", [("fp8", -1, False), ("fp8", -1, True),
                                          ("mxfp4", 32, False), ("nvfp4", 16, False)])
def test_float_error_ratio_flags_a_wrong_result(gpu_check, fmt, block, qa):
    rng = np.random.default_rng(0)
    import xla_qops
    qw = xla_qops.quantize_weight(rng.standard_normal((256, 256)).astype(np.float32),
                                  format=fmt, block_size=block)
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)
    y = xla_qops.quantized_matmul(x, qw, quantize_activation=qa, impl="reference")
    rows, cols = gpu_check.check_rows(4, rng), gpu_check.check_columns(256, 128, rng)
    assert gpu_check.float_error_ratio(y, x, qw, qa, rows, cols) <= 1
    wrong = y.at[3, 255].add(0.05 * jnp.abs(y).max())  # one entry: the last row and column
    assert gpu_check.float_error_ratio(wrong, x, qw, qa, rows, cols) > 1


def test_check_rows_samples_large_m_with_both_ends(gpu_check):
    rng = np.random.default_rng(0)
    assert list(gpu_check.check_rows(256, rng)) == list(range(256))
    rows = gpu_check.check_rows(4096, rng)
    assert len(rows) == 256 and len(set(rows)) == 256
    assert {0, 15, 4080, 4095} <= set(rows.tolist()) and rows.max() < 4096


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
    text = out.read_text()
    assert "CUT SHORT: 16 cases not run" in text
    # 4 float schemes x 2 impls x 2 M x 1 shape
    assert "CUT SHORT: 16 float-format cases not run" in text


def test_without_a_gpu_it_refuses_clearly(tmp_path):
    proc = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), "--out",
                           str(tmp_path / "x.md")], env=dict(os.environ, PYTHON=sys.executable,
                                                             JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "gpu_check: error: no GPU: JAX's default backend is 'cpu'" in proc.stderr
    assert not (tmp_path / "x.md").exists()


# --- scripts/tpu_check.py -------------------------------------------------------

def test_tpu_dry_run_checks_int8_and_float_formats_and_lowers_per_generation(
        tpu_check, tmp_path, capsys):
    out = tmp_path / "tpu_check.md"
    assert tpu_check.main(["--dry-run", "--reps", "1", "--budget", "1e9", "--out",
                           str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "DRY RUN" in text
    # impl="pallas" lowered for each generation: one row per scheme, one
    # column per TPU; the int8 kernels reach Mosaic on every one of them.
    head = "| operands | " + " | ".join(tpu_check.TARGET_KINDS) + " |"
    lines = text.splitlines()
    start = lines.index(head)
    dispatch = lines[start + 2:start + 2 + len(tpu_check.SCHEMES)]
    assert [cells(r)[0] for r in dispatch] == [s.name for s in tpu_check.SCHEMES]
    for row in dispatch:
        assert all(c == "Mosaic" or c.startswith(("declined: ", "no Mosaic")) for c in
                   cells(row)[1:]), row
    for row in dispatch[:len(tpu_check.INT8_SCHEMES)]:
        assert cells(row)[1:] == ["Mosaic"] * len(tpu_check.TARGET_KINDS), row
    rates = next(line for line in lines if line.startswith("Chip peak rates"))
    assert all(f"{name}: " in rates for name in tpu_check.TARGET_KINDS)
    n_cases = len(tpu_check.DRY_RUN_SHAPES) * len(tpu_check.DRY_RUN_MS)
    check_format_rows(table_rows(text[text.index("## int8 and float"):]), tpu_check.SCHEMES,
                      tpu_check.IMPLS, n_cases)


def test_tpu_chip_rates_name_what_each_generation_lacks(tpu_check):
    """v7 has no int8 MXU rate and twice bf16's for fp8; v5e no fp8 (JAX's
    tpu_info, where this JAX has it)."""
    try:
        from jax._src import tpu_info  # noqa: F401
    except ImportError:
        rates = tpu_check.chip_rates("TPU7x")
        assert rates.startswith("unknown (") and "tpu_info" in rates
        return
    v7 = tpu_check.chip_rates("TPU7x")
    assert "int8 none" in v7 and "fp8 2300 TOP/s" in v7 and "bf16 1155 TOP/s" in v7
    assert "fp8 none" in tpu_check.chip_rates("TPU v5 lite")
    assert "does not know" in tpu_check.chip_rates("TPU v99")


def test_tpu_check_without_a_tpu_refuses_clearly(tmp_path):
    proc = subprocess.run([os.path.join(SCRIPTS, "tpu_check.sh"), "--out",
                           str(tmp_path / "x.md")], env=dict(os.environ, PYTHON=sys.executable,
                                                             JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "tpu_check: error: no TPU: JAX's default backend is 'cpu'" in proc.stderr
    assert not (tmp_path / "x.md").exists()
