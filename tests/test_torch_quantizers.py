"""torch_bridge.quantize_model with calibrated methods and SmoothQuant.

A small model whose graph has every case the scale folding meets: a norm
feeding only Linears (q/k/v: folded into it), a norm whose output also feeds
a residual (the fold changes the model: an explicit input scale instead), a
Linear feeding a Linear (folded into the producer's rows), inputs made by
elementwise expressions and functions (explicit).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_bridge
from torch_bridge import XlaQuantizedLinear, calibrate


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(64), torch.nn.LayerNorm(64)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(64, 64) for _ in range(4))
        self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
        self.proj, self.head = torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        h = self.ln1(x)  # only q, k, v read it
        x = x + self.o(self.q(h) * self.k(h) + self.v(h))
        h2 = self.ln2(x)  # read by up and by the residual
        x = h2 + self.down(F.gelu(self.up(h2)))
        return self.head(self.proj(x))


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = Tiny().eval()
    with torch.no_grad():  # uneven channels and an outlier, as real activations have
        model.ln1.weight.copy_(torch.exp(torch.randn(64)))
        model.ln1.weight[5] = 20.0
        model.ln2.weight.copy_(torch.exp(torch.randn(64) * 0.5))
    calibration = [torch.randn(4, 10, 64) for _ in range(8)]
    held_out = torch.randn(16, 10, 64)
    return model, calibration, held_out


def out(model, x):
    with torch.no_grad():
        return model(x).float()


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_smoothquant_folds_where_the_model_allows_it(monkeypatch):
    # Where each scale goes, with every layer smoothed (the held-out choice of which
    # layers keep it: tests/test_torch_calibrate_smoothing.py).
    monkeypatch.setattr(calibrate, "_judge_smoothing", lambda names, *a, **k: (list(names), {}))
    model, calibration, held_out = model_and_data()
    reference = out(model, held_out)
    q = torch_bridge.quantize_model(copy.deepcopy(model), scheme="w8a8", smoothing="smoothquant",
                                    calibration=calibration, progress=False)
    report = torch_bridge.quantization_report(q)
    where = {layer.name: layer.input_scale for layer in report.swapped}
    assert where["q"] == where["k"] == where["v"] == "folded into ln1"
    assert where["head"] == "folded into proj"
    for name in ("o", "up", "down", "proj"):
        assert where[name] == "explicit", name
        assert getattr(q, name).input_scale is not None
    assert q.q.input_scale is None
    assert report.smoothing == "smoothquant(alpha=0.5)" and report.calibration_size == 8
    plain = torch_bridge.quantize_model(copy.deepcopy(model), scheme="w8a8")
    assert rel_err(out(q, held_out), reference) < rel_err(out(plain, held_out), reference)
    assert rel_err(out(q, held_out), reference) < 0.02


@pytest.mark.parametrize("method", ["gptq", "awq", "hqq"])
def test_methods_beat_round_to_nearest_on_held_out_inputs(method):
    model, calibration, held_out = model_and_data(1)
    reference = out(model, held_out)
    rtn = torch_bridge.quantize_model(copy.deepcopy(model), scheme="w4a16", block_size=32)
    ours = torch_bridge.quantize_model(
        copy.deepcopy(model), scheme="w4a16", block_size=32, method=method, progress=False,
        calibration=calibration if method != "hqq" else None)
    assert rel_err(out(ours, held_out), reference) < rel_err(out(rtn, held_out), reference)
    report = torch_bridge.quantization_report(ours)
    assert report.method == method
    for layer in report.swapped:  # or round to nearest, kept where the method did worse on
        # the held-out split of the calibration inputs (xla_qops.quantizers.heldout)
        assert layer.method in (method, f"rtn (fallback: {method} worse on the held-out split)")
        assert layer.weight_error is not None
        assert 0 < layer.weight_error_rtn < 0.2
    text = str(report)
    assert f"method={method}" in text and "weight error" in text


@pytest.mark.parametrize("scheme,method", [("w4a16-nvfp4", "gptq"), ("w4a16-mxfp4", "gptq"),
                                           ("w4a16-nvfp4", "awq"), ("w8a8-fp8", "awq")])
def test_float_schemes_take_the_calibrated_methods(scheme, method):
    """GPTQ and AWQ round onto the scheme's float grid: the modules hold its formats, and
    on held-out inputs the model is closer to the float one than round to nearest's."""
    model, calibration, held_out = model_and_data(1)
    reference = out(model, held_out)
    rtn = torch_bridge.quantize_model(copy.deepcopy(model), scheme=scheme)
    ours = torch_bridge.quantize_model(copy.deepcopy(model), scheme=scheme, method=method,
                                       calibration=calibration, progress=False)
    assert rel_err(out(ours, held_out), reference) < rel_err(out(rtn, held_out), reference)
    element = "fp8" if scheme == "w8a8-fp8" else "fp4"
    for layer in torch_bridge.quantization_report(ours).swapped:
        module = ours.get_submodule(layer.name)
        assert module.weight_format == element and layer.method == method
        assert module.weight.dtype == (torch.float8_e4m3fn if element == "fp8" else torch.uint8)


