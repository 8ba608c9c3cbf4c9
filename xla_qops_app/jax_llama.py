"""A Llama-architecture decoder in Flax NNX, jitted the fast way.

Written here from a transformers ``LlamaConfig`` (or its ``config.json`` as a
dict): token embeddings, RMSNorm, rotary position embeddings (the config's
``rope_scaling`` of type default, linear or llama3), grouped-query attention
over a static KV cache, a SwiGLU MLP, and ``lm_head`` (or the tied
embeddings). It loads HF safetensors -- float, and every checkpoint
`xla_qops.checkpoint.load_quantized` reads -- and generates greedily with one
jitted prefill and one jitted decode step whose cache is donated and updated
in place.

The fast form (issue 28 section 3): the model is split into its graph and its
state once, and `jax.jit` runs ``nnx.merge(graph, state)`` inside the traced
function. `nnx.jit` with the module as an argument re-walks the module graph
on every call, which costs more than the decode step's kernels do.

Numerics follow transformers' ``LlamaForCausalLM`` (eager attention): RMSNorm
in float32, rotary tables in float32 cast to the activations' dtype, attention
scores and softmax in float32.

This is an application-floor model for the benchmarks and the demo, not part
of the `xla_qops` API.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


# ---------------------------------------------------------------------------
# Configuration

@dataclasses.dataclass(frozen=True)
class LlamaDims:
    """What the decoder needs from a transformers ``LlamaConfig`` / config.json."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs, hashable
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def of(cls, config) -> "LlamaDims":
        """From a transformers config object or a config.json dict."""
        get = (config.get if isinstance(config, Mapping)
               else lambda k, d=None: getattr(config, k, d))
        heads = get("num_attention_heads")
        scaling = get("rope_scaling")
        theta = get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
        return cls(hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                   num_attention_heads=heads,
                   num_key_value_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads,
                   num_hidden_layers=get("num_hidden_layers"), vocab_size=get("vocab_size"),
                   rms_norm_eps=float(get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                   rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                   attention_bias=bool(get("attention_bias", False)),
                   mlp_bias=bool(get("mlp_bias", False)))


def rope_frequencies(dims: LlamaDims) -> np.ndarray:
    """The rotary inverse frequencies [head_dim / 2] (float32), with the config's
    rope scaling as transformers computes it (`_compute_default_rope_parameters`,
    `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`)."""
    d = dims.head_dim
    inv_freq = 1.0 / dims.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d)
    scaling = dict(dims.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.astype(np.float32)
    if kind == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_scaling: expected rope_type 'default', 'linear' or 'llama3', "
                     f"got {kind!r} ({scaling})")


# ---------------------------------------------------------------------------
# Modules

class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
        return self.weight.value * xf.astype(x.dtype)


