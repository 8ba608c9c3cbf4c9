"""quantize_model(smoothing="hadamard"): each layer's inputs rotated by a block-diagonal
Hadamard matrix at run time, its weight by the same matrix before quantization
(torch_bridge.rotation). Checked against a float64 numpy statement of the rotation and
of API.md's convention, and on a layer whose inputs carry outlier channels (what the
rotation is for)."""

import copy

import numpy as np
import pytest
import torch

import numpy_reference as ref
import torch_bridge
import xla_qops
from torch_bridge import XlaQuantizedLinear
from torch_bridge.checkpoint import load_torch, save_torch


class TwoLayers(torch.nn.Module):
    def __init__(self, a=96, b=256, c=40):
        super().__init__()
        self.up, self.down = torch.nn.Linear(a, b), torch.nn.Linear(b, c)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def rotated_w8a8(seed: int) -> torch.nn.Module:
    """TwoLayers (seeded) quantized W8A8 per-channel with its inputs rotated; torch's
    generator left as the seed set it, for the inputs a test draws next."""
    torch.manual_seed(seed)
    return torch_bridge.quantize_model(TwoLayers().eval(), scheme="w8a8", smoothing="hadamard")


def outlier_inputs(rng, rows, features, channels=(3, 17)):
    x = rng.standard_normal((rows, features)).astype(np.float32)
    x[:, list(channels)] *= 60.0  # a few channels far above the rest, as LayerNorm's are
    return torch.from_numpy(x)


@pytest.mark.parametrize("scheme,block_size", [("w8a8", -1), ("w4a8", 32), ("w8a8", 32),
                                               ("w8a16", -1), ("w4a16", 32)])
def test_the_rotated_layer_is_the_reference_of_the_rotated_problem(scheme, block_size):
    """The swapped layer stores quantize_weight(W H) exactly, and computes API.md's
    convention on x H (H: the float64 definition above)."""
    torch.manual_seed(0)
    model = TwoLayers().eval()
    original = copy.deepcopy(model)
    torch_bridge.quantize_model(model, scheme=scheme, block_size=block_size,
                                smoothing="hadamard")
    x = outlier_inputs(np.random.default_rng(1), 12, 96)
    for name, in_features in (("up", 96), ("down", 256)):
        layer, float_layer = getattr(model, name), getattr(original, name)
        block = min(64, in_features & -in_features)  # 32 for 96, 64 for 256
        assert int(layer.input_rotation) == block
        h = ref.hadamard_rotation(block, in_features)
        w_rotated = float_layer.weight.detach().double().numpy() @ h
        qw = xla_qops.quantize_weight(w_rotated.astype(np.float32), bits=4 if "w4" in scheme else 8,
                                      block_size=block_size)
        np.testing.assert_array_equal(layer.weight.numpy(), np.asarray(qw.w))
        np.testing.assert_array_equal(layer.weight_scaler.numpy(), np.asarray(qw.scale))
        xin = x if name == "up" else torch.nn.functional.gelu(original.up(x)).detach()
        with torch.no_grad():
            y = layer(xin) - layer.bias
        x_rotated = (xin.double().numpy() @ h).astype(np.float32)
        # The layer rotates in float32: the activation's rounding may fall either side
        # of an int8 tie where float32 and float64 disagree (activation_ties).
        a8 = "a8" in scheme
        ref.assert_close(y.numpy(), x_rotated, np.asarray(qw.w), np.asarray(qw.scale), None,
                         block_size, a8, activation_ties=a8)


def test_rotation_cuts_the_error_of_outlier_channels():
    """Per-token int8 activations with two outlier channels: round to nearest W8A8 loses
    most of the other channels' levels; the rotated layer's output error (against the
    float layer) is less than half (measured 3.5x smaller; with the rotation missing from
    x or from W the error is that of a wrong product, about 100%)."""
    rng = np.random.default_rng(2)
    torch.manual_seed(2)
    layer = torch.nn.Linear(256, 128)
    x = outlier_inputs(rng, 64, 256)
    with torch.no_grad():
        expected = layer(x)
        errors = {}
        for smoothing in (None, "hadamard"):
            model = torch_bridge.quantize_model(torch.nn.Sequential(copy.deepcopy(layer)),
                                                scheme="w8a8", smoothing=smoothing)
            errors[smoothing] = float((model(x) - expected).norm() / expected.norm())
    assert errors["hadamard"] < errors[None] / 2, errors


