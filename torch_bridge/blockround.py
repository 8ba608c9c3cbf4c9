"""Block-output reconstruction: AutoRound's objective, per transformer block ("...+blockround").

Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs" (2023, intel/auto-round; also BRECQ, OmniQuant): the
rounding of every Linear of a transformer block, and each group's clipping,
are learned *jointly* so that the block's output matches the float block's,
errors of the earlier (already quantized) blocks included. A per-layer
objective ``tr(D H D^T)`` (xla_qops.quantizers.autoround) sees neither how a
layer's error passes through the attention softmax and GELU nor how the
block's Linears can cancel each other's errors; the block's output does.

Here it refines a layer-wise result (``awq+gptq``: AWQ's folded scales, its
clipped grids, GPTQ's codes, the per-layer held-out fallback), which is step
0. For each block (a child of the model's outermost `nn.ModuleList`s, in
order) and each of its quantized Linears, with the start's codes ``q0`` on
the grid ``(s0, z0)`` and ``base = s0 q0 - z0``:

    scale = s0 * m                    (symmetric;  m in [MIN_CLIP / c0, 1 / c0])
    q = clip(round((base + z) / scale + u), qmin, qmax),   w_hat = scale q - z

``c0`` is the start's clip ratio of the group's range (`autoround._clip_of`),
so the clipping stays in AutoRound's [`MIN_CLIP`, 1] of the range
(asymmetric grids: the range's two ends scaled by two such factors). The
offset ``u`` starts where the float weight lies between codes,
``u0 = (w + z0) / s0 - q0`` clipped to +-`autoround.START_OFFSET` (< 0.5, so step 0
is the start's codes exactly), and moves by at most 0.5 from it, AutoRound's
bound (a code moves at most one step at m = 1). Starting at ``u = 0`` instead
(every weight exactly on its code) no offset can reach a rounding boundary
within the paper's learning-rate budget (``sum(lr) = 0.5``): measured on
MiniLM, no block then improved on held-out inputs. The loss is the
mean squared error of the block's output (over real tokens where the input
has an ``attention_mask``) against `TARGET`: the float model's block output
on the float model's inputs to it (the paper's), or ``"float_block"``: the
float block on the quantized model's inputs. The block's inputs are the
quantized model's (every earlier block already refined). Signed gradient
descent as the paper's: `STEPS` steps, ``lr = 1 / STEPS`` decaying linearly,
rounding's gradient passed straight through, one calibration input a step.

Overfitting guard (issue 26 section 2): the held-out calibration inputs
(`heldout.is_holdout`) are never fitted; the block's output error on them is
measured at step 0 and every `EVAL_EVERY` steps, and the block keeps the
parameters of its best held-out step. A block where no step beats step 0
keeps the start's weights unchanged (reported: "awq+gptq (blockround: no
held-out gain)"); since the start already passed the per-layer check
against round to nearest, no block ends worse than it on held-out inputs.
With a single calibration input nothing is held out and the block keeps its
last step.

The final codes are rounded with numpy by `grid.round_to_grid` on float32
scales (as every other method), so every stored value is a code of the
grid in API.md's convention.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from torch_bridge.block_replay import attention_mask_of, inside, outermost_blocks
from torch_bridge.block_replay import call_model as _call
from torch_bridge.block_replay import tensors as _tensors
from torch_bridge.linear import XlaQuantizedLinear
from xla_qops.quantize import _quantized_weight
from xla_qops.quantizers import autoround, grid, heldout
from xla_qops.quantizers.awq import MIN_CLIP

STEPS = 200  # the paper's default number of iterations
EVAL_EVERY = 20  # steps between two measurements of the held-out block error
TARGET = "float"  # the paper's: the float model's block output on its own inputs (or
# "float_block": the float block on the quantized model's inputs; docs/quantizers.md compares)
LEARNING_RATE = 1.0  # times 1 / steps: the paper's default, decaying linearly to 0
INPUTS_PER_STEP = 1  # calibration inputs whose errors one step's gradient sums
LEARN_ROUNDING = True  # False: the clipping only (the offsets stay at their start)


class _Stop(Exception):
    """Raised by a hook to end a forward once a block's input is captured."""


@dataclasses.dataclass
class BlockResult:
    """What the reconstruction did to one block (losses: mean squared output error)."""
    name: str
    fitted_before: float  # on the fitted inputs, at step 0 (the start)
    fitted_after: float  # ... with the parameters kept
    held_out_before: float | None  # on the held-out inputs (None: none held out)
    held_out_after: float | None
    step: int  # the step kept (0: the start's weights, unchanged)


