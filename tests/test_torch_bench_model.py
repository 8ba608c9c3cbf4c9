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


@pytest.mark.torchax  # the decoder bench's JAX variant runs through torchax
def test_every_kind_of_variant_generates(base):
    V = decoder.Variant
    rows = [V("bf16"), V("torch_int4", lm_head=True),
            V("xla_qops", "eager", "w4a16", 128, False, True),
            V("xla_qops", "eager", "w8a8", -1, True, False),
            V("xla_qops", "jax", "w4a16", 128, False, True)]
    if decoder.torchao_available() is None:
        rows.append(V("torchao_int4", lm_head=True))
    results = decoder.measure(base, rows, batch=2, prefill=8, decode=4, reps=2,
                              log=lambda *a: None)
    own, extra = results[:len(rows)], results[len(rows):]
    assert [r.variant for r in own] == rows and not any(r.companion for r in own)
    by = {r.variant: r for r in own}
    for r in results:
        assert r.decode_tok_s > 0 and r.prefill_tok_s > 0 and r.read_bw > 0
        assert 0 < r.floor_share and len(r.decode_runs) == len(r.prefill_runs) == 2
        assert min(r.decode_runs) <= r.decode_tok_s <= max(r.decode_runs)
    # The eager peers of the JAX row took turns with it again.
    assert {(r.variant.kind, r.timed_with) for r in extra} >= {("bf16", "jax"),
                                                              ("torch_int4", "jax")}
    assert all(r.companion and r.variant.path == "eager" for r in extra)
    bf16 = by[rows[0]].step_bytes
    assert by[rows[2]].step_bytes < bf16 / 3  # int4 with lm_head: < 1/3 of bf16
    assert by[rows[1]].step_bytes < bf16 / 3
    text = decoder_report.table(results, 2)
    assert text.count("\n") == len(rows) + 1 and "xla-qops W4A16 g128 asym +lm_head" in text


@pytest.mark.torchax  # the decoder bench's JAX variant runs through torchax
def test_eager_and_jax_paths_generate_the_same_tokens(base):
    prompt = np.random.default_rng(0).integers(3, 512, (1, 6)).astype(np.int64)
    v = decoder.Variant("xla_qops", "eager", "w4a16", 128, True, True)
    model = decoder.make_variant(copy.deepcopy(base).float(), v)
    eager = decoder.EagerGenerator(model, prompt, 5)()
    jax_run = decoder.JaxGenerator(model, prompt, 5)()
    assert eager.tokens.shape == jax_run.tokens.shape == (1, 5)
    np.testing.assert_array_equal(eager.tokens, jax_run.tokens)


