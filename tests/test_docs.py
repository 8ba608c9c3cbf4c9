"""The code blocks of the JAX quickstart run as written."""

import pathlib
import re

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def test_jax_quickstart_runs():
    text = (DOCS / "quickstart_jax.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, "quickstart_jax.md", "exec"), namespace)
    assert namespace["y"].shape == (8, 4096)
    assert namespace["qw"].nbytes == 4096 * 4096 // 2 + 2 * (4096 // 128) * 4096 * 4


def test_readme_performance_figures_come_from_the_committed_benchmark_output():
    """Every figure of the README's performance paragraph is in docs/bench_e2e.md,
    the committed output of `make bench-model` it quotes (docs/benchmarks.md)."""
    readme = (DOCS.parent / "README.md").read_text()
    start = readme.index("Performance where users run it")
    paragraph = readme[start:readme.index("\n\n", start)]
    figures = re.findall(r"(?<![\w.-])\d+\.\d+(?=x|\b)", paragraph)
    assert len(figures) >= 8, figures
    bench = (DOCS / "bench_e2e.md").read_text()
    missing = [f for f in figures if f not in bench]
    assert not missing, missing
    # The headline ratio against torch's int4 is the like-for-like one (both asymmetric).
    assert "with zero points" in paragraph and "compares different schemes" in paragraph


def test_readme_counts_the_test_files_that_use_the_float64_reference():
    """README's layout table says how many test files compare with
    tests/numpy_reference.py; the count is kept true here."""
    readme = (DOCS.parent / "README.md").read_text()
    using, total = map(int, re.search(r"float64 reference that (\d+) of the (\d+) test files",
                                      readme).groups())
    files = sorted((DOCS.parent / "tests").glob("test_*.py"))
    imports = re.compile(r"^\s*(?:import|from)\s+numpy_reference\b", re.M)
    actual = sum(bool(imports.search(f.read_text())) for f in files)
    assert (using, total) == (actual, len(files)), (
        f"README says {using} of {total}; the tests hold {actual} of {len(files)}")