class _LearnedLinear(torch.nn.Module):
    """A quantized Linear whose rounding offsets and clipping are learnable (float32, on the
    host); forward simulates the quantized layer (input scale; int8 activations when
    `quantize_activation`: fp8 activations are not simulated)."""

    def __init__(self, float_weight, qw, bias, input_scale, quantize_activation, bits,
                 block_size, symmetric):
        super().__init__()
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.quantize_activation = quantize_activation
        groups = grid.to_groups(np.asarray(float_weight, np.float32), block_size)
        q0, s0, z0 = _groups_of(qw)
        self.q0, self.s0, self.z0 = q0, s0, z0
        self.base_np = grid.dequantize(q0, s0, z0)  # what the offsets round (step 0: q0)
        c0 = autoround._clip_of(groups, s0, bits, symmetric)
        self.lo0 = s0 * np.float32(grid.QRANGE[bits][0]) - (0 if z0 is None else z0)
        self.hi0 = self.lo0 + s0 * np.float32(grid.QRANGE[bits][1] - grid.QRANGE[bits][0])
        as_t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731  (a copy)
        self.register_buffer("base", as_t(self.base_np), persistent=False)
        self.register_buffer("scale0", as_t(s0), persistent=False)
        self.register_buffer("zero0", None if z0 is None else as_t(z0), persistent=False)
        self.register_buffer("low0", as_t(self.lo0), persistent=False)
        self.register_buffer("high0", as_t(self.hi0), persistent=False)
        self.register_buffer("m_min", as_t(MIN_CLIP / c0), persistent=False)
        self.register_buffer("m_max", as_t(1.0 / c0), persistent=False)
        # The offsets start at the float weight's own place between codes (on the start's
        # grid, kept inside the start's code), so step 0 is the start's codes and a weight
        # the start rounded against its value lies next to the boundary it crossed.
        start = autoround.start_offsets(groups, q0, s0, z0)
        self.register_buffer("offset_min", as_t(start - 0.5), persistent=False)
        self.register_buffer("offset_max", as_t(start + 0.5), persistent=False)
        self.offsets = torch.nn.Parameter(as_t(start))
        self.m_lo = torch.nn.Parameter(torch.ones_like(self.scale0))
        self.m_hi = torch.nn.Parameter(torch.ones_like(self.scale0))
        self.bias = None if bias is None else bias.detach().float()
        self.input_scale = None if input_scale is None else input_scale.detach().float()

    def grid_params(self):
        """(scale, zero_point or None) ``[G, out]``, exactly the start's at m = 1."""
        if self.zero0 is None:
            return self.scale0 * self.m_hi, None
        qmin = grid.QRANGE[self.bits][0]
        spread0 = self.high0 - self.low0
        ratio = (self.high0 * self.m_hi - self.low0 * self.m_lo) / torch.where(
            spread0 == 0, torch.ones_like(spread0), spread0)
        scale = self.scale0 * torch.where(spread0 == 0, torch.ones_like(ratio), ratio)
        zero = self.zero0 + (scale - self.scale0) * qmin - self.low0 * (self.m_lo - 1)
        return scale, zero

    def weight_hat(self):
        qmin, qmax = grid.QRANGE[self.bits]
        scale, zero = self.grid_params()
        shifted = self.base if zero is None else self.base + zero[..., None]
        x = shifted / scale[..., None] + self.offsets
        rounded = x + (torch.round(x) - x).detach()  # straight-through rounding
        w = scale[..., None] * torch.clamp(rounded, qmin, qmax)
        if zero is not None:
            w = w - zero[..., None]
        groups, out, block = w.shape
        return w.permute(1, 0, 2).reshape(out, groups * block)

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.quantize_activation:
            x = _fake_int8_per_token(x, self.block_size)
        return torch.nn.functional.linear(x, self.weight_hat(), self.bias).to(dtype)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.offsets.copy_(torch.minimum(torch.maximum(self.offsets, self.offset_min),
                                             self.offset_max))
            self.m_lo.copy_(torch.minimum(torch.maximum(self.m_lo, self.m_min), self.m_max))
            self.m_hi.copy_(torch.minimum(torch.maximum(self.m_hi, self.m_min), self.m_max))

    def quantized_weight(self):
        """The learned weight as an (unpacked) `QuantizedWeight`, rounded with numpy:
        `grid.round_to_grid` on `grid_params`' float32 scales (at m = 1 exactly the start's:
        ``x * 1``, ``x - 0`` and ``(h - l) / (h - l)`` are exact)."""
        with torch.no_grad():
            scale, zero = (None if t is None else t.numpy().astype(np.float32, copy=True)
                           for t in self.grid_params())
        offsets = self.offsets.detach().numpy().astype(np.float32)
        q = grid.round_to_grid(self.base_np, scale, zero, self.bits, offsets)
        return _quantized_weight(*grid.to_layout(q, scale, zero, self.block_size), self.bits,
                                 self.block_size, pack=False)


