"""End-to-end decoder benchmark: what a user sees from `generate`.

A Llama-architecture decoder (transformers ``LlamaForCausalLM`` with
TinyLlama-1.1B's dimensions, random bf16 weights, nothing downloaded) is
quantized or swapped into each variant, then every variant generates greedily
from the same prompt (``prefill`` tokens, then ``decode`` new ones), the
variants taking turns within every repetition. Per variant: prefill and decode
tokens/s (medians, and every generation's, for the spread and for ratios paired
by turn), the weight bytes one decode step reads, and the floor those bytes set
at the read bandwidth measured in the same turns. The eager peers the JAX rows
are compared with take turns with them again (`companions`).

Variants (`variants`): bf16 torch; torch's own int4 kernel
(``_weight_int4pack_mm_for_cpu``, g128, asymmetric) and torchao's int4 (when it
imports; asymmetric too) swapped in the way `quantize_model` swaps ours; xla-qops schemes, with and
without ``lm_head`` quantized, on torch CPU tensors (``eager``: HF
``generate``), as one jitted JAX function per step (``jax``: the same torch
module through torchax, greedy loop in Python around the jitted step, a static
KV cache), as the Flax NNX decoder of `xla_qops_app.jax_llama` (``nnx``: the
same weights, one jitted prefill and one jitted decode step over the state
split once), and as HF's forward and the argmax compiled as one greedy step by
`torch.compile` (``compile``: inductor, static cache, HF's eager attention, a
Python loop around the step: `CompiledGenerator`). llama.cpp
(Q4_0, Q8_0; `llama_cpp`, when scripts/ensure_llama_cpp.sh has built it) takes
turns with the ``nnx`` and ``compile`` rows.

Used by ``xla-qops bench --model llama`` (xla_qops_app/commands/bench.py) and by
the decoder section of ``xla-qops demo``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import statistics
import time

import numpy as np

# TinyLlama-1.1B (hidden 2048, MLP 5632, 32 heads, 4 KV heads, 22 layers).
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINYLLAMA_LAYERS = 22


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: how the model's Linear layers are stored and how it runs.

    kind: "bf16", "torch_int4" (torch's `_weight_int4pack_mm_for_cpu`),
      "torchao_int4" (torchao `Int4WeightOnlyConfig`, opaque CPU format),
      "xla_qops" (`torch_bridge.quantize_model`, or `jax_llama.quantize` on
      the nnx path) or "llama_cpp" (llama.cpp; `scheme` is its quant type,
      "Q4_0" or "Q8_0").
    path: "eager" (torch CPU tensors, HF generate), "jax" (torchax, jitted),
      "nnx" (`xla_qops_app.jax_llama`, jitted), "compile" (a greedy step,
      forward and argmax, under `torch.compile`, static cache), "compile-cpp"
      (the same with inductor's C++ wrapper), "llama.cpp", or "xla"
      (the torch_xla device, static cache; `measure_xla_device`).
    """

    kind: str
    path: str = "eager"
    scheme: str | None = None
    block_size: int = -1
    symmetric: bool = True
    lm_head: bool = False  # lm_head quantized too

    @property
    def group(self) -> str:
        """The path group whose turns time this row (`measure`): llama.cpp and
        the compiled torch step take turns with the NNX decoder."""
        return "nnx" if self.path in ("llama.cpp",) + COMPILED_PATHS else self.path

    @property
    def name(self) -> str:
        if self.kind == "llama_cpp":
            return f"llama.cpp {self.scheme} [{self.path}]"
        if self.kind == "xla_qops":
            layout = "pc" if self.block_size == -1 else f"g{self.block_size}"
            zp = "" if self.symmetric else " asym"
            what = f"xla-qops {self.scheme.upper()} {layout}{zp}"
        else:
            what = {"bf16": "bf16 torch", "torch_int4": "torch int4 g128",
                    "torchao_int4": "torchao int4 g128"}[self.kind]
            if self.path == "nnx":  # the NNX decoder's float model, not torch's
                what = "bf16 flax nnx"
        head = " +lm_head" if self.lm_head else ""
        return f"{what}{head} [{self.path}]"

    @property
    def scheme_key(self) -> str:
        """What the weights are, for `report.ratio`'s same-scheme check: the
        scheme, layout, symmetry and whether lm_head is quantized too. torch's
        and torchao's int4 are W4A16 g128 asymmetric (both quantize with zero
        points: `TorchInt4Linear`, torchao's `Int4WeightOnlyConfig`)."""
        if self.kind == "bf16":
            return "bf16"
        if self.kind == "llama_cpp":
            return f"llama.cpp-{self.scheme.lower()}"
        if self.kind in ("torch_int4", "torchao_int4"):
            base = "w4a16-g128-asym"
        else:
            layout = "pc" if self.block_size == -1 else f"g{self.block_size}"
            base = f"{self.scheme}-{layout}-{'sym' if self.symmetric else 'asym'}"
        return base + (" +lm_head" if self.lm_head else "")


