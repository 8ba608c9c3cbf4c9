"""Structure the rest of the project relies on.

* Four floors, each importing only from its own floor and those below
  (docs/architecture.md): `pallas_kernels` < `xla_qops` < `torch_bridge` <
  `xla_qops_app`. Read from every module's source (imports inside functions
  included), so a lazy import against the direction fails too; no import
  cycles between modules; the core imports torch in one module only.
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

FLOORS = {"pallas_kernels": 0, "xla_qops": 1, "torch_bridge": 2, "xla_qops_app": 3}
TORCH_PACKAGES = ("torch", "torch_xla", "torchax")
# The core's one torch import: exporting to torch's tinygemm layout, which is
# defined by torch's own packing op (docs/architecture.md).
CORE_TORCH_IMPORTS = {"xla_qops.interop.int4pack"}


def _module_files(root):
    """{dotted module name: path} of every first-party module under `root`."""
    files = {}
    for package in FLOORS:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imports(root):
    """{module: [(imported module, line)]}, every import statement anywhere in
    the module; ``from a import b`` names ``a.b`` when that is a module."""
    files = _module_files(root)
    found = {}
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        targets = found.setdefault(module, [])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + [base]).strip(".")
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append((full if full in files else base, node.lineno))
    return files, found


def direction_violations(root):
    """Imports against the floors, torch in the core, and import cycles."""
    files, imports = _imports(root)
    problems = []
    for module, targets in sorted(imports.items()):
        floor = FLOORS[module.split(".")[0]]
        for target, line in targets:
            top = target.split(".")[0]
            if FLOORS.get(top, -1) > floor:
                problems.append(f"{module}:{line} imports {target} (a higher floor)")
            if (top in TORCH_PACKAGES and floor <= FLOORS["xla_qops"]
                    and module not in CORE_TORCH_IMPORTS):
                problems.append(f"{module}:{line} imports {target} (torch in the core)")

    def owner(target):  # the first-party module an import lands in
        while target and target not in files:
            target = target.rpartition(".")[0]
        return target or None

    def package_edge(a, b):  # a package and its own submodules re-export each other
        return ((files[a].name == "__init__.py" and b.startswith(a + "."))
                or (files[b].name == "__init__.py" and a.startswith(b + ".")))

    graph = {m: sorted({owner(t) for t, _ in targets} - {None, m}) for m, targets in imports.items()}
    graph = {m: [t for t in ts if not package_edge(m, t)] for m, ts in graph.items()}
    # Tarjan's strongly connected components: any with two modules is a cycle.
    index, low, stack, on_stack, counter = {}, {}, [], set(), [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                problems.append(f"import cycle: {' -> '.join(sorted(component))}")

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return problems


def test_imports_follow_the_floors():
    assert direction_violations(ROOT) == []
    assert len(_module_files(ROOT)) > 60  # the whole tree was read


def test_direction_check_catches_lazy_upward_imports_and_cycles(tmp_path):
    """The checker itself: the kinds of import the tree once had all fail it."""
    for package in FLOORS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pallas_kernels" / "k.py").write_text("import xla_qops.api\n")
    (tmp_path / "xla_qops" / "api.py").write_text("def f():\n    import torch\n")
    (tmp_path / "xla_qops" / "cmd.py").write_text(
        "def run():\n    from torch_bridge import swap\n    from . import api\n")
    (tmp_path / "torch_bridge" / "swap.py").write_text(
        "def g():\n    from xla_qops_app.bench import decoder\n")
    (tmp_path / "xla_qops_app" / "a.py").write_text("def h():\n    from xla_qops_app import b\n")
    (tmp_path / "xla_qops_app" / "b.py").write_text("from .a import h\n")
    problems = direction_violations(tmp_path)
    assert "pallas_kernels.k:1 imports xla_qops.api (a higher floor)" in problems
    assert "xla_qops.api:2 imports torch (torch in the core)" in problems
    assert "xla_qops.cmd:2 imports torch_bridge.swap (a higher floor)" in problems
    assert "torch_bridge.swap:2 imports xla_qops_app.bench (a higher floor)" in problems
    assert "import cycle: xla_qops_app.a -> xla_qops_app.b" in problems
    assert len(problems) == 5, problems


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
