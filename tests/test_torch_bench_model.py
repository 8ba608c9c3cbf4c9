"""The end-to-end decoder benchmark's machinery on a tiny decoder.

`xla-qops bench --model llama` runs for many minutes on TinyLlama's
dimensions; here every kind of variant (bf16, torch's int4 kernel, torchao,
xla-qops on CPU tensors and through torchax/JAX) generates on a tiny Llama so
that the code the benchmark runs stays working: each generates the requested
number of tokens, the quantized variants read fewer weight bytes per step, the
eager and JAX paths of one quantized model agree on the tokens (same weights,
same kernels; a tiny model in float32 has no near-ties here), and the report
renders its tables and targets.
"""

import copy

import numpy as np
import pytest

from xla_qops_app.bench import decoder, decoder_report

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
            tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base():
    return decoder.build_model(1, dims=DIMS)


def test_every_kind_of_variant_generates(base):
    V = decoder.Variant
    rows = [V("bf16"), V("torch_int4", lm_head=True),
            V("xla_qops", "eager", "w4a16", 128, False, True),
            V("xla_qops", "eager", "w8a8", -1, True, False),
            V("xla_qops", "jax", "w4a16", 128, False, True)]
    if decoder.torchao_available() is None:
        rows.append(V("torchao_int4", lm_head=True))
    results = decoder.measure(base, rows, batch=2, prefill=8, decode=4, reps=1,
                              log=lambda *a: None)
    by = {r.variant: r for r in results}
    for r in results:
        assert r.decode_tok_s > 0 and r.prefill_tok_s > 0 and r.read_bw > 0
        assert 0 < r.floor_share
    bf16 = by[rows[0]].step_bytes
    assert by[rows[2]].step_bytes < bf16 / 3  # int4 with lm_head: < 1/3 of bf16
    assert by[rows[1]].step_bytes < bf16 / 3
    text = decoder_report.table(results, 2)
    assert text.count("\n") == len(rows) + 1 and "xla-qops W4A16 g128 asym +lm_head" in text


def test_eager_and_jax_paths_generate_the_same_tokens(base):
    prompt = np.random.default_rng(0).integers(3, 512, (1, 6)).astype(np.int64)
    v = decoder.Variant("xla_qops", "eager", "w4a16", 128, True, True)
    model = decoder.make_variant(copy.deepcopy(base).float(), v)
    eager = decoder.EagerGenerator(model, prompt, 5)()
    jax_run = decoder.JaxGenerator(model, prompt, 5)()
    assert eager.tokens.shape == jax_run.tokens.shape == (1, 5)
    np.testing.assert_array_equal(eager.tokens, jax_run.tokens)


def test_jax_path_keeps_a_bfloat16_model_in_bfloat16(base, monkeypatch):
    # torchax 0.0.7's attention returns float32 for bfloat16 inputs; the JAX
    # path's registration casts it back, so every quantized Linear sees the
    # bfloat16 activations eager torch gives it (and A16 runs its bf16 form).
    import xla_qops
    seen = []
    real = xla_qops.quantized_matmul

    def spy(x, *args, **kwargs):
        seen.append(str(x.dtype))
        return real(x, *args, **kwargs)
    monkeypatch.setattr(xla_qops, "quantized_matmul", spy)
    v = decoder.Variant("xla_qops", "jax", "w4a16", 128, True, True)
    model = decoder.make_variant(base, v)  # bf16, every Linear and lm_head quantized
    prompt = np.random.default_rng(1).integers(3, 512, (2, 6)).astype(np.int64)
    decoder.JaxGenerator(model, prompt, 3)()
    assert len(seen) >= 7 and set(seen) == {"bfloat16"}


def test_jax_path_attention_matches_torch_in_bfloat16():
    import torch
    import torchax

    from torch_bridge import torchax_ops
    torchax_ops.register_with_torchax()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g).bfloat16() for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    env = torchax.tensor.Environment()
    with env:
        got = torch.nn.functional.scaled_dot_product_attention(
            *(t.to("jax") for t in (q, k, v)), is_causal=True)
        dtype, got = got.dtype, got.float().to("cpu")
    assert dtype == torch.bfloat16
    # Both round a float32 computation to bfloat16 once: at most 1 ulp apart
    # (2**-7 relative) where the float32 results straddle a rounding point.
    np.testing.assert_allclose(got.numpy(), want.float().numpy(), rtol=2 ** -7, atol=2 ** -7)


def test_torch_xla_device_rows_are_the_documented_variants():
    # One child process per row (bench_model._xla_device_in_child); each
    # builds its variant from the row's index.
    from xla_qops_app.commands import bench_model
    names = [bench_model.xla_device_row(i).name for i in range(len(bench_model.XLA_DEVICE_ROWS))]
    assert names == ["bf16 torch [xla]", "xla-qops W4A16 g128 +lm_head [xla]",
                     "xla-qops W8A16 pc +lm_head [xla]"]