OUR_SCHEMES = (("w4a16", 128, True), ("w4a16", 128, False), ("w8a16", -1, True),
               ("w8a8", -1, True), ("w4a8", 128, True))
# Eager only: fp8 weights (issue 24 section 4: against bf16 torch end to end).
EAGER_ONLY_SCHEMES = (("w8a16-fp8", -1, True),)
# The NNX decoder's rows (lm_head quantized too), against llama.cpp's.
NNX_SCHEMES = (("w4a16", 128, True), ("w8a16", -1, True), ("w4a8", 128, True))
LLAMA_CPP_TYPES = ("Q4_0", "Q8_0")
# The compiled greedy step with inductor's Python wrapper (its default) and with
# its C++ wrapper (`cpp_wrapper=True`: the graph's kernels called from C++, our op
# still through Python; twice the compile time), `CompiledGenerator`. compile-cpp
# is not a default path: quiet, same turns, 2026-12-07, it decoded 64.5 tok/s
# against the default wrapper's 68.1 (docs/torch.md).
COMPILED_PATHS = ("compile", "compile-cpp")
PATHS = ("eager", "jax", "nnx") + COMPILED_PATHS + ("llama.cpp",)
DEFAULT_PATHS = tuple(p for p in PATHS if p != "compile-cpp")


def variants(paths=DEFAULT_PATHS, torchao=True) -> list[Variant]:
    """Every row of the benchmark (the peers first)."""
    rows = []
    if "eager" in paths:
        rows.append(Variant("bf16"))
        for lm_head in (False, True):
            rows.append(Variant("torch_int4", lm_head=lm_head))
            if torchao:
                rows.append(Variant("torchao_int4", lm_head=lm_head))
            rows += [Variant("xla_qops", "eager", s, b, sym, lm_head)
                     for s, b, sym in OUR_SCHEMES + EAGER_ONLY_SCHEMES]
    if "jax" in paths:
        rows.append(Variant("bf16", "jax"))
        rows += [Variant("xla_qops", "jax", s, b, sym, True) for s, b, sym in OUR_SCHEMES]
    if "llama.cpp" in paths:
        rows += [Variant("llama_cpp", "llama.cpp", t) for t in LLAMA_CPP_TYPES]
    if "nnx" in paths:
        rows.append(Variant("bf16", "nnx"))
        rows += [Variant("xla_qops", "nnx", s, b, sym, True) for s, b, sym in NNX_SCHEMES]
    if "compile" in paths:
        rows.append(Variant("bf16", "compile"))
        rows.append(Variant("xla_qops", "compile", "w4a16", 128, True, True))
    if "compile-cpp" in paths:
        rows.append(Variant("xla_qops", "compile-cpp", "w4a16", 128, True, True))
    return rows


# ---------------------------------------------------------------------------
# Models

