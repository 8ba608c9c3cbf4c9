"""Writes a sitecustomize.py that loads another build's C++ extension modules.

A build directory made with `cmake -S <sources> -B <dir>` holds
`_cpu_kernels.*.so` (xla_qops._cpu_kernels) and `_torch_ops.*.so`
(torch_bridge._torch_ops). The sitecustomize.py written here puts a finder for
those two module names at the front of sys.meta_path, ahead of
scikit-build-core's editable redirect (which would find the installed build),
so a Python started with the directory on PYTHONPATH imports that build's
modules. Used by scripts/sanitize.sh and scripts/bench_decode_kernel.py; the
callers check which files were loaded.

    python scripts/module_shim.py SHIM_DIR BUILD_DIR
"""

from __future__ import annotations

import glob
import os
import sys

MODULES = {"xla_qops._cpu_kernels": "_cpu_kernels.*.so",
           "torch_bridge._torch_ops": "_torch_ops.*.so"}

_FINDER = """\
# Loads the extension modules of {build} instead of the installed ones
# (written by scripts/module_shim.py).
import importlib.machinery, importlib.util, sys

_BUILT = {built!r}


class _BuiltFinder:
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        origin = _BUILT.get(fullname)
        if origin is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, origin)
        return importlib.util.spec_from_file_location(fullname, origin, loader=loader)


sys.meta_path.insert(0, _BuiltFinder)
"""


def built_modules(build: str) -> dict[str, str]:
    """Module name -> absolute path of its .so in `build` (exactly one each)."""
    found = {name: glob.glob(os.path.join(build, pattern)) for name, pattern in MODULES.items()}
    if any(len(paths) != 1 for paths in found.values()):
        raise SystemExit(f"module_shim: expected one {' and one '.join(MODULES.values())} in "
                         f"{build}, found {sorted(p for paths in found.values() for p in paths)}")
    return {name: os.path.abspath(paths[0]) for name, paths in found.items()}


def write_shim(directory: str, build: str) -> str:
    """Writes `directory`/sitecustomize.py loading `build`'s modules; returns its path."""
    path = os.path.join(directory, "sitecustomize.py")
    with open(path, "w") as f:
        f.write(_FINDER.format(build=os.path.abspath(build), built=built_modules(build)))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} SHIM_DIR BUILD_DIR (got {sys.argv[1:]})")
    write_shim(sys.argv[1], sys.argv[2])