def test_report_and_dict_inputs():
    model, calibration, _ = model_and_data(2)

    class Keyword(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, scale=None):
            return self.inner(x * scale)

    wrapped = Keyword(model)
    inputs = [{"x": c, "scale": torch.tensor(2.0)} for c in calibration[:3]]
    torch_bridge.quantize_model(wrapped, scheme="w4a16", block_size=32, method="gptq",
                                calibration=inputs, progress=False)
    report = torch_bridge.quantization_report(wrapped)
    assert report.calibration_size == 3 and report.calibration_tokens == 0
    assert isinstance(wrapped.inner.q, XlaQuantizedLinear)


def test_deterministic_and_state_dict_round_trip():
    model, calibration, held_out = model_and_data(3)
    kw = dict(scheme="w8a8", method="gptq", smoothing="smoothquant", calibration=calibration,
              progress=False)
    a = torch_bridge.quantize_model(copy.deepcopy(model), **kw)
    b = torch_bridge.quantize_model(copy.deepcopy(model), **kw)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and "o.input_scale" in sa
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # A model quantized without scales takes the state_dict, input scales included.
    fresh = torch_bridge.quantize_model(copy.deepcopy(model), scheme="w8a8")
    fresh.load_state_dict(sa)
    assert torch.equal(out(fresh, held_out), out(a, held_out))


def test_bad_arguments_fail_before_any_work():
    model, calibration, _ = model_and_data(4)
    before = copy.deepcopy(model.state_dict())

    def untouched():
        assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_children()
                   if n not in ("ln1", "ln2"))
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key

    cases = [
        (dict(method="gptq2"), ValueError, "method: expected one of"),
        (dict(method="gptq"), ValueError,
         r"calibration: method='gptq' needs calibration inputs \(an iterable of the model's "),
        (dict(method="hqq", calibration=calibration), ValueError, "uses no calibration"),
        (dict(scheme="w4a16", smoothing="smoothquant", calibration=calibration), ValueError,
         "smoothing: 'smoothquant' is for schemes that quantize activations"),
        (dict(scheme="w8a8", smoothing="smoothquant"), ValueError,
         "calibration: smoothing='smoothquant' needs"),
        (dict(scheme="w8a8", smoothing="smooth"), ValueError, "smoothing: expected None, 'smoothquant' or 'hadamard'"),
        (dict(scheme="w8a8", smoothing="smoothquant", smoothing_alpha=2, calibration=calibration),
         ValueError, "smoothing_alpha"),
        (dict(method="gptq", calibration=[]), ValueError, "at least one model input"),
        (dict(method="gptq", calibration=calibration[0]), TypeError, "got a single Tensor"),
        (dict(method="gptq", calibration=["text"]), TypeError, "item 0: expected a tensor"),
        (dict(method="gptq", calibration=[torch.randn(2, 5, 63)]), ValueError,
         "the model cannot take calibration item 0"),
    ]
    for kwargs, error, message in cases:
        kwargs.setdefault("scheme", "w4a16")
        with pytest.raises(error, match=message):
            torch_bridge.quantize_model(model, progress=False, **kwargs)
        untouched()


def test_linears_the_inputs_never_reach_fall_back_to_rtn():
    model, calibration, _ = model_and_data(5)
    model.unused = torch.nn.Linear(64, 64)
    torch_bridge.quantize_model(model, scheme="w4a16", block_size=32, method="gptq",
                                calibration=calibration[:2], progress=False)
    methods = {layer.name: layer.method for layer in torch_bridge.quantization_report(model).swapped}
    # q was reached: GPTQ, or round to nearest kept by the held-out check (labelled as such)
    assert methods["unused"] == "rtn"
    assert methods["q"] in ("gptq", "rtn (fallback: gptq worse on the held-out split)")


