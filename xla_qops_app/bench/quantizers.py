"""The quantizers on a real model: all-MiniLM-L6-v2, every scheme x method.

`xla-qops bench --quantizers` writes docs/quantizers_table.md: the mean (and
min) cosine similarity of the quantized model's sentence embeddings to the
float model's over the 200 evaluation sentences, after calibrating on the
400 disjoint calibration sentences (xla_qops.data), and the time
`quantize_model` took. Each row is one `torch_bridge.quantize_model` call,
the public surface a user calls.
"""

from __future__ import annotations

import copy
import platform
import time

import xla_qops
from xla_qops import data
from xla_qops.quantizers import CALIBRATED
from xla_qops_app.calibration import BATCH, tokenized_batches

# (scheme, block_size, method, smoothing); None smoothing = none.
ROWS = [(scheme, block, method, None)
        for scheme, block in (("w4a16", 128), ("w4a16", -1), ("w4a8", 128), ("w8a8", -1))
        for method in ("rtn", "hqq", "awq", "gptq")]
ROWS += [("w8a8", -1, method, "smoothquant") for method in ("rtn", "gptq")]
ROWS += [("w4a8", 128, method, "smoothquant") for method in ("rtn", "gptq")]
TARGETS = {("w4a16", 128): 0.98, ("w4a16", -1): 0.96, ("w4a8", 128): 0.975, ("w8a8", -1): 0.999}


def embeddings(model, tokenizer, sentences):
    import torch

    from xla_qops_app.minilm import mean_pool
    out = []
    with torch.no_grad():
        for batch in tokenized_batches(tokenizer, sentences, 50):
            out.append(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(out)


def run(rows=ROWS, progress: bool = False):
    """[(scheme, block, method, smoothing, cos mean, cos min, seconds)]."""
    import torch_bridge
    from xla_qops_app.minilm import load_model

    model, tokenizer = load_model()
    calibration = tokenized_batches(tokenizer, data.sentences("calibration"))
    evaluation = data.sentences("evaluation")
    reference = embeddings(model, tokenizer, evaluation)
    results = []
    for scheme, block, method, smoothing in rows:
        start = time.perf_counter()
        quantized = torch_bridge.quantize_model(
            copy.deepcopy(model), scheme=scheme, block_size=block, symmetric=True,
            method=method, smoothing=smoothing, progress=progress,
            calibration=calibration if (method in CALIBRATED or smoothing) else None)
        seconds = time.perf_counter() - start
        cos = (embeddings(quantized, tokenizer, evaluation) * reference).sum(-1)
        results.append((scheme, block, method, smoothing, float(cos.mean()), float(cos.min()),
                        seconds))
        print(f"{scheme} {'pc' if block == -1 else f'g{block}'} {method}"
              f"{' +' + smoothing if smoothing else ''}: cos mean {cos.mean():.5f} min "
              f"{cos.min():.5f} ({seconds:.1f} s)", flush=True)
    return results


def markdown(results) -> str:
    import torch
    lines = ["# Quantizers on all-MiniLM-L6-v2 (`xla-qops bench --quantizers`)", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads; xla_qops "
             f"{getattr(xla_qops, '__version__', '')}. Calibration: the 400 sentences of "
             f"`xla_qops.data.sentences('calibration')` in inputs of {BATCH}; evaluation: the 200 "
             "disjoint ones of `sentences('evaluation')`. cos = cosine similarity of each "
             "sentence embedding (mean pooling, L2-normalised) to the float model's; time = "
             "the whole `torch_bridge.quantize_model` call. Symmetric weights.", "",
             "| scheme | layout | method | smoothing | cos mean | cos min | target | time s |",
             "|---|---|---|---|---|---|---|---|"]
    for scheme, block, method, smoothing, mean, low, seconds in results:
        target = TARGETS.get((scheme, block))
        status = "" if target is None else (f"≥ {target}: " + ("met" if mean >= target
                                                               else "**missed**"))
        lines.append(f"| {scheme} | {'per-channel' if block == -1 else f'g{block}'} | {method} | "
                     f"{smoothing or '–'} | {mean:.5f} | {low:.5f} | {status} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"
