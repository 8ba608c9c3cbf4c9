"""The `xla-qops` command line: one subcommand per module in xla_qops_app.commands.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "demo": ("xla_qops_app.commands.demo", "quantize a model with every scheme; memory, accuracy, speed"),
    "bench": ("xla_qops_app.commands.bench", "kernel benchmarks; writes a table and a plot into docs/"),
    "quantize": ("xla_qops_app.commands.quantize", "safetensors model in, quantized safetensors out"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xla-qops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # command not built into this version
        module.add_arguments(sub_parser)
        modules[name] = module
    args = parser.parse_args(argv)
    if args.command != "bench":
        # Before torch is imported by the command: torch's OpenMP workers
        # otherwise busy-wait between ops and starve XLA's and the C++
        # kernels' threads. (bench leaves torch's default: its own kernels,
        # the peers, are fastest with their workers spinning between calls.)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.command not in modules:
        parser.error(f"command {args.command!r} is not available in this version")
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as error:
        # Bad input (validated in the library) -> one clear line, exit status 2.
        print(f"xla-qops {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
