"""Adapters on a frozen quantized base (docs/finetuning.md).

1. Gradients with respect to the activation, for every scheme row and every
   available implementation, in JAX (jax.grad) and in torch (autograd, CPU
   tensors and the XLA device): d/dx sum(y * c) = c @ W with W = scale*q - zp
   in float64 (activation quantization is straight-through).
2. The backward multiplies by the quantized weight: its jaxpr never forms the
   dequantized weight scale*q - zp (per-channel; blockwise decode, M <= B).
3. LoRA training: a two-layer model whose linear layers are quantized and
   frozen, plus low-rank float adapters (A, B), learns a synthetic teacher
   (the dequantized base plus a rank-R change) with plain Adam. The loss must
   fall by LOSS_DROP (10x) within STEPS steps, and the quantized tensors must be
   unchanged bit for bit (JAX: trivially, arrays are immutable -- asserted
   anyway; torch: the optimizer and backward run in place, so it is a real check).

The torch half is tests/test_lora_torch.py (it needs torch and torch_xla; this
file runs on the torch-free stack too).
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
import xla_qops
from cases import Scheme
from conftest import expected_impls
from xla_qops import dispatch
from pallas_kernels import jax_compat
from xla_qops.spec import MatmulSpec

K, N, BLOCK = 64, 24, 32
# The eight scheme rows; zero points and packed int4 (the forms the modules store).
SCHEMES = [Scheme(bits, block, False, bits == 4, qa)
           for bits in (8, 4) for block in (-1, BLOCK) for qa in (False, True)]
# Every backend that must exist here (conftest.expected_impls), none dropped
# silently: an expected one that is unavailable fails test_expected_impls_run.
JAX_IMPLS = tuple(n for n in dispatch.BACKENDS if n in expected_impls())

# Training task. LoRA on both layers can represent the teacher exactly; the
# A8 schemes keep an activation-quantization floor far below LOSS_DROP.
D_IN, HIDDEN, D_OUT, RANK, BATCH = 64, 96, 32, 4, 128
STEPS, LR, LOSS_DROP = 60, 3e-2, 10.0
TRAIN_SCHEMES = [Scheme(8, -1, False, False, False), Scheme(4, BLOCK, False, True, False),
                 Scheme(8, BLOCK, True, False, True), Scheme(4, -1, False, True, True)]


def supported(impl, scheme, k=K, n=N, x_dtype="float32"):
    spec = MatmulSpec(in_features=k, out_features=n, block_size=scheme.block_size,
                      bits=scheme.bits, packed=scheme.packed,
                      has_zero_point=not scheme.symmetric,
                      quantize_activation=scheme.quantize_activation, x_dtype=x_dtype)
    return dispatch._module(impl).supports(spec, "cpu")


def quantize(rng, n, k, scheme, std):
    w = rng.standard_normal((n, k)).astype(np.float32) * std
    if not scheme.symmetric:
        w += rng.uniform(-std, std, (n, 1)).astype(np.float32)
    return xla_qops.quantize_weight(w, bits=scheme.bits, block_size=scheme.block_size,
                                    symmetric=scheme.symmetric, pack=scheme.packed)


def dequantized(w, scale, zero_point, scheme):
    """float64 [out, in] from the stored tensors (numpy_reference, not xla_qops)."""
    return ref.dequantize(np.asarray(w), np.asarray(scale),
                          None if zero_point is None else np.asarray(zero_point),
                          scheme.block_size, scheme.packed)


def assert_dx(dx, c, w64):
    """|dx - c @ W| within float32 accumulation over K + N terms (as test_matmul)."""
    dx_ref = c @ w64
    bound = 4 * (w64.shape[1] + w64.shape[0]) * 2.0 ** -24 * (np.abs(c) @ np.abs(w64))
    err = np.abs(np.asarray(dx, np.float64) - dx_ref)
    assert np.all(err <= bound + 2.0 ** -24 * np.abs(dx_ref)), (
        f"max |dx - c @ W| {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}")


# ---------------------------------------------------------------------------
# 1-2. JAX gradients

def test_expected_impls_run():
    missing = [n for n in JAX_IMPLS if not dispatch._module(n).available()]
    assert not missing, f"expected here but unavailable: {missing}"


GRAD_CASES = [(impl, s) for impl in JAX_IMPLS for s in SCHEMES if supported(impl, s)]


@pytest.mark.parametrize("impl,scheme", GRAD_CASES,
                         ids=[f"{i}-{s.id}" for i, s in GRAD_CASES])
def test_jax_grad_with_respect_to_x(impl, scheme):
    rng = np.random.default_rng(0)
    qw = quantize(rng, N, K, scheme, 0.1)
    x = jnp.asarray(rng.standard_normal((5, K)), jnp.float32)
    c = rng.standard_normal((5, N))
    dx = jax.jit(jax.grad(lambda x: jnp.sum(xla_qops.quantized_matmul(
        x, qw, quantize_activation=scheme.quantize_activation, impl=impl) * c)))(x)
    assert_dx(dx, c, dequantized(qw.w, qw.scale, qw.zero_point, scheme))


def float_arrays_of_weight_size(jaxpr, size, out):
    """(primitive, aval) of every float value with >= `size` elements, recursively."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = v.aval
            if (hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.floating)
                    and aval.size >= size):
                out.append((eqn.primitive.name, aval.str_short()))
        for sub in jax_compat.jaxprs_in_params(eqn.params):
            float_arrays_of_weight_size(sub, size, out)
    return out


