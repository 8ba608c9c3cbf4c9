"""SmoothQuant chosen per layer on the held-out calibration inputs (issue 26, A8 schemes).

`torch_bridge.calibrate._scales` keeps a layer's smoothing only where it lowers the
layer's output error (round-to-nearest weights, the activations quantized as its module
does) on the held-out split of the calibration inputs. A two-path model where the
smoothing of one Linear provably helps and of the other provably hurts:

* `helped` reads a LayerNorm output with an outlier channel (weight 30 on channel 3):
  the per-token activation scale is set by that channel, smoothing moves it into the
  weight (SmoothQuant's case); its scale folds into the norm.
* `hurt` reads the raw input, +-1 on every channel (no outliers: the per-token scale is
  already as fine as it can be), and its weight has one entry 10x the others: SmoothQuant's
  s is small on that column, so the smoothed activations get an outlier channel on every
  token while only one weight row gains.

Also: padded positions of a padded batch (attention_mask 0) count nowhere in SmoothQuant's
statistics or the held-out sample, and a calibrated method is judged with its own weights.
"""

import copy

import numpy as np
import numpy_reference as ref
import pytest
import torch

import torch_bridge
import xla_qops
from torch_bridge import calibrate
from xla_qops.quantize import quantize_with_hessian
from xla_qops.quantizers import heldout


class TwoPaths(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)
        self.helped = torch.nn.Linear(64, 64)
        self.hurt = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.helped(self.norm(x)) + self.hurt(x)


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = TwoPaths().eval()
    with torch.no_grad():
        model.norm.weight[3] = 30.0  # the outlier channel of `helped`'s input
        model.hurt.weight[0, 0] += 1.0  # the weights are U(-1/8, 1/8): ~9x the largest
    flat = lambda *shape: torch.sign(torch.randn(*shape))  # noqa: E731  every |x| = 1
    calibration = [flat(4, 16, 64) for _ in range(10)]  # inputs 4 and 9 are held out
    fresh = flat(64, 16, 64)
    return model, calibration, fresh


def held_out_split(calibration):
    return torch.cat([x for i, x in enumerate(calibration)
                      if heldout.is_holdout(i, len(calibration))])


def output_error(quantized, model, x) -> float:
    """|y_q - y|^2 / |y|^2 of the model's outputs, float64."""
    with torch.no_grad():
        reference, y = model(x).double(), quantized(x).double()
    return float(((y - reference) ** 2).sum() / (reference ** 2).sum())


def smoothed_everywhere(monkeypatch):
    """What quantize_model did before the check: every layer keeps its smoothing."""
    monkeypatch.setattr(calibrate, "_judge_smoothing", lambda names, *a, **k: (list(names), {}))


def figures(text: str) -> tuple[float, float]:
    """(smoothed, plain) of "... held-out error S smoothed vs P plain"."""
    words = text.split("held-out error ")[1].split()
    return float(words[0]), float(words[3])


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-fp8"])  # int8 and fp8 activations
def test_smoothing_kept_where_it_helps_and_dropped_where_it_hurts(scheme, monkeypatch):
    model, calibration, fresh = model_and_data()
    kw = dict(scheme=scheme, calibration=calibration, progress=False)
    chosen = torch_bridge.quantize_model(copy.deepcopy(model), smoothing="smoothquant", **kw)
    where = {layer.name: layer.input_scale
             for layer in torch_bridge.quantization_report(chosen).swapped}
    assert where["helped"].startswith("folded into norm; held-out error"), where
    smoothed, plain = figures(where["helped"])
    assert smoothed < plain
    assert where["hurt"].startswith("not smoothed: held-out error"), where
    smoothed, plain = figures(where["hurt"])
    assert smoothed > plain
    assert chosen.hurt.input_scale is None  # no explicit scale either
    assert not torch.equal(chosen.norm.weight, model.norm.weight)  # the fold took place

    with monkeypatch.context() as patch:
        smoothed_everywhere(patch)
        everywhere = torch_bridge.quantize_model(copy.deepcopy(model), smoothing="smoothquant",
                                                 **kw)
    assert everywhere.hurt.input_scale is not None  # the check is what dropped it
    kw.pop("calibration")
    nowhere = torch_bridge.quantize_model(copy.deepcopy(model), **kw)
    # On the held-out split the choice was made on, and on fresh inputs of the same kind,
    # the model is closer to the float one than with smoothing everywhere or nowhere
    # (strictly: `hurt` differs from the all-smoothed model, `helped` from the plain one).
    for x in (held_out_split(calibration), fresh):
        error = output_error(chosen, model, x)
        assert error < output_error(everywhere, model, x)
        assert error < output_error(nowhere, model, x)