def test_nnx_and_compiled_rows_generate_the_eager_tokens(base):
    """The NNX decoder and HF's compiled decode step on the same float32 weights as
    eager torch (W4A16 g128 +lm_head, the same kernels): the same greedy tokens.

    The compile row (docs/torch.md, "The compiled decode step") runs HF's eager
    attention (inductor compiles it; "sdpa" calls ATen's slow CPU flash kernel) and
    compiles exactly two graphs over three generations, the prompt's and the decode
    step's (a recompilation would land inside the benchmark's timed turns)."""
    import torch._dynamo.utils
    V = decoder.Variant
    model = copy.deepcopy(base).float()
    prompt = np.random.default_rng(0).integers(3, 512, (1, 6)).astype(np.int64)
    eager = decoder.prepare(model, V("xla_qops", "eager", "w4a16", 128, True, True), prompt, 5)
    nnx = decoder.prepare(model, V("xla_qops", "nnx", "w4a16", 128, True, True), prompt, 5)
    compiled = decoder.prepare(model, V("xla_qops", "compile", "w4a16", 128, True, True),
                               prompt, 5)
    # the same weight bytes per step but torch's rotary table, a buffer there
    rotary = sum(b.numel() * b.element_size() for b in model.model.rotary_emb.buffers())
    assert rotary > 0 and eager[0] - nnx[0] == rotary  # (one table, or two on transformers 5)
    want = eager[1]().tokens
    np.testing.assert_array_equal(nnx[1]().tokens, want)
    assert compiled[1].model.config._attn_implementation == "eager"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(3):
        np.testing.assert_array_equal(compiled[1]().tokens, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2


@pytest.mark.slow  # inductor's C++ wrapper compiles each graph's C++ (23-54 s here, cold)
def test_compiled_row_with_the_cpp_wrapper_generates_the_eager_tokens(base):
    """The compile-cpp row (inductor's C++ wrapper, which calls our op back through
    Python): the same greedy tokens as eager, over repeated generations without
    recompiling."""
    import torch._dynamo.utils
    V = decoder.Variant
    model = copy.deepcopy(base).float()
    prompt = np.random.default_rng(1).integers(3, 512, (1, 6)).astype(np.int64)
    eager = decoder.prepare(model, V("xla_qops", "eager", "w4a16", 128, True, True), prompt, 5)
    compiled = decoder.prepare(model, V("xla_qops", "compile-cpp", "w4a16", 128, True, True),
                               prompt, 5)
    want = eager[1]().tokens
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(2):
        np.testing.assert_array_equal(compiled[1]().tokens, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2


def test_paths_this_environment_cannot_run_say_why(monkeypatch):
    import sys
    decoder.path_unavailable.cache_clear()
    monkeypatch.setitem(sys.modules, "torchax", None)  # makes `import torchax` fail
    try:
        why = decoder.path_unavailable("jax")
        assert why is not None and "torchax" in why
        assert decoder.path_unavailable("eager") is None
        assert decoder.path_unavailable("compile") is None
    finally:
        decoder.path_unavailable.cache_clear()


def test_torchao_row_swaps_in_its_cpu_int4_or_says_why_not(base):
    """torchao's CPU int4 (moved to torchao.prototype in 0.16) where it imports."""
    missing = decoder.torchao_available()
    if missing is not None:
        assert "torchao" in missing
        return
    prompt = np.random.default_rng(2).integers(3, 512, (1, 6)).astype(np.int64)
    model = decoder.make_variant(base, decoder.Variant("torchao_int4", lm_head=True))
    weight = model.lm_head.weight
    assert type(weight).__name__ != "Parameter"  # swapped for torchao's tensor subclass
    assert decoder.step_bytes(model) < decoder.step_bytes(base)
    assert decoder.EagerGenerator(model, prompt, 3)().tokens.shape == (1, 3)


@pytest.mark.torchax  # the decoder bench's JAX variant runs through torchax
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


@pytest.mark.torchax  # the decoder bench's JAX variant runs through torchax
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


# --- the reports: same scheme, same turns, spread; only what the run measured ---

def _result(kind, path="eager", scheme=None, block=-1, symmetric=True, lm_head=True,
            tok_s=(100.0, 110.0, 90.0), timed_with=None, batch=1):
    v = decoder.Variant(kind, path, scheme, block, symmetric, lm_head if kind != "bf16" else False)
    return decoder.Result(v, batch, 200 << 20, 10 * tok_s[0], tok_s[0], 80.0,
                          [10 * t for t in tok_s], list(tok_s), timed_with or path)


def _results(scale=1.0):
    """Fake results; `scale` changes every measurement, ours more than the peers'
    (so that every ratio changes too)."""
    s = lambda *ts: tuple(t * scale for t in ts)
    p = lambda *ts: tuple(t * (1 + (scale - 1) / 3) for t in ts)
    out = []
    for batch in (1, 4):
        out += [
            _result("bf16", tok_s=p(30.0, 31.0, 29.0), batch=batch),
            _result("torch_int4", tok_s=p(90.0, 92.0, 91.0), batch=batch),
            _result("xla_qops", "eager", "w4a16", 128, True, tok_s=s(100.0, 104.0, 98.0),
                    batch=batch),
            _result("xla_qops", "eager", "w4a16", 128, False, tok_s=s(91.0, 92.0, 90.0),
                    batch=batch),
            _result("xla_qops", "eager", "w8a8", -1, True, tok_s=s(80.0, 81.0, 79.0),
                    batch=batch),
            _result("xla_qops", "jax", "w4a16", 128, False, tok_s=s(88.0, 89.0, 87.0),
                    batch=batch),
            # the eager peers, timed again in the JAX rows' turns
            _result("bf16", tok_s=p(20.0, 20.0, 20.0), timed_with="jax", batch=batch),
            _result("torch_int4", tok_s=p(80.0, 80.0, 80.0), timed_with="jax", batch=batch),
        ]
    return out


def test_int4_ratios_are_like_for_like_or_say_they_are_not():
    text = decoder_report.table(_results(), 1)
    lines = {line.split(" | ")[1]: line for line in text.splitlines()[2:]
             if line.startswith("| eager ")}
    sym = lines["xla-qops W4A16 g128 +lm_head"]
    asym = lines["xla-qops W4A16 g128 asym +lm_head"]
    assert "sym vs asym" in sym and "sym vs asym" not in asym
    # asym vs torch int4 (asym): median 91 / 91, per turn 91/90 .. 90/91
    assert "| 1.00x (0.99–1.01) |" in asym
    # W8A8 against torch's int4: no ratio at all
    assert lines["xla-qops W8A8 pc +lm_head"].split(" | ")[7] == "–"
    # the JAX row against its peers of the same turns: 88 / 80 and 88 / 20
    jax = [line for line in text.splitlines() if line.startswith("| jax ")][0]
    assert "| 1.10x (1.09–1.11) |" in jax and "| 4.40x (4.35–4.45) |" in jax
    targets = dict((t, v) for t, v, _ in decoder_report.targets(_results()))
    like = [t for t in targets if "both asymmetric" in t]
    unlike = [t for t in targets if "NOT like for like" in t]
    assert like and unlike
    assert all("W4A16 g128 asym" in t for t in like)
    assert all("W4A16 g128 sym" in t for t in unlike)


def _peer_results():
    """Fake results of the NNX group's turns: our NNX and compiled rows, llama.cpp's
    two files and the eager bf16 peer timed again with them; plus the eager
    fp8 row and its bf16 peer."""
    return [
        _result("bf16", tok_s=(30.0, 31.0, 29.0)),
        _result("xla_qops", "eager", "w8a16-fp8", -1, True, lm_head=False,
                tok_s=(60.0, 62.0, 61.0)),
        _result("bf16", tok_s=(20.0, 20.0, 20.0), timed_with="nnx"),
        _result("llama_cpp", "llama.cpp", "Q4_0", tok_s=(160.0, 170.0, 150.0), timed_with="nnx"),
        _result("llama_cpp", "llama.cpp", "Q8_0", tok_s=(100.0, 100.0, 100.0), timed_with="nnx"),
        _result("xla_qops", "nnx", "w4a16", 128, True, tok_s=(176.0, 170.0, 150.0)),
        _result("xla_qops", "nnx", "w8a16", -1, True, tok_s=(90.0, 95.0, 85.0)),
        _result("xla_qops", "nnx", "w4a8", 128, True, tok_s=(150.0, 150.0, 150.0)),
        _result("bf16", "nnx", tok_s=(2.0,)),
        _result("xla_qops", "compile", "w4a16", 128, True, tok_s=(140.0, 136.0, 120.0),
                timed_with="nnx"),
    ]


def test_llama_cpp_and_compile_rows_take_turns_with_the_nnx_rows():
    V = decoder.Variant
    rows = decoder.variants(torchao=False)
    assert V("llama_cpp", "llama.cpp", "Q4_0") in rows and V("bf16", "nnx") in rows
    assert V("xla_qops", "eager", "w8a16-fp8", -1, True, False) in rows
    assert {v.group for v in rows if v.path in ("nnx", "compile", "llama.cpp")} == {"nnx"}
    # the eager peers timed again in the NNX group: bf16 and the int4 peers with lm_head
    assert {(v.kind, v.lm_head) for v in decoder.companions(rows, "nnx")} == {
        ("bf16", False), ("torch_int4", True)}
    results = _peer_results()
    assert not any(r.companion for r in results if r.variant.path in ("llama.cpp", "compile"))
    assert results[2].companion  # the eager bf16 peer in the NNX turns


def test_ratios_against_llama_cpp_pair_formats_and_turns():
    results = _peer_results()
    text = decoder_report.table(results, 1)
    lines = {(line.split(" | ")[0], line.split(" | ")[1]): line for line in text.splitlines()[2:]}
    # W4A16 against Q4_0 of the same turns: median 170 / 160, per turn 176/160 .. 150/150
    w4 = lines[("| nnx", "xla-qops W4A16 g128 +lm_head")]
    assert "| 1.06x (1.00–1.10) vs Q4_0 |" in w4
    assert "| 8.50x (7.50–8.80) |" in w4  # against the eager bf16 peer of the same turns
    assert "vs Q8_0" in lines[("| nnx", "xla-qops W8A16 pc +lm_head")]
    assert "vs Q4_0" in lines[("| compile", "xla-qops W4A16 g128 +lm_head")]
    # no llama.cpp ratio for rows outside its turns, nor for the float rows
    assert lines[("| eager", "xla-qops W8A16-FP8 pc")].split(" | ")[9] == "–"
    assert lines[("| nnx", "bf16 flax nnx")].split(" | ")[9] == "–"
    targets = {t: (v, ok) for t, v, ok in decoder_report.peer_targets(results)}
    assert targets["W4A16 g128 +lm_head [nnx] decode ≥ 1.0x llama.cpp Q4_0"] == (
        "1.06x (1.00–1.10)", True)
    assert targets["W8A16 pc +lm_head [nnx] decode ≥ 1.0x llama.cpp Q8_0"][1] is False
    assert targets["W4A16 g128 +lm_head [compile] decode ≥ 0.9x llama.cpp Q4_0"][1] is False
    assert targets["W4A8 g128 +lm_head [nnx] decode vs llama.cpp Q4_0 (reported, no target)"][1] \
        is None
    assert targets["W8A16-fp8 pc [eager] decode ≥ 1.8x bf16 torch (unquantized)"] == (
        "2.03x (2.00–2.10)", True)  # median 61 / 30
    # a comparison across formats is published only with its label
    nnx_w4, q4 = results[5], results[3]
    assert decoder_report.compare(nnx_w4, q4).across == decoder_report.LLAMA_CPP_ACROSS
    assert decoder_report.compare(results[1], q4) is None  # fp8 W8A16 vs Q4_0: none


def test_report_ratio_refuses_unlabelled_schemes_for_the_decoder_too():
    from xla_qops_app.bench import report
    r = _results()
    w8a8, int4 = r[4], r[1]
    assert decoder_report.compare(w8a8, int4) is None  # not published
    with pytest.raises(report.SchemeMismatch):
        report.ratio(w8a8.decode_runs, int4.decode_runs, num_scheme=w8a8.variant.scheme_key,
                     den_scheme=int4.variant.scheme_key)


def test_bench_e2e_markdown_holds_only_this_runs_figures(monkeypatch):
    import argparse
    import os
    import re

    from xla_qops_app.commands import bench_model
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    figure = re.compile(r"\d+(?:\.\d+)?\s?(?:ms|µs|s|tok/s|GB/s|MiB|x|%)(?![\w/])")

    def render(scale):
        args = argparse.Namespace(prefill=int(128 * scale), decode=int(64 * scale),
                                  xla_layers=0)
        reps = 3 if scale == 1 else 5
        return bench_model._markdown(args, f"machine {scale}", int(8 * scale), reps, reps - 2,
                                     [1, 4], _results(scale), [], 18 * scale, ["- torchao: x"],
                                     True)
    one, two = render(1.0), render(1.5)
    static = set(one.splitlines()) & set(two.splitlines())
    assert [f for line in static for f in figure.findall(line)] == []
    assert "9.9 ms" not in one  # the torchax note once carried another run's figure


@pytest.mark.torchax  # the decoder bench's JAX variant runs through torchax
def test_demo_decoder_section_compares_with_the_eager_float_model(base, monkeypatch, capsys):
    """`make demo`'s 'vs float': against the float model in eager torch, from the
    same turns, for the JAX and NNX rows too (not the float model through JAX);
    the NNX rows against llama.cpp only where it is installed (the demo never
    builds it)."""
    import re

    from xla_qops_app.bench import llama_cpp
    from xla_qops_app.commands import demo_model
    monkeypatch.setattr(decoder, "TINYLLAMA", DIMS)
    demo_model.decoder_section(1, ["jax", "nnx"])
    out = capsys.readouterr().out
    assert "against the float model in eager torch" in out
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("eager ", "jax ", "nnx ", "llama.cpp "))]
    installed = llama_cpp.unavailable() is None
    # eager only as the baseline; the float model through JAX, then our two schemes
    assert [r[0] for r in rows] == ["jax"] * 3 + ["nnx"] * 2 + ["llama.cpp"] * (2 * installed)
    # tokens/s, then the ratio to the eager float model with its per-turn range
    # (the float model through JAX runs once: slow_reps)
    for r in rows:
        at = 4 if r[0] == "llama.cpp" else 5  # "W4A16 g128", "float (bf16)": two words
        assert float(r[at - 1]) > 0 and float(r[at].rstrip("x")) > 0, r
        if r[1] != "float":
            assert re.fullmatch(r"\(.*–.*\)", r[at + 1]), r
    nnx = [" ".join(r) for r in rows if r[0] == "nnx"]
    assert all(("vs Q4_0" in line or "vs Q8_0" in line) == installed for line in nnx), nnx
    assert ("no llama.cpp comparison" in out) != installed