def build_model(layers: int, seed: int = 0, dims=None):
    """A bf16 LlamaForCausalLM with random weights (transformers' own init)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, **(dims or TINYLLAMA))
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _linear_filter(lm_head: bool):
    return lambda name, module: lm_head or name.rsplit(".", 1)[-1] != "lm_head"


def torch_int4pack(qw):
    """An xla_qops int4 g-blockwise `QuantizedWeight` in the form of torch's CPU
    int4 kernel: (`_convert_weight_to_int4pack_for_cpu` of q + 8 as [out, in],
    scales_and_zeros bf16 [in/B, out, 2]). torch's convention w = (u - 8) * s + z
    is this project's with z = -zero_point."""
    import torch
    ints = np.asarray(qw.unpack().int_values()).astype(np.int32)  # [in/B, B, out]
    u = torch.from_numpy(ints.reshape(-1, ints.shape[-1]).T.copy() + 8)  # [out, in]
    packed = torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
    scale = np.asarray(qw.scale, np.float32)
    zero = -np.asarray(qw.zero_point, np.float32) if qw.zero_point is not None else 0 * scale
    sz = torch.from_numpy(np.stack([scale, zero], -1)).to(torch.bfloat16).contiguous()
    return packed, sz


def _torch_int4_linear_class():
    import torch

    class TorchInt4Linear(torch.nn.Module):
        """An nn.Linear on torch's own int4 CPU kernel (the peer a CPU user has)."""

        def __init__(self, linear, group_size=128, symmetric=False):
            super().__init__()
            import jax.numpy as jnp
            import xla_qops
            w = jnp.asarray(linear.weight.detach().float().numpy())
            # Asymmetric by default, as torch's and torchao's int4 recipes quantize;
            # symmetric=True gives the kernel a symmetric weight (zero points of 0).
            qw = xla_qops.quantize_weight(w, bits=4, block_size=group_size,
                                          symmetric=symmetric)
            packed, sz = torch_int4pack(qw)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", sz)
            self.group_size = group_size
            self.out_features = linear.out_features
            self.bias = linear.bias

        def forward(self, x):
            lead = x.shape[:-1]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, x.shape[-1]).contiguous(), self.packed, self.group_size,
                self.scales_and_zeros)
            y = y.reshape(*lead, self.out_features)
            return y if self.bias is None else y + self.bias
    return TorchInt4Linear


def _swap_linears(model, make, lm_head: bool):
    import torch
    keep = _linear_filter(lm_head)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, torch.nn.Linear) and keep(full, child):
                setattr(parent, name, make(child))
    return model


def torchao_int4_config():
    """torchao's int4 weight-only config for CPU tensors (g128, asymmetric, its opaque
    CPU format on torch's `_weight_int4pack_mm_for_cpu`). torchao <= 0.15 names it
    ``Int4WeightOnlyConfig(int4_packing_format="opaque")``; 0.16+ moved that format to
    ``torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig``.
    set_inductor_config=False: it would change torch's global float32 matmul
    precision for everything else in the process."""
    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat
    if "OPAQUE" in Int4PackingFormat.__members__:
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="opaque",
                                    set_inductor_config=False)
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    return PrototypeInt4WeightOnlyConfig(group_size=128, set_inductor_config=False)


@functools.cache
def torchao_available() -> str | None:
    """None if torchao's int4 CPU path can run here, else why not."""
    try:
        import torchao  # noqa: F401
        torchao_int4_config()
    except Exception as e:  # noqa: BLE001  any import failure means: not available
        return f"torchao does not import ({type(e).__name__}: {e})"[:200]
    return None


@functools.cache
def path_unavailable(path: str) -> str | None:
    """None if the rows of `path` can run in this environment, else why not: the
    ``jax`` path needs torchax, the ``xla`` device section torch_xla (the current
    stack has neither; requirements-current.txt says why)."""
    module = {"jax": "torchax", "xla": "torch_xla"}.get(path)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001  any import failure means: not available
        return f"{module} does not import here ({type(e).__name__}: {e})"[:200]
    return None


