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

from xla_qops.bench import decoder, decoder_report

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
