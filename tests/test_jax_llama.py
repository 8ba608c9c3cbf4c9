"""The Flax NNX Llama decoder of the benchmarks and the demo (xla_qops_app/jax_llama.py).

On a tiny config: the float model against transformers' own (logits and
greedy tokens; needs torch), the quantized model against a float64 numpy
Llama whose Linear layers are `numpy_reference.quantized_matmul` of the very
weights the model holds, loading a quantized checkpoint, and one compilation
of the decode step over a whole generation.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from xla_qops_app import jax_llama

CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=2, vocab_size=256, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False)
IDS = np.random.default_rng(1).integers(0, 256, (2, 7))


def _tensors(seed=0):
    """HF-named float32 weights of CONFIG's model (Linear weights [out, in])."""
    rng = np.random.default_rng(seed)
    h, m, d = CONFIG["hidden_size"], CONFIG["intermediate_size"], 16
    kv = CONFIG["num_key_value_heads"] * d
    w = lambda *shape: (rng.standard_normal(shape) * 0.08).astype(np.float32)
    norm = lambda: (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    t = {"model.embed_tokens.weight": w(256, h), "model.norm.weight": norm(),
         "lm_head.weight": w(256, h)}
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                  p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
                  p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
                  p + "mlp.gate_proj.weight": w(m, h), p + "mlp.up_proj.weight": w(m, h),
                  p + "mlp.down_proj.weight": w(h, m)})
    return t


def _reference_logits(tensors, ids, linear):
    """Last-position logits [b, vocab] of a float64 numpy Llama (HF's formulas);
    ``linear(name, x)`` is each Linear layer's product, float64."""
    c = CONFIG
    heads, kv_heads, d = c["num_attention_heads"], c["num_key_value_heads"], 16
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    norm = lambda x, w: w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c["rms_norm_eps"])
    b, n = ids.shape
    inv_freq = c["rope_theta"] ** -(np.arange(0, d, 2) / d)
    angles = np.arange(n)[:, None] * inv_freq[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    rope = lambda x: x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin
    causal = np.tril(np.ones((n, n), bool))
    x = t["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])
        split = lambda y, k: y.reshape(b, n, k, d).transpose(0, 2, 1, 3)
        q = rope(split(linear(p + "self_attn.q_proj", h), heads))
        k = np.repeat(rope(split(linear(p + "self_attn.k_proj", h), kv_heads)), heads // kv_heads, 1)
        v = np.repeat(split(linear(p + "self_attn.v_proj", h), kv_heads), heads // kv_heads, 1)
        scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / math.sqrt(d), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, heads * d)
        x = x + linear(p + "self_attn.o_proj", attn)
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        gate = linear(p + "mlp.gate_proj", h)
        x = x + linear(p + "mlp.down_proj", gate / (1 + np.exp(-gate)) * linear(p + "mlp.up_proj", h))
    return linear("lm_head", norm(x, t["model.norm.weight"]))[:, -1]


def _module(model, hf_name):
    parent, attr = jax_llama._module_at(model, hf_name)
    return getattr(parent, attr)


def test_float_model_is_the_float64_llama():
    tensors = _tensors()
    model = jax_llama.from_tensors(CONFIG, tensors, dtype=jnp.float32)
    got = jax_llama.Generator(model).logits(IDS)
    want = _reference_logits(tensors, IDS, lambda name, x: x @ tensors[f"{name}.weight"].T.astype(np.float64))
    # float32 arithmetic through two layers against float64: relative ~1e-6.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("scheme, block_size, symmetric", [
    ("w4a16", 32, True), ("w8a16", -1, False), ("w4a8", 32, True)])
def test_quantized_model_is_the_float64_llama_of_its_quantized_weights(scheme, block_size,
                                                                       symmetric):
    tensors = _tensors()
    model = jax_llama.quantize(jax_llama.from_tensors(CONFIG, tensors, dtype=jnp.float32),
                               scheme=scheme, block_size=block_size, symmetric=symmetric)
    weights = jax_llama.quantized_weights(model)  # q/k/v and gate/up split back
    assert list(weights) == jax_llama._hf_linear_names(model.dims)  # lm_head too

    def linear(name, x):
        qw = weights[name]
        return ref.quantized_matmul(x, np.asarray(qw.w), np.asarray(qw.scale),
                                    None if qw.zero_point is None else np.asarray(qw.zero_point),
                                    qw.block_size, qw.bits == 4, scheme.endswith("a8"))
    got = jax_llama.Generator(model).logits(IDS)
    want = _reference_logits(tensors, IDS, linear)
    # A16: float32 activations times the exact dequantized weights; the host
    # kernels' float32 path keeps ~1e-6 relative, so 1e-4 of the largest logit.
    # A8: the model quantizes float32 activations that differ from the float64
    # reference's by ~1e-6 relative, which can move a value across an int8
    # rounding boundary: one step of 1/127 of a token's absmax in one input,
    # weighted by one weight (|w| < 0.4), ~3e-3 of the logits' scale at most.
    tol = 1e-4 if scheme.endswith("a16") else 3e-3
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    float_logits = jax_llama.Generator(jax_llama.from_tensors(CONFIG, tensors,
                                                              dtype=jnp.float32)).logits(IDS)
    assert np.abs(got - float_logits).max() > tol * np.abs(want).max()  # it is quantized


def test_lm_head_stays_float_when_asked():
    model = jax_llama.quantize(jax_llama.from_tensors(CONFIG, _tensors()), scheme="w4a16",
                               block_size=32, lm_head=False)
    assert not hasattr(model.lm_head, "quantized_weight")
    assert "model.layers.0.mlp.up_proj" in jax_llama.quantized_weights(model)


def test_quantized_checkpoint_loads_into_the_same_model(tmp_path):
    from xla_qops import checkpoint
    tensors = _tensors()
    model = jax_llama.quantize(jax_llama.from_tensors(CONFIG, tensors, dtype=jnp.float32),
                               scheme="w4a8", block_size=32)
    weights = jax_llama.quantized_weights(model)
    rest = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in weights}
    path = str(tmp_path / "model.safetensors")
    checkpoint.save_quantized(path, weights, rest, quantize_activation=True)
    loaded = jax_llama.load(path, config=CONFIG, dtype=jnp.float32)
    np.testing.assert_array_equal(jax_llama.Generator(loaded).logits(IDS),
                                  jax_llama.Generator(model).logits(IDS))