def make_variant(base, variant: Variant):
    """A copy of the bf16 `base` model stored as `variant` says."""
    model = copy.deepcopy(base)
    if variant.kind == "bf16":
        return model
    if variant.kind == "torch_int4":
        return _swap_linears(model, _torch_int4_linear_class(), variant.lm_head)
    if variant.kind == "torchao_int4":
        from torchao.quantization import quantize_
        config = torchao_int4_config()
        keep = _linear_filter(variant.lm_head)
        import torch
        quantize_(model, config,
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and keep(fqn, m))
        return model
    import torch_bridge
    return torch_bridge.quantize_model(model, scheme=variant.scheme,
                                       block_size=variant.block_size,
                                       symmetric=variant.symmetric,
                                       filter_fn=_linear_filter(variant.lm_head))


def _tensor_bytes(t) -> int:
    """Bytes of a tensor, of the plain tensors inside a tensor subclass (torchao)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t).__name__ not in ("Tensor", "Parameter"):
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def step_bytes(model) -> int:
    """Bytes one decode step reads from the weights: every parameter and buffer
    except the token embedding table (a step reads one row of it per token)."""
    import torch
    embedding = model.get_input_embeddings().weight
    seen, total = {id(embedding)}, 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or not isinstance(t, torch.Tensor):
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    return total


# ---------------------------------------------------------------------------
# Generators: one greedy generation, timed

@dataclasses.dataclass
class Timing:
    prefill_s: float  # prompt forward, up to the first token's logits
    step_s: float     # per decode step (batch tokens each)
    tokens: np.ndarray  # [batch, decode] generated ids


class EagerGenerator:
    """HF `generate` on torch CPU tensors (greedy, the default dynamic cache)."""

    def __init__(self, model, prompt, decode: int):
        self.model, self.prompt, self.decode = model, prompt, decode

    def __call__(self) -> Timing:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps = []

        class Stamp(LogitsProcessor):  # called once per generated token
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = torch.from_numpy(self.prompt)
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=self.decode, min_new_tokens=self.decode,
                                      do_sample=False, pad_token_id=0,
                                      logits_processor=LogitsProcessorList([Stamp()]))
        return Timing(stamps[0] - start, (stamps[-1] - stamps[0]) / (len(stamps) - 1),
                      out[:, ids.shape[1]:].numpy())


class JaxGenerator:
    """The same torch module as a jitted JAX step (torchax), static KV cache.

    ``step(params, keys, values, ids, positions) -> (last logits, keys, values)``
    runs the module's forward on JAX arrays (the quantized op lowered to
    `xla_qops.quantized_matmul`); the cache is donated and updated in place.
    One compilation for the prompt's shape, one for a single token.
    """

    def __init__(self, model, prompt, decode: int):
        import jax
        import jax.numpy as jnp
        import torch
        import torchax
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        from torch_bridge import torchax_ops
        torchax_ops.register_with_torchax()
        self.env = env = torchax.default_env()
        self.params, _ = torchax.extract_jax(model, env)
        self.prompt, self.decode = prompt, decode
        config = model.config
        self.max_len = prompt.shape[1] + decode
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache_shape = (prompt.shape[0], config.num_key_value_heads, self.max_len, head_dim)
        self.layers = config.num_hidden_layers
        self.cache_dtype = jnp.dtype(str(model.get_input_embeddings().weight.dtype).split(".")[-1])
        max_len = self.max_len
        # transformers >= 5 initialises a layer from both key and value states.
        two_state_init = "value_states" in inspect.signature(StaticLayer.lazy_initialization).parameters

        def step(params, keys, values, ids, positions):
            with env:
                cache = StaticCache(config=config, max_cache_len=max_len)
                keys_t, values_t = env.j2t_iso((keys, values))
                params_t, ids_t, pos_t = env.j2t_iso((params, ids, positions))
                for layer, k, v in zip(cache.layers, keys_t, values_t):
                    if two_state_init:
                        layer.lazy_initialization(k[:, :, :1], v[:, :, :1])
                    else:
                        layer.lazy_initialization(k[:, :, :1])
                    layer.keys, layer.values = k, v
                    if hasattr(layer, "cumulative_length"):
                        # transformers 5 writes at the layer's own count of
                        # tokens seen, not at cache_position: a fresh cache
                        # per step must start counting at this step's position.
                        layer.cumulative_length = pos_t[0].clone()
                out = torch.func.functional_call(
                    model, params_t, (ids_t,),
                    dict(past_key_values=cache, cache_position=pos_t, use_cache=True))
                return env.t2j_iso((out.logits[:, -1], [layer.keys for layer in cache.layers],
                                    [layer.values for layer in cache.layers]))
        self.step = jax.jit(step, donate_argnums=(1, 2))

    def __call__(self) -> Timing:
        import jax
        import jax.numpy as jnp
        zeros = lambda: [jnp.zeros(self.cache_shape, self.cache_dtype) for _ in range(self.layers)]
        keys, values = zeros(), zeros()
        n = self.prompt.shape[1]
        start = time.perf_counter()
        logits, keys, values = self.step(self.params, keys, values,
                                         jnp.asarray(self.prompt, jnp.int32), jnp.arange(n))
        token = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
        token.block_until_ready()
        first = time.perf_counter()
        tokens = [token]
        for i in range(self.decode - 1):
            logits, keys, values = self.step(self.params, keys, values, token,
                                             jnp.arange(n + i, n + i + 1))
            token = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
            tokens.append(token)
        jax.block_until_ready(tokens)
        end = time.perf_counter()
        return Timing(first - start, (end - first) / (self.decode - 1),
                      np.concatenate([np.asarray(t) for t in tokens], 1))


# Inductor option of the compiled step: store a pointwise result whose expression
# has more than this many ops instead of recomputing it wherever it is read
# (torch's default: 50 on CPU in torch 2.14, 30 in 2.9). Inductor lowers the
# one-query attention scores (a bmm with M == 1) to a multiply-and-sum over the
# keys and inlines the rotary-embedded query into it, so the query's RoPE,
# cos and sin of its positions included, ran once per key: 0.42 ms a layer at
# 192 positions instead of 0.14 (docs/torch.md, "The compiled decode step").
ROPE_REALIZE_OPCOUNT = 8


class CompiledGenerator:
    """HF's Llama forward under `torch.compile` (inductor, ``fullgraph=True``),
    greedy, with a static KV cache: one compiled function is the whole step,
    forward and argmax, and a Python loop feeds it its own tokens, as HF's
    static-cache ``decode_one_tokens`` example does (and the ``jax`` path).
    What it fixes against HF `generate` around a compiled forward (docs/torch.md,
    "The compiled decode step"):

    - `generate`'s own per-step work (inputs, the 4D mask, logits processors,
      stopping criteria, the growing ids): 2.3-3.4 ms of main-thread time a step,
      as much as everything else outside our matmuls; the loop here passes only
      the token and its position, and the causal mask is made inside the graph;
    - HF's "eager" attention: under inductor it becomes a batched matmul and a
      fused softmax, where "sdpa" (the default) calls ATen's flash-attention
      kernel for CPU, which spends 0.3-0.5 ms a call on one query token in bf16;
      the tokens are the same;
    - `ROPE_REALIZE_OPCOUNT`: the query's rotary embedding computed once, not
      once per cached key;
    - a fresh `StaticCache` for every generation, as HF's own static-cache
      examples pass one (the graphs depend on its shapes only: no recompile
      across generations).

    Two graphs, with static shapes (``dynamic=False``, as HF's own
    `CompileConfig`): the prompt's and the one-token step's.
    """

    def __init__(self, model, prompt, decode: int, cpp_wrapper: bool = False):
        import torch
        self.model, self.prompt, self.decode = model, prompt, decode
        # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns).
        cache_kwarg = ("cache" if "cache" in inspect.signature(type(model).forward).parameters
                       else "past_key_values")
        model.set_attn_implementation("eager")

        def greedy_step(ids, positions, cache):
            """The next token [batch, 1] after `ids` at `positions`, `cache` updated."""
            out = model(input_ids=ids, cache_position=positions, use_cache=True,
                        logits_to_keep=1, **{cache_kwarg: cache})
            return out.logits[:, -1].argmax(-1, keepdim=True)
        # cpp_wrapper (the "compile-cpp" row): the step's generated kernels called
        # from C++ (our op still through Python: it has no C shim); twice the
        # compile time and not faster here (DEFAULT_PATHS), so the default row
        # keeps inductor's default.
        self.step = torch.compile(greedy_step, fullgraph=True, dynamic=False,
                                  options={"realize_opcount_threshold": ROPE_REALIZE_OPCOUNT,
                                           "cpp_wrapper": cpp_wrapper})

    def __call__(self) -> Timing:
        import torch
        from transformers import StaticCache
        n = self.prompt.shape[1]
        cache = StaticCache(config=self.model.config, max_cache_len=n + self.decode)
        ids = torch.from_numpy(self.prompt)
        with torch.no_grad():
            start = time.perf_counter()
            token = self.step(ids, torch.arange(n), cache)
            first = time.perf_counter()
            tokens = [token]
            for position in range(n, n + self.decode - 1):
                token = self.step(token, torch.tensor([position]), cache)
                tokens.append(token)
            end = time.perf_counter()
        return Timing(first - start, (end - first) / (self.decode - 1),
                      torch.cat(tokens, 1).numpy())


class NnxGenerator:
    """The Flax NNX decoder (`xla_qops_app.jax_llama`): one jitted prefill, one
    jitted decode step, the cache donated."""

    def __init__(self, model, prompt, decode: int):
        from xla_qops_app import jax_llama
        self.generator = jax_llama.Generator(model)
        self.prompt, self.decode = prompt, decode

    def __call__(self) -> Timing:
        stamps = []
        start = time.perf_counter()
        tokens = self.generator.generate(self.prompt, self.decode,
                                         on_token=lambda i: stamps.append(time.perf_counter()))
        return Timing(stamps[0] - start, (stamps[-1] - stamps[0]) / (self.decode - 1), tokens)


def nnx_model(base, variant: Variant):
    """The NNX decoder with `base`'s weights, quantized as `variant` says."""
    from xla_qops_app import jax_llama
    dtype = str(base.get_input_embeddings().weight.dtype).split(".")[-1]  # the torch model's
    model = jax_llama.from_tensors(base.config, base.state_dict(), dtype=dtype)
    if variant.kind == "xla_qops":
        jax_llama.quantize(model, scheme=variant.scheme, block_size=variant.block_size,
                           symmetric=variant.symmetric, lm_head=variant.lm_head)
    return model


