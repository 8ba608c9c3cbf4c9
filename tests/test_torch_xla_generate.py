"""A quantized decoder generating on the torch_xla device (static KV cache).

A tiny Llama (transformers `LlamaForCausalLM`, random float32 weights) with
every Linear quantized to W4A16 g32 (zero points, lm_head included) generates
greedily on the XLA device twice, after the same generation on torch CPU
tensors. The tokens must be the CPU tensors' (the XLA device runs the fused
XLA formula, CPU tensors the C++ kernels: both within float32 rounding of
API.md's product, far from an argmax tie here), the repeat must compile
nothing new (at most the one graph torch_xla compiles again on a second
`generate`, as for the float model), and the first generate must compile
exactly as many graphs as the float model's: the op is embedded in the
model's lazy graphs (call_jax) and adds none of its own. Each model runs in
a fresh process, so neither finds the other's graphs in torch_xla's cache.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch_xla")

CHILD = textwrap.dedent("""
    import json, sys
    from xla_qops_app.bench import decoder
    dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                tie_word_embeddings=False)
    base = decoder.build_model(1, dims=dims).float()
    kind = sys.argv[1]
    variant = decoder.Variant(kind, "xla", "w4a16" if kind == "xla_qops" else None, 32,
                              False, True)
    (r,) = decoder.measure_xla_device(base, [variant], prefill=8, decode=4, log=lambda *a: None)
    print(json.dumps(dict(first=r.compiles_first, repeat=r.compiles_repeat,
                          same=r.same_tokens)))
""")


def _generate_in_child(kind):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PJRT_DEVICE="CPU",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here),
                                           os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD, kind], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quantized_generate_on_the_xla_device():
    quantized = _generate_in_child("xla_qops")
    float_model = _generate_in_child("bf16")  # float32 here: build_model(...).float()
    assert quantized["same"] and float_model["same"]
    assert quantized["repeat"] <= 1 and quantized["repeat"] == float_model["repeat"]
    assert quantized["first"] == float_model["first"] > 0