@pytest.mark.parametrize("scheme, block_size, symmetric, bias", [
    ("w4a16", 32, False, False), ("w8a16", -1, True, True), ("w4a8", 32, True, False)])
def test_fused_projections_compute_what_the_separate_layers_did(scheme, block_size, symmetric,
                                                                bias):
    """q/k/v and gate/up joined into one kernel call each: the same weights
    (split back exactly), and bit-identical logits and greedy tokens."""
    tensors, config = _tensors(), CONFIG
    if bias:  # attention_bias / mlp_bias models: the biases join too
        rng = np.random.default_rng(3)
        tensors.update({f"{name}.bias": rng.standard_normal(len(tensors[f"{name}.weight"]))
                        .astype(np.float32) * 0.1
                        for name in jax_llama._hf_linear_names(jax_llama.LlamaDims.of(CONFIG))
                        if name != "lm_head"})
        config = dict(CONFIG, attention_bias=True, mlp_bias=True)
    make = lambda fuse: jax_llama.quantize(
        jax_llama.from_tensors(config, tensors, dtype=jnp.float32), scheme=scheme,
        block_size=block_size, symmetric=symmetric, fuse=fuse)
    fused, separate = make(True), make(False)
    for layer in fused.layers:
        assert layer.self_attn.q_proj is None and layer.mlp.up_proj is None
        assert layer.self_attn.qkv_proj.fused_sizes == (64, 32, 32)
        assert layer.mlp.gate_up_proj.fused_sizes == (128, 128)
    got, want = jax_llama.quantized_weights(fused), jax_llama.quantized_weights(separate)
    assert list(got) == list(want) == jax_llama._hf_linear_names(fused.dims)
    for name in want:
        for field in ("w", "scale", "zero_point"):
            a, b = getattr(got[name], field), getattr(want[name], field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    # Each output column has its own scale and the kernels' arithmetic for a
    # column depends on K and the rows only, not on N: exact equality.
    fused_gen, separate_gen = jax_llama.Generator(fused), jax_llama.Generator(separate)
    np.testing.assert_array_equal(fused_gen.logits(IDS), separate_gen.logits(IDS))
    np.testing.assert_array_equal(fused_gen.generate(IDS, 5), separate_gen.generate(IDS, 5))


def test_layers_of_different_schemes_are_not_fused():
    model = jax_llama.from_tensors(CONFIG, _tensors())
    jax_llama.quantize(model, scheme="w4a16", block_size=32, fuse=False)
    # One member re-quantized per channel: q/k/v no longer share a kernel call.
    from xla_qops.nnx import quantize_model
    model.layers[0].self_attn.k_proj = None
    float_k = jax_llama.from_tensors(CONFIG, _tensors()).layers[0].self_attn.k_proj
    model.layers[0].self_attn.k_proj = float_k
    quantize_model(model, scheme="w8a16", filter_fn=lambda path, m: "layers/0/self_attn/k_proj" in path)
    jax_llama.fuse_projections(model)
    assert model.layers[0].self_attn.qkv_proj is None
    assert model.layers[0].self_attn.k_proj.bits == 8
    assert model.layers[0].mlp.gate_up_proj is not None  # the rest still fused
    assert model.layers[1].self_attn.qkv_proj is not None
    assert jax_llama.Generator(model).generate(IDS, 3).shape == (2, 3)


def test_generate_is_greedy_prefill_of_the_growing_sequence():
    """The decode step (cache written in place, position carried on device)
    picks the tokens a prefill of the whole sequence so far picks."""
    model = jax_llama.from_tensors(CONFIG, _tensors(), dtype=jnp.float32)
    generator = jax_llama.Generator(model)
    tokens = generator.generate(IDS, 5)
    ids = IDS
    for i in range(5):
        want = generator.logits(ids).argmax(-1)
        np.testing.assert_array_equal(tokens[:, i], want)
        ids = np.concatenate([ids, want[:, None]], 1)


def test_missing_or_extra_tensors_are_named():
    tensors = _tensors()
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        jax_llama.from_tensors(CONFIG, tensors)
    tensors = dict(_tensors(), **{"model.layers.2.mlp.up_proj.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="model.layers.2.mlp.up_proj.weight"):
        jax_llama.from_tensors(CONFIG, tensors)
    with pytest.raises(ValueError, match=r"rope_scaling: expected .* got 'yarn'"):
        jax_llama.rope_frequencies(jax_llama.LlamaDims.of(
            dict(CONFIG, rope_scaling=dict(rope_type="yarn", factor=2.0))))


def test_decode_step_compiles_once_and_the_step_bytes_shrink():
    model = jax_llama.quantize(jax_llama.from_tensors(CONFIG, _tensors()), scheme="w4a16",
                               block_size=32)
    generator = jax_llama.Generator(model)
    tokens = generator.generate(IDS, 6)
    assert tokens.shape == (2, 6) and tokens.dtype == np.int32
    assert generator.step._cache_size() == 1 and generator.prefill._cache_size() == 1
    again = generator.generate(IDS, 6)  # same shapes: nothing new to compile
    np.testing.assert_array_equal(again, tokens)
    assert generator.step._cache_size() == 1
    bf16 = jax_llama.step_bytes(jax_llama.from_tensors(CONFIG, _tensors()))
    # int4 weights + float32 scales of 32-blocks: 0.25 + 4/32/2 of bf16's bytes, plus norms.
    assert jax_llama.step_bytes(model) < 0.4 * bf16


@pytest.mark.torch
def test_float_logits_and_greedy_tokens_match_transformers(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    # llama3 rope scaling and grouped-query attention, as Llama 3 checkpoints have.
    config = LlamaConfig(**dict(CONFIG, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)))
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors, float32
    model = jax_llama.load(str(tmp_path), dtype=jnp.float32)
    generator = jax_llama.Generator(model)
    ids = torch.from_numpy(IDS)
    with torch.no_grad():
        want = hf(ids).logits[:, -1].numpy()
        want_tokens = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                  pad_token_id=0)[:, IDS.shape[1]:].numpy()
    got = generator.logits(IDS)
    cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_array_equal(generator.generate(IDS, 10), want_tokens)