def prepare(base, variant: Variant, prompt, decode: int):
    """(weight bytes one decode step reads, generator) of `variant` of `base`."""
    if variant.kind == "llama_cpp":
        from xla_qops_app.bench import llama_cpp
        path = llama_cpp.gguf_files(base)[variant.scheme]
        gen = llama_cpp.Generator(path, prompt, decode, base.config.vocab_size)
        return llama_cpp.step_bytes(path), lambda: Timing(*gen())
    if variant.path == "nnx":
        from xla_qops_app import jax_llama
        model = nnx_model(base, variant)
        return jax_llama.step_bytes(model), NnxGenerator(model, prompt, decode)
    model = make_variant(base, variant)
    if variant.path in COMPILED_PATHS:
        return step_bytes(model), CompiledGenerator(model, prompt, decode,
                                                    cpp_wrapper=variant.path == "compile-cpp")
    cls = JaxGenerator if variant.path == "jax" else EagerGenerator
    return step_bytes(model), cls(model, prompt, decode)


# ---------------------------------------------------------------------------
# The run

def read_bandwidth_step(nbytes: int):
    """A multithreaded torch sum over `nbytes`: the read bandwidth of the moment."""
    import torch
    a = torch.ones(max(1, nbytes // 4), dtype=torch.float32)

    def step():
        t = time.perf_counter()
        a.sum()
        return a.numel() * 4 / (time.perf_counter() - t) / 1e9
    return step


@dataclasses.dataclass
class Result:
    variant: Variant
    batch: int
    step_bytes: int
    prefill_tok_s: float  # batch * prompt / median prefill time
    decode_tok_s: float   # batch / median decode step time
    read_bw: float  # GB/s, median over the same turns
    # Per generation, in turn order (the spread, and ratios paired by turn):
    prefill_runs: list = dataclasses.field(default_factory=list)  # tok/s
    decode_runs: list = dataclasses.field(default_factory=list)   # tok/s
    # The path group whose turns timed it: its own path, or "jax" for an eager
    # peer timed again alongside the JAX rows (`measure`'s companions).
    timed_with: str = ""

    @property
    def floor_s(self) -> float:
        """The fastest a decode step can be: its weight bytes at the read bandwidth."""
        return self.step_bytes / (self.read_bw * 1e9)

    @property
    def floor_share(self) -> float:
        return self.floor_s / (self.batch / self.decode_tok_s)

    @property
    def companion(self) -> bool:
        """An eager peer timed in another path's turns (not a row of its own)."""
        return bool(self.timed_with) and self.timed_with != self.variant.group


def companions(rows, path: str) -> list[Variant]:
    """The eager peers among `rows` that the rows of `path` are compared with
    (bf16, and the int4 peers with the same lm_head coverage): timed again in
    that path's turns, so that every ratio comes from the same turns."""
    if path == "eager":
        return []
    heads = {v.lm_head for v in rows if v.group == path and v.kind == "xla_qops"}
    return [v for v in rows if v.path == "eager" and v.kind != "xla_qops"
            and (v.kind == "bf16" or v.lm_head in heads)]


def measure(base, rows, *, batch: int, prefill: int, decode: int, reps: int,
            slow_reps: int = 1, seed: int = 0, log=print,
            failed: dict | None = None) -> list[Result]:
    """Times every variant in `rows` on one prompt.

    The variants of one path take turns within every repetition, with a read of
    the largest variant's bytes in each turn for the bandwidth of the same
    moments; the eager rows run as one group and the JAX rows as another
    (XLA's and torch's worker threads each linger after their turn and would
    tax the next path's turn). The eager peers the JAX rows are compared with
    (`companions`) take turns in the JAX group too, so every ratio is between
    generations of the same turns; llama.cpp and the compiled torch step take
    turns in the NNX group (`Variant.group`). JAX and NNX bf16, slow on
    XLA:CPU, run `slow_reps` times.

    A row that cannot be built or warmed up (llama.cpp not installed, a
    compilation error) is left out with its error in `failed` {name: error}
    when a dict is given (else the error propagates).

    Returns one Result per row measured, in `rows`' order, then the
    companions' (their `timed_with` names the group that timed them)."""
    import gc
    prompt = np.random.default_rng(seed).integers(
        3, base.config.vocab_size, (batch, prefill)).astype(np.int64)
    results, extra = {}, []
    for path in dict.fromkeys(v.group for v in rows):
        group = [v for v in rows if v.group == path] + companions(rows, path)
        gens, nbytes = {}, {}
        for v in group:
            try:
                nbytes[v], gen = prepare(base, v, prompt, decode)
                t = time.perf_counter()
                gen()  # warm-up: compilation, first touch of the weights, threads
            except Exception as e:  # noqa: BLE001  reported, the other rows go on
                if failed is None:
                    raise
                failed[v.name] = f"{type(e).__name__}: {e}"[:500]
                log(f"  FAILED {v.name} (batch {batch}): {failed[v.name]}")
                continue
            gens[v] = gen
            log(f"  ready {v.name} (batch {batch}; warm-up {time.perf_counter() - t:.1f} s)")
            gc.collect()
        group = [v for v in group if v in gens]
        if not group:
            continue
        read = read_bandwidth_step(max(nbytes.values()))
        timings = {v: [] for v in group}
        bandwidths = []
        for rep in range(reps):
            for v in group:
                if v.path in ("jax", "nnx") and v.kind == "bf16" and rep >= slow_reps:
                    continue
                timings[v].append(gens[v]())
                bandwidths.append(read())
        read_bw = statistics.median(bandwidths)
        for v in group:
            prefill_s = statistics.median(t.prefill_s for t in timings[v])
            step_s = statistics.median(t.step_s for t in timings[v])
            r = Result(v, batch, nbytes[v], batch * prefill / prefill_s, batch / step_s, read_bw,
                       [batch * prefill / t.prefill_s for t in timings[v]],
                       [batch / t.step_s for t in timings[v]], path)
            if v.group == path:
                results[v] = r
            else:
                extra.append(r)
        del gens
        gc.collect()
    return [results[v] for v in rows if v in results] + extra


# ---------------------------------------------------------------------------
# The torch_xla device

@dataclasses.dataclass
class XlaDeviceResult:
    variant: Variant
    compiles_first: int   # XLA compilations during the first generate
    first_s: float
    compiles_repeat: int  # ... during a second, identical generate
    repeat_s: float
    decode_tok_s: float   # the repeat's decode steps
    same_tokens: bool     # the tokens of the same model on torch CPU tensors


def _compilations() -> int:
    import torch_xla.debug.metrics as met
    data = met.metric_data("CompileTime")
    return 0 if data is None else data[0]


def measure_xla_device(base, rows, *, prefill: int, decode: int, seed: int = 0,
                       log=print) -> list[XlaDeviceResult]:
    """Each variant generating on the torch_xla device with a static cache
    (`cache_implementation="static"`), twice, after the same generation on CPU
    tensors: compilations and times of both runs, and whether the tokens match."""
    import torch
    import torch_xla
    device = torch_xla.device()
    prompt = torch.from_numpy(np.random.default_rng(seed).integers(
        3, base.config.vocab_size, (1, prefill)).astype(np.int64))
    kwargs = dict(max_new_tokens=decode, min_new_tokens=decode, do_sample=False,
                  pad_token_id=0, cache_implementation="static")
    results = []
    for v in rows:
        model = make_variant(base, v)
        on_xla = copy.deepcopy(model).to(device)  # before generate caches a CPU StaticCache
        with torch.no_grad():
            expected = model.generate(prompt, **kwargs)
            runs = []
            for _ in range(2):
                stamps = []
                from transformers import LogitsProcessor, LogitsProcessorList

                class Stamp(LogitsProcessor):
                    def __call__(self, input_ids, scores):
                        stamps.append(time.perf_counter())
                        return scores
                before, start = _compilations(), time.perf_counter()
                out = on_xla.generate(prompt.to(device), **kwargs,
                                      logits_processor=LogitsProcessorList([Stamp()])).cpu()
                runs.append((_compilations() - before, time.perf_counter() - start,
                             (stamps[-1] - stamps[0]) / (len(stamps) - 1), out))
        (c1, t1, _, out1), (c2, t2, step, out2) = runs
        results.append(XlaDeviceResult(v, c1, t1, c2, t2, 1 / step,
                                       torch.equal(out1, expected) and torch.equal(out2, expected)))
        log(f"  torch_xla {v.name}: {c1} compilations in {t1:.1f} s, then {c2} in {t2:.1f} s")
        del model, on_xla
    return results