def test_state_dict_and_checkpoint_round_trip(tmp_path):
    model = rotated_w8a8(3)
    x = torch.randn(5, 96)
    with torch.no_grad():
        expected = model(x)
    state = model.state_dict()
    assert int(state["up.input_rotation"]) == 32 and int(state["down.input_rotation"]) == 64
    assert not any("_hadamard" in k for k in state)  # derived, not saved
    fresh = torch_bridge.quantize_model(TwoLayers().eval(), scheme="w8a8")  # no rotation
    fresh.load_state_dict(state)
    path = tmp_path / "rotated.safetensors"
    save_torch(model, path)
    again = torch_bridge.quantize_model(TwoLayers().eval(), scheme="w8a8")
    again.load_state_dict(load_torch(path)[0])  # the module takes the optional tensor
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
    assert "input_rotation=hadamard(64)" in repr(again.down)


def test_report_says_which_layers_were_rotated():
    model = torch.nn.Sequential(torch.nn.Linear(96, 33), torch.nn.Linear(33, 8))
    torch_bridge.quantize_model(model, scheme="w8a8", smoothing="hadamard")
    report = torch_bridge.quantization_report(model)
    assert report.smoothing == "hadamard"
    texts = {layer.name: layer.input_scale for layer in report.swapped}
    assert texts == {"0": "Hadamard rotation, blocks of 32",
                     "1": "not rotated (in_features=33 is odd)"}
    assert model[1].input_rotation is None
    assert "inputs rotated (Hadamard blocks): 1 of 2 layers" in str(report)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(scheme="w8a8-fp8", smoothing="hadamard"), ValueError,
     "smoothing: 'hadamard' is for the integer schemes"),
    (dict(scheme="w4a16-nvfp4", smoothing="hadamard"), ValueError,
     "smoothing: 'hadamard' is for the integer schemes .* got scheme='w4a16-nvfp4'"),
    (dict(scheme="w8a8", smoothing="hadamard", method="awq+gptq+blockround",
          calibration=[torch.randn(2, 96)]),
     ValueError, "method: smoothing='hadamard' takes one of 'rtn', 'hqq', 'gptq', 'awq', "
                 "'awq\\+gptq', got 'awq\\+gptq\\+blockround'"),
    (dict(scheme="w8a8", smoothing="rotate"), ValueError,
     "smoothing: expected None, 'smoothquant' or 'hadamard', got 'rotate'"),
])
def test_bad_arguments(kwargs, error, message):
    model = TwoLayers()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        torch_bridge.quantize_model(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


@pytest.mark.parametrize("block,error,message", [
    (3, ValueError, r"block: expected a power of two >= 2 dividing in_features=96, got 3"),
    (64, ValueError, r"block: expected a power of two >= 2 dividing in_features=96, got 64"),
    (1, ValueError, r"got 1"),
    (2.0, TypeError, r"block: expected an int, got float"),
])
def test_set_input_rotation_checks_its_block(block, error, message):
    layer = XlaQuantizedLinear.from_float(torch.nn.Linear(96, 8), quantize_activation=True)
    with pytest.raises(error, match=message):
        layer.set_input_rotation(block)
    assert layer.input_rotation is None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_rotated_model_matches_eager(backend):
    """The rotation is torch ops on x (no host sync; the eager path's C++ transform is
    not traced): torch.compile traces it whole, and the compiled model matches eager
    within float32 sums' rounding (the same rotated activations up to their last
    bits; an int8 activation step flip is far above 1e-5 and did not happen)."""
    model = rotated_w8a8(4)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for rows in (7, 9):
            x = torch.randn(rows, 96)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [64, 32])
