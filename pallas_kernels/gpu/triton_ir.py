"""The Triton kernels inside an exported module, read back on a machine without a GPU.

`jax.export(..., platforms=["cuda"])` puts each Pallas Triton kernel into a
``__gpu$xla.gpu.triton`` custom call whose backend config holds the kernel's
Triton module as MLIR bytecode (a string attribute, printed with MLIR's
escapes). `triton_modules` takes those bytes out of the module text and parses
them with jaxlib's Triton dialect, so a test can see what the GPU would be
given -- here, the operand types of every ``tt.dot`` (`dot_operand_types`).

Uses jaxlib's MLIR bindings and the private `jax._src.lib.triton` dialect
registration (tests/test_pallas_formats.py would fail, not pass silently, if
either changed: it expects a dot in every kernel).
"""

from __future__ import annotations

import re

from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.triton import dialect as tt_dialect
from jaxlib.mlir import ir

TRITON = "__gpu$xla.gpu.triton"
# `ir = "..."` inside the custom call's backend config: any run of characters
# other than a quote or backslash, or a backslash escape.
_IR = re.compile(r'\bir = "((?:[^"\\]|\\.)*)"')
_HEX = set("0123456789abcdefABCDEF")


def _unescape(text: str) -> bytes:
    """MLIR's string escapes (``\\\\``, ``\\"``, ``\\XX`` hex, ``\\n``, ``\\t``) -> bytes."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in _HEX and i + 2 < len(text) and text[i + 2] in _HEX:
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out.append({"n": 10, "t": 9}.get(nxt, ord(nxt)))
            i += 2
    return bytes(out)


def triton_modules(module_text: str) -> list[str]:
    """The text of every Triton kernel module in an exported module's text."""
    ctx = jax_mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    modules = []
    with ctx:
        for escaped in _IR.findall(module_text):
            modules.append(str(ir.Module.parse(_unescape(escaped))))
    return modules


_DOT = re.compile(r"tt\.dot .*: tensor<[0-9x]+x(\w+)> \* tensor<[0-9x]+x(\w+)> "
                  r"-> tensor<[0-9x]+x(\w+)>")


def dot_operand_types(module_text: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, accumulator) element types of every ``tt.dot`` of every Triton
    kernel in an exported module's text, in program order."""
    return [match for kernel in triton_modules(module_text) for match in _DOT.findall(kernel)]


__all__ = ["TRITON", "triton_modules", "dot_operand_types"]