def _rotate(x, cos, sin):
    """HF's ``q * cos + rotate_half(q) * sin`` (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _linear(n_in, n_out, bias, dtype, rngs):
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, dims: LlamaDims, dtype, rngs):
        h, d, kv = dims.hidden_size, dims.head_dim, dims.num_key_value_heads
        self.heads, self.kv_heads, self.head_dim = dims.num_attention_heads, kv, d
        self.q_proj = _linear(h, self.heads * d, dims.attention_bias, dtype, rngs)
        self.k_proj = _linear(h, kv * d, dims.attention_bias, dtype, rngs)
        self.v_proj = _linear(h, kv * d, dims.attention_bias, dtype, rngs)
        self.o_proj = _linear(self.heads * d, h, dims.attention_bias, dtype, rngs)
        self.qkv_proj = nnx.data(None)  # q/k/v as one quantized matmul (`fuse_projections`)

    def __call__(self, x, cos, sin, keys, values, start, mask):
        b, t, _ = x.shape
        heads = lambda y, n: y.reshape(b, t, n, self.head_dim).transpose(0, 2, 1, 3)
        q, k, v = _projections(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"), x)
        q = _rotate(heads(q, self.heads), cos, sin)
        k = _rotate(heads(k, self.kv_heads), cos, sin)
        v = heads(v, self.kv_heads)
        # The static cache [b, kv_heads, max_len, head_dim], written at `start`.
        # (XLA:CPU copies each donated cache once a step here, as it fuses the
        # write into both the bf16 result and the float32 reads below: ~0.1 ms
        # of a TinyLlama step at 192 positions; docs/profile_nnx_decode.md.)
        at = (0, 0, start, 0)
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), at)
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), at)
        group = self.heads // self.kv_heads  # query heads per KV head
        q = q.reshape(b, self.kv_heads, group, t, self.head_dim)
        # Scores in float32 from float32 operands: XLA:CPU's dot has no
        # bf16 x bf16 -> f32 form.
        scores = jnp.einsum("bkgtd,bksd->bkgts", q.astype(jnp.float32),
                            keys.astype(jnp.float32)) / math.sqrt(self.head_dim)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, -1).astype(x.dtype)
        out = jnp.einsum("bkgts,bksd->bkgtd", probs, values.astype(x.dtype))
        out = out.reshape(b, self.heads, t, self.head_dim).transpose(0, 2, 1, 3)
        return self.o_proj(out.reshape(b, t, -1)), keys, values


class MLP(nnx.Module):
    def __init__(self, dims: LlamaDims, dtype, rngs):
        h, m, bias = dims.hidden_size, dims.intermediate_size, dims.mlp_bias
        self.gate_proj = _linear(h, m, bias, dtype, rngs)
        self.up_proj = _linear(h, m, bias, dtype, rngs)
        self.down_proj = _linear(m, h, bias, dtype, rngs)
        self.gate_up_proj = nnx.data(None)  # gate/up as one quantized matmul (`fuse_projections`)

    def __call__(self, x):
        gate, up = _projections(self, "gate_up_proj", ("gate_proj", "up_proj"), x)
        return self.down_proj(jax.nn.silu(gate) * up)


def _projections(module, fused: str, names: tuple, x) -> list:
    """Each of `names`' products with x: from the fused layer split along its
    outputs when `fuse_projections` made one, else from each layer."""
    layer = getattr(module, fused)
    if layer is None:
        return [getattr(module, name)(x) for name in names]
    return jnp.split(layer(x), np.cumsum(layer.fused_sizes)[:-1].tolist(), -1)


class DecoderLayer(nnx.Module):
    def __init__(self, dims: LlamaDims, dtype, rngs):
        self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, dtype)
        self.self_attn = Attention(dims, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, dtype)
        self.mlp = MLP(dims, dtype, rngs)

    def __call__(self, x, cos, sin, keys, values, start, mask):
        h, keys, values = self.self_attn(self.input_layernorm(x), cos, sin, keys, values,
                                         start, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), keys, values


class LlamaForCausalLM(nnx.Module):
    """``(ids [b, t], start, cache) -> (logits [b, t, vocab], cache)``.

    `start` is the position of ``ids[:, 0]`` (a traced int32 scalar, so every
    decode step has the same signature); `cache` is ``(keys, values)``, a list
    of ``[b, kv_heads, max_len, head_dim]`` arrays each (`empty_cache`).
    Attribute names are HF's, so checkpoint names map one to one.
    """

    def __init__(self, config, *, dtype=jnp.bfloat16, rngs: Optional[nnx.Rngs] = None):
        dims = LlamaDims.of(config)
        rngs = rngs or nnx.Rngs(0)
        self.dims, self.dtype = dims, jnp.dtype(dtype)
        self.embed_tokens = nnx.Embed(dims.vocab_size, dims.hidden_size, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(dims, dtype, rngs)
                                for _ in range(dims.num_hidden_layers)])
        self.norm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, dtype)
        self.lm_head = (None if dims.tie_word_embeddings
                        else _linear(dims.hidden_size, dims.vocab_size, False, dtype, rngs))
        self.inv_freq = nnx.Variable(jnp.asarray(rope_frequencies(dims)))

    def empty_cache(self, batch: int, max_len: int):
        d = self.dims
        shape = (batch, d.num_key_value_heads, max_len, d.head_dim)
        zeros = lambda: [jnp.zeros(shape, self.dtype) for _ in range(d.num_hidden_layers)]
        return zeros(), zeros()

    def __call__(self, ids, start, cache, *, last_only: bool = False):
        keys, values = cache
        t, max_len = ids.shape[1], keys[0].shape[2]
        positions = start + jnp.arange(t, dtype=jnp.int32)
        freqs = positions[:, None].astype(jnp.float32) * self.inv_freq.value[None, :]
        angles = jnp.concatenate([freqs, freqs], -1)
        x = self.embed_tokens(ids)
        cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
        # Causal over the whole cache: a query attends to every key at or
        # before its position (later slots are not written yet).
        mask = jnp.arange(max_len)[None, :] <= positions[:, None]
        new_keys, new_values = [], []
        for layer, k, v in zip(self.layers, keys, values):
            x, k, v = layer(x, cos, sin, k, v, start, mask)
            new_keys.append(k)
            new_values.append(v)
        if last_only:  # generation needs the last position's logits only
            x = x[:, -1:]
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits, (new_keys, new_values)


# ---------------------------------------------------------------------------
# Loading HF checkpoints

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _hf_linear_names(dims: LlamaDims) -> list[str]:
    names = [f"model.layers.{i}.{n}" for i in range(dims.num_hidden_layers) for n in LINEARS]
    return names + ([] if dims.tie_word_embeddings else ["lm_head"])


def _module_at(model, hf_name: str):
    """(parent module, attribute) of an HF module name ("model.layers.3.mlp.up_proj")."""
    parts = hf_name.removeprefix("model.").split(".")
    parent = model
    for p in parts[:-1]:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    return parent, parts[-1]


def _set(variable, array, name, dtype):
    array = np.asarray(array)
    if tuple(array.shape) != tuple(variable.value.shape):
        raise ValueError(f"{name}: expected shape {tuple(variable.value.shape)}, "
                         f"got {tuple(array.shape)}")
    variable.value = jnp.asarray(array, dtype)


def _read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file or of a directory's *.safetensors."""
    from xla_qops.checkpoint import load_state_dict
    files = (sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path)
             else [path])
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors file")
    tensors = {}
    for f in files:
        tensors.update(load_state_dict(f)[0])
    return tensors