@pytest.mark.parametrize("scheme", [s for s in SCHEMES], ids=lambda s: s.id)
def test_backward_does_not_dequantize_the_weight(scheme):
    """The VJP's arithmetic on weight-sized float arrays is only the int -> float
    conversion feeding the dot: no multiply by the scale, no zero-point
    subtraction, i.e. scale*q - zp is never formed. (M=5 <= B: blockwise
    prefill, M > B, dequantizes by design, in the forward too; see
    xla_qops/backends/xla.py.)"""
    rng = np.random.default_rng(1)
    qw = quantize(rng, N, K, scheme, 0.1)
    x = jnp.ones((5, K), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(xla_qops.quantized_matmul(
        x, qw, quantize_activation=scheme.quantize_activation, impl="xla"))))(x)
    big = float_arrays_of_weight_size(jaxpr.jaxpr, qw.w.size, [])
    assert big, "expected the int -> float conversion of the weight"
    assert {prim for prim, _ in big} == {"convert_element_type"}, big


# ---------------------------------------------------------------------------
# 3. JAX LoRA training

def task(scheme, seed=0):
    """Frozen quantized layers with frozen biases, and a teacher: the dequantized
    base plus a rank-RANK change of each weight, same biases.

    Returns (qw1, qw2, (bias1, bias2), x, y, a1, a2); a1, a2 are the adapters'
    initial A (B starts at zero, so the student starts as the base)."""
    rng = np.random.default_rng(seed)
    qw1 = quantize(rng, HIDDEN, D_IN, scheme, D_IN ** -0.5)
    qw2 = quantize(rng, D_OUT, HIDDEN, scheme, HIDDEN ** -0.5)
    teacher = []
    for qw, (n, k) in ((qw1, (HIDDEN, D_IN)), (qw2, (D_OUT, HIDDEN))):
        delta = rng.standard_normal((n, RANK)) @ rng.standard_normal((RANK, k))
        teacher.append(dequantized(qw.w, qw.scale, qw.zero_point, scheme)
                       + 0.5 * delta / np.sqrt(RANK * k))
    biases = (rng.standard_normal(HIDDEN).astype(np.float32) * 0.1,
              rng.standard_normal(D_OUT).astype(np.float32) * 0.1)
    x = rng.standard_normal((BATCH, D_IN)).astype(np.float32)
    y = np.tanh(x @ teacher[0].T + biases[0]) @ teacher[1].T + biases[1]
    a1 = (rng.standard_normal((RANK, D_IN)) * D_IN ** -0.5).astype(np.float32)
    a2 = (rng.standard_normal((RANK, HIDDEN)) * HIDDEN ** -0.5).astype(np.float32)
    return qw1, qw2, biases, x, y.astype(np.float32), a1, a2


def jax_forward(lora, qw1, qw2, biases, x, qa, impl):
    def layer(x, qw, bias, a, b):
        base = xla_qops.quantized_matmul(x, qw, quantize_activation=qa, impl=impl) + bias
        return base + (x @ a.T) @ b.T
    h = jnp.tanh(layer(x, qw1, biases[0], lora["a1"], lora["b1"]))
    return layer(h, qw2, biases[1], lora["a2"], lora["b2"])


@functools.partial(jax.jit, static_argnames=("qa", "impl"))
def jax_train(lora, qw1, qw2, biases, x, y, *, qa, impl):
    """STEPS of Adam on the adapters only; returns (adapters, loss per step)."""
    def loss_fn(lora):
        return jnp.mean((jax_forward(lora, qw1, qw2, biases, x, qa, impl) - y) ** 2)

    def step(state, t):
        lora, m, v = state
        loss, g = jax.value_and_grad(loss_fn)(lora)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
        lr = LR * jnp.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        lora = jax.tree.map(lambda p, m, v: p - lr * m / (jnp.sqrt(v) + 1e-8), lora, m, v)
        return (lora, m, v), loss

    zeros = jax.tree.map(jnp.zeros_like, lora)
    (lora, _, _), losses = jax.lax.scan(step, (lora, zeros, zeros),
                                        jnp.arange(1, STEPS + 1, dtype=jnp.float32))
    return lora, losses


@pytest.mark.parametrize("scheme", TRAIN_SCHEMES, ids=lambda s: s.id)
def test_jax_lora_learns_on_frozen_quantized_base(scheme):
    qw1, qw2, biases, x, y, a1, a2 = task(scheme)
    frozen = [np.array(leaf) for leaf in jax.tree.leaves((qw1, qw2))]
    lora = dict(a1=jnp.asarray(a1), b1=jnp.zeros((HIDDEN, RANK)),
                a2=jnp.asarray(a2), b2=jnp.zeros((D_OUT, RANK)))
    lora, losses = jax_train(lora, qw1, qw2, biases, jnp.asarray(x), jnp.asarray(y),
                             qa=scheme.quantize_activation, impl="auto")
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert losses[-1] * LOSS_DROP <= losses[0], (losses[0], losses[-1])
    for before, after in zip(frozen, jax.tree.leaves((qw1, qw2))):
        np.testing.assert_array_equal(before, np.asarray(after))
        assert before.dtype == after.dtype


def test_finetuning_doc_jax_example_runs():
    """docs/finetuning.md's JAX block, as written: plain SGD on a LoRA adapter."""
    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "finetuning.md").read_text()
    namespace = {}
    exec(compile(re.findall(r"```python\n(.*?)```", text, re.S)[0], "finetuning.md", "exec"),
         namespace)
    losses = namespace["losses"]
    assert np.isfinite(losses).all() and losses[-1] * LOSS_DROP <= losses[0], losses[::20]
