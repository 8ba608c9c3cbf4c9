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