def _groups_of(qw):
    """(q, scale, zero_point or None) in the groups form (grid) of an unpacked int
    `QuantizedWeight`."""
    q = np.asarray(qw.w)
    scale = np.asarray(qw.scale, np.float32)
    zero = None if qw.zero_point is None else np.asarray(qw.zero_point, np.float32)
    if qw.block_size == -1:
        return q[None], scale[None], None if zero is None else zero[None]
    return q.transpose(0, 2, 1), scale, zero


def _fake_int8_per_token(x, block_size):
    """x quantized and dequantized as API.md section 1's int8 activations (symmetric, one
    scale per token, and per input block with blockwise weights), rounding passed through."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], -1, shape[-1] if block_size == -1 else block_size)
    scale = blocks.abs().amax(-1, keepdim=True).detach() / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = blocks / scale
    y = y + (torch.round(y) - y).detach()
    return (torch.clamp(y, -128, 127) * scale).reshape(shape)


def _mask_of(item, output):
    """A [batch, seq, 1] float mask of real tokens when `item` has an attention_mask matching
    `output`'s leading dimensions, else None (every position counts)."""
    mask = attention_mask_of(item, output)
    return None if mask is None else mask.to(output.dtype).unsqueeze(-1)


def _error(output, target, mask) -> torch.Tensor:
    d = (output.float() - target.float()) ** 2
    if mask is None:
        return d.mean()
    return (d * mask).sum() / (mask.sum() * d.shape[-1]).clamp(min=1)


def capture_block_io(model, block, inputs, *, outputs: bool):
    """Per calibration input, the (args, kwargs) `block` is called with, and (with
    `outputs`) its first output tensor; each forward stops after the block."""
    captured = []
    state = {}

    def pre(module, args, kwargs):
        state["in"] = (args, kwargs)
        if not outputs:
            raise _Stop

    def post(module, args, kwargs, output):
        state["out"] = _tensors(output)[0].detach()
        raise _Stop

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True)]
    if outputs:
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        for item in inputs:
            state.clear()
            try:
                with torch.no_grad():
                    _call(model, item)
            except _Stop:
                pass
            captured.append((state.get("in"), state.get("out")))
    finally:
        for h in handles:
            h.remove()
    return captured


def float_block_outputs(model, inputs, names) -> dict:
    """{block name: [its first output tensor per calibration input]} of the float model's
    blocks `names` (one forward per input, before anything is quantized).

    Memory: every block's output for every input is kept until its block is refined, on
    the model's device, in its dtype: inputs x tokens (padded) x hidden x 4 bytes per block
    in float32. MiniLM (384 hidden) on the 500 natural sentences (32 inputs, 12 720 padded
    tokens): 19 MiB a block, 112 MiB for its 6; a 4096-hidden decoder on 128 inputs of 2048
    tokens: 4 GiB a block. No cap: fewer or shorter calibration inputs bound it (or
    `TARGET = "float_block"`, which keeps none)."""
    modules = dict(model.named_modules())
    kept = {name: [] for name in names}

    def hook_for(name):
        def hook(module, args, output):
            kept[name].append(_tensors(output)[0].detach().clone())
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for item in inputs:
                _call(model, item)
    finally:
        for h in handles:
            h.remove()
    return kept


def blocks_to_refine(model, names, run_once: set) -> list:
    """(block name, block, [Linear names in it]) of the blocks that run once per forward
    (`run_once`: `block_replay.blocks_run_once`'s) and hold some of the Linears `names`,
    in order."""
    found = []
    for name, block in outermost_blocks(model):
        linears = [n for n in names if inside(n, name)]
        if linears and block in run_once:
            found.append((name, block, linears))
    return found


