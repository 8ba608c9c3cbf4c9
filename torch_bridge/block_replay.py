"""Replaying the outputs of a model's finished blocks during calibration.

`calibrate.gather` runs the model from its start on every calibration input
for every group of Linears, stopping once the group has run; so a group in a
transformer's last layer pays for all the layers before it, again and again
(on all-MiniLM-L6-v2, most of awq+gptq's time). Once every group that
can change a block (a child of one of the model's `nn.ModuleList`s, e.g. a
transformer layer) is done, that block computes the same output on a given
calibration input every time: its parameters no longer change and neither
do its inputs (everything before it in run order is done too). So its
output is kept per calibration input and returned instead of recomputed,
which gives bit-identical statistics at the cost of one block's work per
group and input.

A block is replayed only if it runs exactly once per forward (a block called
twice would get its first call's output back), and only while the outputs
kept stay under `MEMORY_BYTES`; past that, blocks are recomputed as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

MEMORY_BYTES = 1 << 30  # outputs kept at most (a block's output is one per input)


class BlockReplay:
    """Keeps and replays finished blocks' outputs; `key` names the calibration input
    being run (None: nothing is kept or replayed for that forward).

    groups: the layer groups (`layerwise.Group`), in the order they are processed;
    `finish(i)` after group i is done. A group touches a block if one of its Linears
    or its producer (whose parameters a fold changes) lies in it; a block is finished
    once every group touching it or any earlier block is done."""

    def __init__(self, model, groups, run_once, memory_bytes: int | None = None):
        self.key = None
        self._budget = MEMORY_BYTES if memory_bytes is None else memory_bytes
        self._kept_bytes = 0
        self._wrapped = {}  # block -> its own forward attribute (or None), to restore
        self._blocks = []  # (module, index of the last group it waits for)
        blocks = outermost_blocks(model)
        last = -1
        for name, module in blocks:
            touching = [i for i, g in enumerate(groups)
                        if any(inside(n, name) for n in g.names)
                        or (g.producer is not None and inside(g.producer, name))]
            last = max([last, *touching])  # a block waits for the blocks before it too
            if module in run_once and touching:
                self._blocks.append((module, last))

    def finish(self, done: int) -> None:
        """Group `done` (and every one before it) is done: blocks that waited for it replay."""
        if self._budget <= 0:
            return
        for module, last in self._blocks:
            if last <= done and module not in self._wrapped:
                self._wrap(module)

    def _wrap(self, module) -> None:
        own = module.__dict__.get("forward")
        compute = module.forward
        outputs = {}

        def forward(*args, **kwargs):
            key = self.key
            if key is not None and key in outputs:
                return outputs[key]
            result = compute(*args, **kwargs)
            if key is not None:
                size = sum(t.numel() * t.element_size() for t in tensors(result))
                if self._kept_bytes + size <= self._budget:
                    outputs[key] = result
                    self._kept_bytes += size
            return result

        self._wrapped[module] = own
        module.forward = forward

    def close(self) -> None:
        """Restores every block's forward and drops the outputs kept."""
        for module, own in self._wrapped.items():
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self._wrapped.clear()
        self._kept_bytes = 0


def call_model(model, item):
    """`model`'s forward on one calibration input (a dict: keywords; a tuple or list:
    positional arguments; else the one argument)."""
    if isinstance(item, Mapping):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


def blocks_run_once(model, call, first_input) -> set:
    """The blocks (`outermost_blocks`) that run exactly once in the forward
    ``call(model, first_input)``."""
    counts = {}
    blocks = [module for _, module in outermost_blocks(model)]

    def hook(module, args, output):
        counts[module] = counts.get(module, 0) + 1

    handles = [m.register_forward_hook(hook) for m in blocks]
    try:
        call(model, first_input)
    finally:
        for h in handles:
            h.remove()
    return {m for m in blocks if counts.get(m) == 1}


def outermost_blocks(model) -> list:
    """(name, module) of the children of the model's `nn.ModuleList`s that lie in no
    other such child, in the lists' order."""
    found = []
    for list_name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        if any(inside(list_name, name) for name, _ in found):
            continue
        prefix = f"{list_name}." if list_name else ""
        found += [(f"{prefix}{child_name}", child)
                  for child_name, child in module.named_children()]
    return found


def inside(name: str, block: str) -> bool:
    """Whether the module named `name` is the block named `block` or lies in it."""
    return name == block or name.startswith(block + ".")


def tensors(output) -> list:
    """Every tensor in a model's or module's output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in tensors(v)]
    return []


def attention_mask_of(item, hidden: torch.Tensor) -> torch.Tensor | None:
    """The ``[batch, seq]`` attention_mask of calibration input `item` (a tokenizer's dict)
    when it matches `hidden`'s two leading dimensions (a hidden state of that input: one
    row per token), else None (no mask, or a tensor of another shape: every row counts).
    A padded position (mask 0) is computed by the model but never used for its output."""
    mask = item.get("attention_mask") if isinstance(item, Mapping) else None
    if (not isinstance(mask, torch.Tensor) or hidden.dim() < 3
            or tuple(mask.shape) != tuple(hidden.shape[:2])):
        return None
    return mask


def real_token_rows(item, x: torch.Tensor) -> torch.Tensor:
    """`x`'s rows ``[tokens, features]``, only those of real tokens where `item`'s
    attention_mask covers them (`attention_mask_of`)."""
    mask = attention_mask_of(item, x)
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).to(rows.device) != 0]
