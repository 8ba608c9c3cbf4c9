"""Calibration inputs from sentences: tokenized a batch at a time.

One batch is one model call of the calibration passes (and one input of
`torch_bridge.quantize_model`'s `calibration`), so the batch size trades the
number of calls against the padding each batch carries.
"""

from __future__ import annotations

BATCH = 16  # sentences (or token rows) per model call


def tokenized_batches(tokenizer, sentences, batch: int = BATCH) -> list[dict]:
    """Model inputs (the tokenizer's dict of torch tensors) of `sentences`, `batch` at a
    time, each padded to its own longest sentence."""
    return [dict(tokenizer(sentences[i:i + batch], padding=True, return_tensors="pt"))
            for i in range(0, len(sentences), batch)]