def refine_block(model, block, layer_names, inputs, targets, learned: dict, swap, *,
                 steps: int | None = None, float_linears: dict | None = None) -> BlockResult:
    """Learns the `learned` ({name: _LearnedLinear}) of one block, swapped in through
    `swap(name, module)`, against `targets` (the float block's output per input, or None:
    the float block on the quantized model's inputs, `float_linears` giving its Linears).
    Leaves the learned modules swapped in, holding the parameters kept."""
    steps = STEPS if steps is None else steps
    captured = capture_block_io(model, block, inputs, outputs=False)
    if targets is None:  # the float block on the quantized model's inputs to it
        for name in layer_names:
            swap(name, float_linears[name])
        with torch.no_grad():
            targets = [_tensors(block(*args, **kwargs))[0].detach()
                       for (args, kwargs), _ in captured]
    for name in layer_names:
        swap(name, learned[name])
    fitted = [i for i in range(len(inputs)) if not heldout.is_holdout(i, len(inputs))]
    held = [i for i in range(len(inputs)) if heldout.is_holdout(i, len(inputs))]
    masks = [None] * len(inputs)
    for i, item in enumerate(inputs):
        masks[i] = _mask_of(item, targets[i])

    def error(indices) -> float:
        with torch.no_grad():
            total = 0.0
            for i in indices:
                args, kwargs = captured[i][0]
                total += float(_error(_tensors(block(*args, **kwargs))[0], targets[i], masks[i]))
            return total / max(len(indices), 1)

    params = [p for m in learned.values()
              for p in ((m.offsets,) if LEARN_ROUNDING else ()) + (m.m_lo, m.m_hi)]
    frozen = [p for p in block.parameters() if p.requires_grad and
              all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)

    def snapshot():
        return [p.detach().clone() for p in params]

    judge = held if held else fitted
    best_loss, best_step, best = error(judge), 0, snapshot()
    fitted_before = error(fitted) if held else best_loss
    held_before = best_loss if held else None
    lr0 = LEARNING_RATE / max(steps, 1)
    try:
        for step in range(steps):
            with torch.enable_grad():
                loss = 0.0
                for j in range(INPUTS_PER_STEP):
                    i = fitted[(step * INPUTS_PER_STEP + j) % len(fitted)]
                    args, kwargs = captured[i][0]
                    loss = loss + _error(_tensors(block(*args, **kwargs))[0], targets[i],
                                         masks[i])
                # m_lo is unused by symmetric grids: no gradient, no step
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            lr = lr0 * (1.0 - step / steps)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p.sub_(lr * torch.sign(g))
            for m in learned.values():
                m.clamp_()
            done = step + 1
            if done % EVAL_EVERY == 0 or done == steps:
                if held:
                    current = error(held)
                    if current < best_loss:
                        best_loss, best_step, best = current, done, snapshot()
                else:
                    best_step, best = done, snapshot()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    return BlockResult("", fitted_before, error(fitted), held_before,
                       best_loss if held else None, best_step)


def reconstruct(model, inputs, starts: dict, *, bits: int, block_size: int, symmetric: bool,
                quantize_activation: bool, swap, float_outputs: dict | None,
                float_linears: dict, run_once: set, steps: int | None = None,
                progress: bool = False) -> dict:
    """Refines, block by block, the quantized Linears of `starts` ({name: (float32 weight as
    quantized, i.e. with a folded or explicit scale in it; the start's unpacked
    `QuantizedWeight`; its `XlaQuantizedLinear`)}) in `model`; returns {name: (new
    XlaQuantizedLinear, QuantizedWeight, BlockResult)} of the Linears of blocks that moved,
    and {block name: BlockResult} under the key None.

    float_outputs: {block name: [float output per input]} (`float_block_outputs`, target
    "float"), or None (target "float_block": the float Linears `float_linears` in the
    block on the quantized inputs). run_once: the blocks that run once per forward
    (`block_replay.blocks_run_once`, traced once by the caller)."""
    results, blocks = {}, {}
    for block_name, block, names in blocks_to_refine(model, list(starts), run_once):
        learned = {}
        for name in names:
            w, qw, module = starts[name]
            simulated = quantize_activation and module.activation_format != "fp8"
            learned[name] = _LearnedLinear(
                w, qw, module.bias, module.input_scale, simulated, bits, block_size, symmetric)
        targets = None if float_outputs is None else float_outputs[block_name]
        outcome = refine_block(model, block, names, inputs, targets, learned, swap,
                               steps=steps, float_linears=float_linears)
        outcome = dataclasses.replace(outcome, name=block_name)
        blocks[block_name] = outcome
        if progress:
            print(f"blockround {block_name}: step {outcome.step} kept; fitted "
                  f"{outcome.fitted_before:.3e} -> {outcome.fitted_after:.3e}, held-out "
                  f"{outcome.held_out_before} -> {outcome.held_out_after}", flush=True)
        for name in names:
            _, _, module = starts[name]
            if outcome.step == 0:
                swap(name, module)
                continue
            qw = learned[name].quantized_weight()
            new = XlaQuantizedLinear.from_quantized(
                qw, quantize_activation=quantize_activation, bias=module.bias,
                input_scale=module.input_scale, device=module.weight.device,
                activation_format=getattr(module, "activation_format", None))
            swap(name, new)
            results[name] = (new, qw, outcome)
    results[None] = blocks
    return results