def from_tensors(config, tensors: Mapping[str, object], *, dtype=jnp.bfloat16,
                 quantized: Optional[Mapping[str, tuple]] = None,
                 fuse: bool = True) -> LlamaForCausalLM:
    """The decoder with HF-named float `tensors` (numpy or torch; Linear weights
    ``[out, in]``), and, for the Linear layers named in `quantized`, ``{name:
    (QuantizedWeight, quantize_activation, activation_format)}`` in their place
    (q/k/v and gate/up then joined if `fuse`: `fuse_projections`).
    Every tensor the model needs must be there; extra ones are an error too."""
    from xla_qops.interop._core import to_numpy
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype))
    dims, quantized = model.dims, dict(quantized or {})
    left = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}

    def take(name):
        if name not in left:
            raise KeyError(f"tensors: {name!r} missing (have {len(left)} others)")
        return to_numpy(left.pop(name), name)

    _set(model.embed_tokens.embedding, take("model.embed_tokens.weight"),
         "model.embed_tokens.weight", dtype)
    _set(model.norm.weight, take("model.norm.weight"), "model.norm.weight", dtype)
    for i, layer in enumerate(model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{i}.{norm}.weight"
            _set(getattr(layer, norm).weight, take(name), name, dtype)
    for name in _hf_linear_names(dims):
        parent, attr = _module_at(model, name)
        linear = getattr(parent, attr)
        bias = take(f"{name}.bias") if f"{name}.bias" in left else None
        if name in quantized:
            qw, act, act_format = quantized.pop(name)
            # torch_bridge's optional input transforms (SmoothQuant / AWQ's input scale,
            # the Hadamard rotation's block), applied by the layer as the torch module does
            scale = take(f"{name}.input_scale") if f"{name}.input_scale" in left else None
            block = (int(take(f"{name}.input_rotation").item())
                     if f"{name}.input_rotation" in left else None)
            setattr(parent, attr, quantized_linear(qw, bias, act, act_format, dtype,
                                                   input_scale=scale, input_rotation=block))
            continue
        _set(linear.kernel, take(f"{name}.weight").T, f"{name}.weight", dtype)
        if bias is not None:
            _set(linear.bias, bias, f"{name}.bias", dtype)
    model.inv_freq.value = jnp.asarray(rope_frequencies(dims))
    if left or quantized:
        raise ValueError(f"tensors: not part of a Llama model with {dims.num_hidden_layers} "
                         f"layers: {sorted(left)[:5] + sorted(quantized)[:5]}")
    return fuse_projections(model) if fuse else model


def load(path, *, dtype=jnp.bfloat16, config=None) -> LlamaForCausalLM:
    """The decoder from an HF model directory (config.json + *.safetensors, float)
    or from a quantized checkpoint `xla_qops.checkpoint.load_quantized` reads
    (this project's file, GPTQ, AWQ, compressed-tensors), with `config` (a
    transformers config or dict) when `path` has no config.json beside it."""
    from xla_qops import checkpoint
    if config is None:
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    if os.path.isdir(path) and not _quantized_dir(path) or (
            not os.path.isdir(path) and not checkpoint._is_own_file(path)):
        return from_tensors(config, _read_safetensors(path), dtype=dtype)
    ckpt = checkpoint.load_quantized(path)
    quantized = {name: (qw, ckpt.schemes[name].quantize_activation,
                        ckpt.schemes[name].activation_format)
                 for name, qw in ckpt.weights.items()}
    return from_tensors(config, ckpt.tensors, dtype=dtype, quantized=quantized)


def _quantized_dir(path) -> bool:
    """A directory whose config.json declares a quantization (GPTQ, AWQ, ...)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "quantization_config" in json.load(f)
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------
# Quantization

def quantized_linear(qw, bias, quantize_activation: bool, activation_format, dtype, *,
                     input_scale=None, input_rotation=None):
    """An NNX module computing ``x @ qw.T (+ bias)`` with `xla_qops.quantized_matmul`
    in `dtype` (`xla_qops.nnx.QuantizedLinear`; its `input_scale` / `input_rotation`
    applied to x first when given)."""
    from xla_qops.nnx import QuantizedLinear
    return QuantizedLinear.from_quantized(
        qw, bias=None if bias is None else jnp.asarray(np.asarray(bias), dtype),
        quantize_activation=quantize_activation, activation_format=activation_format,
        dtype=dtype, param_dtype=dtype, input_scale=input_scale, input_rotation=input_rotation)


def lm_head_filter(lm_head: bool) -> Callable:
    """`quantize`'s filter (``filter_fn(path, module)``): every Linear, lm_head
    only if asked."""
    return lambda path, module: lm_head or path.rsplit("/", 1)[-1] != "lm_head"


def quantize(model: LlamaForCausalLM, *, scheme: str, block_size: int = -1,
             symmetric: bool = True, lm_head: bool = True, fuse: bool = True,
             smoothing=None) -> LlamaForCausalLM:
    """Every Linear (lm_head if `lm_head`) quantized with `scheme` (and `smoothing`) by
    `xla_qops.nnx.quantize_model`, in place; then, if `fuse`, q/k/v and
    gate/up joined (`fuse_projections`)."""
    from xla_qops.nnx import quantize_model
    quantize_model(model, scheme=scheme, block_size=block_size, symmetric=symmetric,
                   filter_fn=lm_head_filter(lm_head), smoothing=smoothing)
    return fuse_projections(model) if fuse else model


# Layers that read the same input, joined into one quantized matmul: (parent,
# fused attribute, the HF-named members in output order).
FUSED = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
         ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def _out_axis(qw) -> int:
    """The output axis of every array of a QuantizedWeight (API.md section 2):
    ``[out, in]`` / ``[out]`` per channel, ``[in/B, B, out]`` / ``[in/B, out]``
    blockwise (int4 packing halves an input axis, never this one)."""
    return -1 if qw.block_size != -1 else 0


def _static_facts(layer):
    """What must agree for layers to share one kernel call."""
    scale = None if layer.input_scale is None else np.asarray(layer.input_scale[...]).tobytes()
    return (layer.bits, layer.block_size, layer.packed, layer.format,
            layer.quantize_activation, layer.activation_format, layer.dtype, layer.param_dtype,
            layer.in_features, layer.in_axis, layer.einsum_str, layer.bias is None,
            layer.zero_point is None, layer.input_rotation, scale)


def fuse_projections(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """In place: each layer's q/k/v projections, and its gate/up projections,
    joined into one quantized matmul whose weight is theirs concatenated along
    the outputs (int4 packing, scales, zero points and biases alike; each
    output column keeps its own scale, so the quantized values are the ones
    the layers held and each column is computed as before). Fewer, wider
    kernel calls: 33 instead of 57 per decode step of a Llama. Layers that do
    not share a scheme and input transforms (or are float) stay as they are."""
    from xla_qops import QuantizedWeight
    from xla_qops.nnx import QuantizedLinear
    for layer in model.layers:
        for parent_name, fused_name, names in FUSED:
            parent = getattr(layer, parent_name)
            members = [getattr(parent, n) for n in names]
            if (getattr(parent, fused_name) is not None
                    or not all(isinstance(m, QuantizedLinear) for m in members)
                    or len({_static_facts(m) for m in members}) != 1):
                continue
            weights = [m.quantized_weight for m in members]
            axis = _out_axis(weights[0])
            join = lambda arrays: jnp.concatenate(arrays, axis)
            qw = QuantizedWeight(
                w=join([q.w for q in weights]), scale=join([q.scale for q in weights]),
                zero_point=(None if weights[0].zero_point is None
                            else join([q.zero_point for q in weights])),
                bits=weights[0].bits, block_size=weights[0].block_size,
                packed=weights[0].packed, format=weights[0].format)
            first = members[0]
            bias = (None if first.bias is None
                    else jnp.concatenate([m.bias[...] for m in members], -1))
            fused = QuantizedLinear.from_quantized(
                qw, bias=bias, quantize_activation=first.quantize_activation,
                activation_format=first.activation_format, dtype=first.dtype,
                param_dtype=first.param_dtype, input_rotation=first.input_rotation,
                input_scale=None if first.input_scale is None else first.input_scale[...])
            fused.fused_sizes = tuple(m.out_features for m in members)
            setattr(parent, fused_name, fused)
            for n in names:
                setattr(parent, n, None)
    return model


def _split_weight(qw, sizes) -> list:
    """`fuse_projections`' inverse: the QuantizedWeights of `sizes` outputs each."""
    from xla_qops import QuantizedWeight
    cuts, axis = np.cumsum(sizes)[:-1].tolist(), _out_axis(qw)
    parts = [jnp.split(a, cuts, axis) if a is not None else [None] * len(sizes)
             for a in (qw.w, qw.scale, qw.zero_point)]
    return [QuantizedWeight(w=w, scale=scale, zero_point=zero_point, bits=qw.bits,
                            block_size=qw.block_size, packed=qw.packed, format=qw.format)
            for w, scale, zero_point in zip(*parts)]


def _quantized_layers(model: LlamaForCausalLM) -> dict:
    """``{HF Linear name: (QuantizedLinear, QuantizedWeight)}`` in HF order, fused
    layers split back into their members (each with the fused layer)."""
    from xla_qops.nnx import QuantizedLinear
    found = {}
    for name in _hf_linear_names(model.dims):
        parent, attr = _module_at(model, name)
        module = getattr(parent, attr)
        if isinstance(module, QuantizedLinear):
            found[name] = (module, module.quantized_weight)
    for i, layer in enumerate(model.layers):
        for parent_name, fused_name, names in FUSED:
            fused = getattr(getattr(layer, parent_name), fused_name)
            if fused is not None:
                for n, qw in zip(names, _split_weight(fused.quantized_weight, fused.fused_sizes)):
                    found[f"model.layers.{i}.{parent_name}.{n}"] = (fused, qw)
    return {name: found[name] for name in _hf_linear_names(model.dims) if name in found}


def quantized_weights(model: LlamaForCausalLM) -> dict:
    """``{HF Linear name: QuantizedWeight}`` of every quantized Linear, in HF
    order, fused ones split back into their members (to save a checkpoint,
    with `input_transforms(model)` beside them: a QuantizedWeight does not
    hold a layer's input scale or rotation)."""
    return {name: qw for name, (_, qw) in _quantized_layers(model).items()}


def input_transforms(model: LlamaForCausalLM) -> dict:
    """``{"<HF name>.input_scale": float32 [in], "<HF name>.input_rotation": int64
    scalar}`` of the quantized Linears that scale or rotate their inputs (torch_bridge's
    buffer names, which `load` reads back): save them with `quantized_weights`, or the
    loaded layers would multiply unrotated inputs by rotated weights."""
    out = {}
    for name, (module, _) in _quantized_layers(model).items():
        if module.input_scale is not None:
            out[f"{name}.input_scale"] = np.asarray(module.input_scale[...], np.float32)
        if module.input_rotation is not None:
            out[f"{name}.input_rotation"] = np.asarray(module.input_rotation, np.int64)
    return out


# ---------------------------------------------------------------------------
# Generation

class Generator:
    """Greedy generation with one jitted prefill and one jitted decode step.

    The model is split once and its state flattened once into a list of
    arrays; both functions rebuild the module inside the trace (`jax.jit`
    over the state, the fast form). A list is what jit's C++ dispatch
    flattens without calling back into Python, where an `nnx.State` costs
    its pytree walk on every call (~0.3 ms here, per token). The decode
    step takes the cache and its position donated and returns the next
    token, the cache and the next position, so a step is one call with no
    host work: no eager reshape of the token, no new position array.
    """

    def __init__(self, model: LlamaForCausalLM):
        graph, state = nnx.split(model)
        self.leaves, treedef = jax.tree.flatten(state)
        self.model = model

        def forward(leaves, cache, ids, start):
            module = nnx.merge(graph, jax.tree.unflatten(treedef, leaves))
            logits, cache = module(ids, start, cache, last_only=True)
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), logits[:, -1], cache

        def step(leaves, cache, token, position):
            token, _, cache = forward(leaves, cache, token[:, None], position)
            return token, cache, position + 1

        self.prefill = jax.jit(forward, donate_argnums=1)
        self.step = jax.jit(step, donate_argnums=(1, 3))

    def generate(self, prompt, new_tokens: int, *, on_token=None):
        """[batch, new_tokens] int32 greedy continuation of `prompt` [batch, n];
        ``on_token(i)`` is called after token i is ready (timing)."""
        prompt = jnp.asarray(prompt, jnp.int32)
        b, n = prompt.shape
        cache = self.model.empty_cache(b, n + new_tokens)
        token, _, cache = self.prefill(self.leaves, cache, prompt, jnp.int32(0))
        tokens = [token]
        if on_token:
            token.block_until_ready()
            on_token(0)
        position = jnp.int32(n)
        for _ in range(1, new_tokens):
            token, cache, position = self.step(self.leaves, cache, token, position)
            tokens.append(token)
        result = jnp.stack(tokens, 1)
        result.block_until_ready()
        if on_token:
            on_token(new_tokens - 1)
        return np.asarray(result)

    def logits(self, ids):
        """Prefill logits of the last position, [batch, vocab] (float32)."""
        ids = jnp.asarray(ids, jnp.int32)
        cache = self.model.empty_cache(ids.shape[0], ids.shape[1])
        return np.asarray(self.prefill(self.leaves, cache, ids, jnp.int32(0))[1], np.float32)


def step_bytes(model: LlamaForCausalLM) -> int:
    """Bytes one decode step reads from the weights: every array of the model's
    state but the token embeddings (one row per token) and the rotary table."""
    state = nnx.state(model)
    skip = {id(model.embed_tokens.embedding.value), id(model.inv_freq.value)}
    if model.lm_head is None:  # tied: the embeddings are the head's weight
        skip.discard(id(model.embed_tokens.embedding.value))
    return sum(a.nbytes for a in jax.tree.leaves(state) if id(a) not in skip)
