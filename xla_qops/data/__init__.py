"""Sentence sets shipped with the package (scripts/make_sentences.py made them).

`sentences("calibration")` (400) calibrates the quantizers in docs and tests;
`sentences("evaluation")` (200, disjoint) measures the result.
"""

from __future__ import annotations

import pathlib

KINDS = ("calibration", "evaluation")


def sentences(kind: str) -> list[str]:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    path = pathlib.Path(__file__).with_name(f"{kind}_sentences.txt")
    return [line for line in path.read_text().splitlines() if line.strip()]