@pytest.mark.parametrize("method", ["hqq", "gptq", "awq"])
def test_int4_layers_with_an_odd_in_features(method):
    # Such a module stores int4 unpacked; the calibrated path handed it packed
    # values it could not make (a crash inside jax). Now it matches from_float's.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    data = [torch.randn(6, 33) for _ in range(2)]
    torch_bridge.quantize_model(model, scheme="w4a16", method=method,
                                calibration=None if method == "hqq" else data, progress=False)
    first = model[0]
    assert isinstance(first, XlaQuantizedLinear) and not first.packed
    assert first.weight.dtype == torch.int8 and tuple(first.weight.shape) == (16, 33)
    assert model[2].packed  # in=16 pairs up


def test_input_scale_validation():
    layer = XlaQuantizedLinear(8, 4)
    with pytest.raises(ValueError, match=r"scale: expected a float \[8\]"):
        layer.set_input_scale(torch.ones(7))
    with pytest.raises(ValueError, match="finite"):
        layer.set_input_scale(torch.tensor([np.inf] * 8))
    layer.set_input_scale(torch.full((8,), 2.0))
    assert "input_scale" in layer.state_dict() and "input_scale" in repr(layer)
    layer.set_input_scale(None)
    assert "input_scale" not in layer.state_dict()


def test_llama_folds_into_its_rmsnorms(monkeypatch):
    """A pre-norm decoder: q/k/v and gate/up take their scale into the RMSNorm before them;
    o_proj and down_proj (attention and SiLU-gate outputs) keep an explicit one."""
    monkeypatch.setattr(calibrate, "_judge_smoothing", lambda names, *a, **k: (list(names), {}))
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = [torch.randint(0, 128, (2, 16)) for _ in range(4)]
    held_out = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        reference = model(held_out).logits
    torch_bridge.quantize_model(model, scheme="w8a8", smoothing="smoothquant", calibration=ids,
                                progress=False)
    where = {layer.name: layer.input_scale
             for layer in torch_bridge.quantization_report(model).swapped}
    for i in range(2):
        prefix = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert where[prefix + name] == f"folded into {prefix}input_layernorm"
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            assert where[prefix + name] == f"folded into {prefix}post_attention_layernorm"
        assert where[prefix + "self_attn.o_proj"] == where[prefix + "mlp.down_proj"] == "explicit"
    with torch.no_grad():
        assert rel_err(model(held_out).logits, reference) < 0.02


def test_replaying_finished_blocks_changes_no_result(monkeypatch):
    """torch_bridge.block_replay: a finished decoder layer's outputs are replayed, not
    recomputed, while later groups gather their statistics (the layer's own modules run
    fewer times), and the quantized model is bit for bit the one recomputing gives.
    awq+gptq: both phases that gather (AWQ's scales with their folds, then GPTQ)."""
    transformers = pytest.importorskip("transformers")
    from torch_bridge import block_replay

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    float_model = transformers.LlamaForCausalLM(config).eval()
    ids = [torch.randint(0, 128, (2, 16)) for _ in range(5)]  # one held out (heldout)
    results, first_layer_calls = {}, {}
    for label, budget in (("replayed", block_replay.MEMORY_BYTES), ("recomputed", 0)):
        monkeypatch.setattr(block_replay, "MEMORY_BYTES", budget)  # 0: nothing kept
        model = copy.deepcopy(float_model)
        calls = [0]
        model.model.layers[0].self_attn.register_forward_hook(
            lambda *_: calls.__setitem__(0, calls[0] + 1))
        torch_bridge.quantize_model(model, scheme="w4a16", block_size=32, method="awq+gptq",
                                    calibration=ids, progress=False)
        results[label] = model.state_dict()
        first_layer_calls[label] = calls[0]
    replayed, recomputed = results["replayed"], results["recomputed"]
    assert replayed.keys() == recomputed.keys()
    assert all(torch.equal(replayed[k], recomputed[k]) for k in replayed)
    assert first_layer_calls["replayed"] < first_layer_calls["recomputed"] / 2