def test_a_group_folds_only_when_all_its_layers_keep_the_smoothing():
    """`helped` and `hurt` made to read the same norm output: one group, one producer,
    one scale. Here the input is flat (the norm has no outlier) and `helped`'s weight has
    four columns 10x the others in every row (smoothing evens them: it helps), `hurt`
    keeps its one large entry (smoothing hurts). The scale cannot go into the norm (that
    would smooth `hurt` too): `helped` keeps it as an explicit input scale."""

    class OneGroup(TwoPaths):
        def forward(self, x):
            h = self.norm(x)
            return self.helped(h) + self.hurt(h)

    model, calibration, _ = model_and_data()
    one_group = OneGroup().eval()
    one_group.load_state_dict(model.state_dict())
    with torch.no_grad():
        one_group.norm.weight.fill_(1.0)
        one_group.helped.weight[:, 10:14] *= 10.0
    quantized = torch_bridge.quantize_model(copy.deepcopy(one_group), scheme="w8a8",
                                            smoothing="smoothquant", calibration=calibration,
                                            progress=False)
    where = {layer.name: layer.input_scale
             for layer in torch_bridge.quantization_report(quantized).swapped}
    assert where["hurt"].startswith("not smoothed: held-out error"), where
    assert where["helped"].startswith("explicit; held-out error"), where
    assert quantized.helped.input_scale is not None and quantized.hurt.input_scale is None
    assert torch.equal(quantized.norm.weight, one_group.norm.weight)  # nothing folded


def test_no_held_out_input_or_awq_scales_are_not_judged():
    """One calibration input holds nothing out: every layer is smoothed, unchecked (as
    before). AWQ's scales (no smoothing) are chosen by its own search, never judged here."""
    model, calibration, _ = model_and_data()
    single = torch_bridge.quantize_model(copy.deepcopy(model), scheme="w8a8",
                                         smoothing="smoothquant", calibration=calibration[:1],
                                         progress=False)
    where = {layer.name: layer.input_scale
             for layer in torch_bridge.quantization_report(single).swapped}
    assert where == {"helped": "folded into norm", "hurt": "explicit"}
    awq = torch_bridge.quantize_model(copy.deepcopy(model), scheme="w4a8", block_size=32,
                                      method="awq", calibration=calibration, progress=False)
    for layer in torch_bridge.quantization_report(awq).swapped:
        assert layer.input_scale is None or "held-out" not in layer.input_scale, layer


def test_held_out_sample_is_capped_spread_and_kept_apart_from_the_fitted_maximum():
    sample = calibrate.HeldOutSample(held_out_inputs=2, cap=10)  # 5 rows of each
    fitted = torch.ones(3, 4, 2)
    held = torch.arange(40.0).reshape(2, 10, 2)  # 20 rows
    sample.add(fitted, held_out=False)
    sample.add(held, held_out=True)
    sample.add(-held, held_out=True)
    rows = sample.rows()
    assert rows.shape == (10, 2)
    # evenly spread over each input's 20 rows: the first and the last included
    assert rows[:5, 0].tolist() == [0.0, 10.0, 20.0, 28.0, 38.0]
    assert torch.equal(rows[5:], -rows[:5])
    # the held-out inputs' values (up to 39) do not reach the fitted maximum
    assert sample.fit_absmax.tolist() == [1.0, 1.0]
    assert calibrate.HeldOutSample(held_out_inputs=3).share * 3 >= calibrate.HELD_OUT_ROWS