def test_bf16_inputs_rotate_to_the_float32_rotation_rounded(block):
    """bf16 x multiplies in bf16 where H is exact there (b = 64: entries +-1/8), else in
    float32: both the float32 sum of exact products, rounded once to bf16 -- within one
    bf16 ulp of the float64 rotation rounded to bf16 (the float32 sums' order may flip
    a rounding)."""
    from torch_bridge import rotation
    x = (torch.randn(37, 3 * block) * 5).to(torch.bfloat16)
    h = torch.from_numpy(rotation.hadamard(block)).float()
    got = rotation.rotate_input(x, h)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    exact = x.double().numpy().reshape(-1, block) @ ref.hadamard_rotation(block, block)
    exact = torch.from_numpy(exact.reshape(x.shape))
    ulp = torch.from_numpy(np.spacing(np.abs(exact.to(torch.bfloat16).float().numpy())))
    ulp = ulp * 2 ** 16  # float32 spacing -> bf16 spacing (8 bits of mantissa against 24)
    assert bool(((got.double() - exact).abs() <= ulp.double() + 1e-30).all())


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_calibrated_methods_fit_the_rotated_problem(method):
    """smoothing="hadamard" with GPTQ (and AWQ's clip search before it): the layer's
    method runs on W H with the rotated inputs' X^T X (H^T X^T X H), no per-channel
    input scale; on held-out inputs drawn like the calibration ones its output error is
    below round to nearest's on the same rotated weight (with the Hessian left unrotated
    GPTQ would compensate along the wrong directions)."""
    rng = np.random.default_rng(5)
    torch.manual_seed(5)
    layer = torch.nn.Linear(128, 48)
    mix = rng.standard_normal((128, 128)) * 0.3 + np.eye(128)  # correlated inputs
    def draw(n):
        x = rng.standard_normal((n, 128)) @ mix
        x[:, 7] *= 30.0
        return torch.from_numpy(x.astype(np.float32))
    calibration = [draw(64) for _ in range(5)]
    held_out = draw(256)
    models = {m: torch_bridge.quantize_model(torch.nn.Sequential(copy.deepcopy(layer)),
                                             scheme="w4a8", block_size=32, method=m,
                                             smoothing="hadamard",
                                             calibration=calibration if m != "rtn" else None)
              for m in ("rtn", method)}
    rotated = models[method][0]
    assert int(rotated.input_rotation) == 64 and rotated.input_scale is None  # AWQ: clips only
    report = torch_bridge.quantization_report(models[method])
    assert report.swapped[0].input_scale == "Hadamard rotation, blocks of 64"
    assert f"({report.swapped[0].method}, Hadamard rotation, blocks of 64)" in str(report)
    with torch.no_grad():
        expected = layer(held_out)
        errors = {m: float((model(held_out) - expected).norm() / expected.norm())
                  for m, model in models.items()}
    assert errors[method] < 0.9 * errors["rtn"], errors


@pytest.mark.torch_xla
def test_rotated_model_on_the_xla_device():
    """The rotation's buffers move with the module; on torch_xla's device the layer runs
    the same arithmetic through the fused XLA path: the CPU result within the op's
    float32 tolerance (both quantize the same rotated activations per token)."""
    import torch_xla

    model = rotated_w8a8(6)
    x = torch.randn(5, 96)
    with torch.no_grad():
        expected = model(x)
        device = torch_xla.device()
        model.to(device)
        assert model.up._hadamard.device.type == "xla"
        assert model.up.input_rotation.device.type == "xla"
        got = model(x.to(device)).cpu()
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [64, 32, 2])
def test_the_cpu_kernels_rotation_is_the_float64_one_rounded(dtype, block):
    """The direct CPU path rotates x in C++ (a fast Walsh-Hadamard transform per row,
    float32): within a few float32 ulps of the float64 rotation for float32 x (six
    roundings of partial sums at b = 64), within one unit of the last place of x's
    dtype otherwise; x itself untouched."""
    from torch_bridge import _cpu_ops
    if not _cpu_ops.available():
        pytest.fail("the C++ torch operator is not built")
    x = (torch.randn(3, 5, 2 * block) * 7).to(dtype)
    before = x.clone()
    got = _cpu_ops.hadamard_rows(x, block)
    assert torch.equal(x, before) and got.dtype == dtype and got.shape == x.shape
    exact = x.double().numpy().reshape(-1, block) @ ref.hadamard_rotation(block, block)
    exact = exact.reshape(x.shape)
    err = np.abs(got.double().numpy() - exact)
    # float32 sums: each of the log2(b) stages rounds partial sums of at most
    # b * max|x| (half an ulp each), then 1/sqrt(b) scales them ...
    stages = int(np.log2(block))
    row_max = np.abs(x.double().numpy()).reshape(-1, block).max(1, keepdims=True)
    f32 = stages * np.spacing((block * row_max).astype(np.float32)).astype(np.float64)
    f32 = np.repeat(f32 / np.sqrt(block), block, 1).reshape(x.shape)
    # ... and the result rounds once to x's dtype (half an ulp there).
    ulp_bits = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}[dtype]
    rounding = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64) * 2.0 ** ulp_bits
    bound = f32 + rounding
    assert (err <= bound).all(), float((err - bound).max())


def test_the_cpu_kernels_rotation_checks_its_block():
    from torch_bridge import _cpu_ops
    with pytest.raises(RuntimeError, match="block: expected a power of two >= 2 dividing K=96, got 64"):
        _cpu_ops.hadamard_rows(torch.randn(2, 96), 64)
