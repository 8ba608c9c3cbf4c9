"""Sentence sets shipped with the package: one sentence per line, UTF-8.

Templated (scripts/make_sentences.py made them from hand-written templates and
word lists, so the two sets share subjects, verbs, objects and frames):

- `sentences("calibration")` (400) calibrates the quantizers in docs and tests;
- `sentences("evaluation")` (200, disjoint) measures the result *in distribution*.

Natural (written by hand, sentence by sentence, sharing no template or word list
with the templated sets nor with each other; varied in topic, length (3 to 46
words) and register):

- `sentences("natural_evaluation")` (345): mostly what users type and read --
  news, dialogue and casual chat, questions, product reviews, support and
  technical text, sport, finance, medicine, travel, names and numbers;
- `sentences("natural_calibration")` (500, disjoint from every other set): a
  different mix -- narrative and letters, history, science explained, recipes
  and how-to instructions, legal and formal clauses, poetry-like lines, code
  comments, geography, arts, education, lists and labels.

Calibrating on one set and evaluating on another measures what a user will
see on text the quantizer never saw (docs/quantizers.md).
"""

from __future__ import annotations

import pathlib

KINDS = ("calibration", "evaluation", "natural_calibration", "natural_evaluation")


def sentences(kind: str) -> list[str]:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    path = pathlib.Path(__file__).with_name(f"{kind}_sentences.txt")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
