"""Structure the rest of the project relies on.

* `pallas_kernels` is the lower layer: importing all of it imports nothing
  from `xla_qops`.
* Every backend module implements the `Backend` protocol, with the
  signatures it documents, and `Impl` names exactly the impls dispatch knows.
* The JAX version differences live in `pallas_kernels/jax_compat.py`: no
  other module reaches for the attributes it wraps.
"""

import ast
import inspect
import pathlib
import subprocess
import sys
import typing

import xla_qops
from xla_qops import dispatch
from xla_qops.backends import Backend

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_pallas_kernels_import_nothing_from_xla_qops():
    modules = sorted("pallas_kernels." + ".".join(p.relative_to(ROOT / "pallas_kernels")
                                                    .with_suffix("").parts)
                     for p in (ROOT / "pallas_kernels").rglob("*.py")
                     if p.name != "__init__.py")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'xla_qops')\n"
            "print(len(sys.modules)); assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(modules) >= 10  # every module, the kernels included


def test_every_backend_implements_the_protocol():
    expected = {name: list(inspect.signature(getattr(Backend, name)).parameters)[1:]
                for name in ("available", "supports", "matmul")}
    for name in dispatch.BACKENDS:
        module = dispatch._module(name)
        assert isinstance(module, Backend), name
        for function, params in expected.items():
            got = list(inspect.signature(getattr(module, function)).parameters)
            assert got == params, (name, function, got)


def test_impl_literal_matches_the_backends():
    assert typing.get_args(dispatch.Impl) == dispatch.IMPLS == xla_qops.IMPLS
    assert set(dispatch.IMPLS) == {"auto"} | set(dispatch.BACKENDS)
    impl = inspect.signature(xla_qops.quantized_matmul).parameters["impl"]
    assert impl.annotation in (dispatch.Impl, "dispatch.Impl") and impl.default == "auto"


def test_jax_version_differences_stay_in_jax_compat():
    """The JAX names jax_compat exists to wrap are used in no other module of
    the package (docstrings may mention them; code goes through jax_compat)."""
    wrapped = {"jaxprs_in_params", "get_tpu_info", "use_abstract_mesh", "AbstractDevice"}
    offenders = []
    for path in list((ROOT / "pallas_kernels").rglob("*.py")) + list(
            (ROOT / "xla_qops").rglob("*.py")):
        if path.name == "jax_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in wrapped:
                if not (isinstance(node.value, ast.Name) and node.value.id == "jax_compat"):
                    offenders.append((str(path.relative_to(ROOT)), node.attr, node.lineno))
            elif isinstance(node, ast.alias) and node.name.split(".")[-1] in wrapped:
                offenders.append((str(path.relative_to(ROOT)), node.name, 0))
    assert not offenders, offenders