@pytest.mark.parametrize("activation_format", ["int8", "fp8"])
def test_the_judged_errors_are_the_quantized_layers_own(activation_format):
    """`_output_errors`' figures against a float64 reference of API.md's convention
    (tests/numpy_reference): round-to-nearest int8 weights of W diag(s) (smoothed) or W
    (plain), activations x * (1/s) in float32 (the module's input scale) quantized per
    token. The module accumulates in float32 / int32, the reference in float64: the
    outputs agree to ~1e-6 relative, the errors (~1e-4 of |Y|^2) to far better than the
    1e-3 relative asked."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    rows = torch.randn(200, 64) * torch.exp(torch.randn(64))  # uneven channels
    s = np.exp(np.random.default_rng(0).standard_normal(64)).astype(np.float32)
    smoothed, plain = calibrate._output_errors(
        linear, rows, s, bits=8, block_size=-1, symmetric=True, format="int",
        nvfp4_divisor=False, activation_format=activation_format)
    w = linear.weight.detach().numpy()
    x = rows.numpy()
    reference = x.astype(np.float64) @ w.astype(np.float64).T

    def error(weight, inputs):
        qw = xla_qops.quantize_weight(weight, bits=8, symmetric=True, pack=False)
        y = ref.quantized_matmul(inputs, np.asarray(qw.w), np.asarray(qw.scale),
                                 quantize_activation_=True, activation_format=activation_format)
        return float(((y - reference) ** 2).sum() / (reference ** 2).sum())

    np.testing.assert_allclose(plain, error(w, x), rtol=1e-3)
    np.testing.assert_allclose(smoothed, error(w * s, x * (np.float32(1) / s)), rtol=1e-3)
    assert smoothed != pytest.approx(plain, rel=1e-2)  # the two cases really differ


class TakesAMask(TwoPaths):
    """TwoPaths called as a tokenizer dict's model is: the mask is the caller's, the padded
    positions are computed like any other and never used (here: left in the output)."""

    def forward(self, inputs_embeds, attention_mask):
        return super().forward(inputs_embeds)


def padded(calibration, extra: int, value: float):
    """Each input as {inputs_embeds, attention_mask}: `extra` padded positions of `value`
    after the real tokens (all real when `extra` is 0) on every channel but one in eight."""
    items = []
    for x in calibration:
        batch, tokens, features = x.shape
        pad = torch.zeros(batch, extra, features)
        pad[..., ::8] = value  # far beyond every real |x| = 1: it would set absmax
        mask = torch.cat([torch.ones(batch, tokens), torch.zeros(batch, extra)], 1)
        items.append({"inputs_embeds": torch.cat([x, pad], 1), "attention_mask": mask.long()})
    return items


def test_padded_positions_change_neither_the_choice_nor_the_sample():
    """A padded batch (attention_mask 0) adds rows the model never uses: SmoothQuant's
    statistics and the held-out sample are of real tokens only, so the choice, each
    layer's two judged errors and the quantized weights are those of the unpadded batch.
    Counting the padding (before) put its 40s into absmax, so the scales and the
    figures differed."""
    model, calibration, _ = model_and_data()
    masked = TakesAMask().eval()
    masked.load_state_dict(model.state_dict())
    results = []
    for extra in (0, 5):
        quantized = torch_bridge.quantize_model(
            copy.deepcopy(masked), scheme="w8a8", smoothing="smoothquant",
            calibration=padded(calibration, extra, 40.0), progress=False)
        results.append(quantized)
    plain, with_padding = ({layer.name: layer.input_scale
                            for layer in torch_bridge.quantization_report(q).swapped}
                           for q in results)
    assert plain == with_padding
    assert plain["helped"].startswith("folded into norm; held-out error"), plain
    assert plain["hurt"].startswith("not smoothed"), plain
    for name in ("helped", "hurt"):
        assert torch.equal(getattr(results[0], name).weight, getattr(results[1], name).weight)


def test_gather_counts_real_tokens_only_with_real_tokens():
    """`gather(real_tokens=True)`: every statistic and the held-out sample of the padded
    inputs equal the unpadded inputs'; without it, the padded rows count."""
    model, calibration, _ = model_and_data()
    masked = TakesAMask().eval()
    masked.load_state_dict(model.state_dict())
    held_out_inputs = sum(heldout.is_holdout(i, 10) for i in range(10))

    def statistics(items, real_tokens):
        sample = calibrate.HeldOutSample(held_out_inputs)
        stats = calibrate.gather(masked, items, [masked.hurt], hessian=True, stop_early=True,
                                 holdout=True, sample=sample, real_tokens=real_tokens)
        return stats, sample

    (expected, expected_sample), (got, got_sample) = (
        statistics(padded(calibration, extra, 40.0), real_tokens=True) for extra in (0, 5))
    assert got.rows == expected.rows == 10 * 4 * 16  # every input, held-out ones too
    for field in ("absmax", "abssum", "hessian", "holdout_hessian"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert torch.equal(got_sample.rows(), expected_sample.rows())
    assert torch.equal(got_sample.fit_absmax, expected_sample.fit_absmax)
    counted, counted_sample = statistics(padded(calibration, 5, 40.0), real_tokens=False)
    assert counted.rows == 10 * 4 * 21 and float(counted.absmax.max()) == 40.0
    assert float(counted_sample.rows().abs().max()) == 40.0


def test_the_judge_uses_the_methods_own_weights():
    """With a calibrated method, `_output_errors` quantizes W diag(s) and W as that method
    does on the fitted inputs' X^T X (divided by s for the smoothed weight), not by round
    to nearest: its figures are a float64 reference's with GPTQ's codes
    (`quantize_with_hessian`, the library's GPTQ), and differ from round to nearest's."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48)
    channels = torch.exp(torch.randn(64))
    fit, rows = torch.randn(400, 64) * channels, torch.randn(200, 64) * channels
    hessian = (fit.double().T @ fit.double()).numpy()
    s = np.exp(np.random.default_rng(1).standard_normal(64) / 2).astype(np.float32)
    scheme = dict(bits=8, block_size=-1, symmetric=True, format="int", nvfp4_divisor=False,
                  activation_format="int8")
    smoothed, plain = calibrate._output_errors(linear, rows, s, method="gptq",
                                               hessian=hessian, **scheme)
    w = linear.weight.detach().numpy()
    x = rows.numpy()
    reference = x.astype(np.float64) @ w.astype(np.float64).T

    def error(weight, inputs, h):
        qw = quantize_with_hessian(weight, bits=8, block_size=-1, symmetric=True,
                                   method="gptq", hessian=h, pack=False)
        y = ref.quantized_matmul(inputs, np.asarray(qw.w), np.asarray(qw.scale),
                                 quantize_activation_=True, activation_format="int8")
        return float(((y - reference) ** 2).sum() / (reference ** 2).sum())

    np.testing.assert_allclose(plain, error(w, x, hessian), rtol=1e-3)
    np.testing.assert_allclose(
        smoothed, error(w * s, x * (np.float32(1) / s), hessian / s[:, None] / s[None, :]),
        rtol=1e-3)
    rtn_smoothed, rtn_plain = calibrate._output_errors(linear, rows, s, **scheme)
    assert plain != pytest.approx(rtn_plain, rel=1e-2)
    assert smoothed != pytest.approx(rtn_smoothed, rel=3e-3)  # 3x the match's tolerance


def test_quantize_model_judges_gptq_with_gptqs_weights():
    """The figures a GPTQ call reports are not round to nearest's (the judge used to
    quantize both cases by round to nearest whatever the method)."""
    model, calibration, _ = model_and_data()
    reported = {}
    for method in ("rtn", "gptq"):
        quantized = torch_bridge.quantize_model(
            copy.deepcopy(model), scheme="w8a8", method=method, smoothing="smoothquant",
            calibration=calibration, progress=False)
        reported[method] = {layer.name: figures(layer.input_scale)
                            for layer in torch_bridge.quantization_report(quantized).swapped}
    for name in ("helped", "hurt"):
        assert reported["gptq"][name] != reported["rtn"][name], name
