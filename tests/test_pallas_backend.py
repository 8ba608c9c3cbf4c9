"""xla_qops.quantized_matmul(..., impl="pallas") on this CPU machine: the TPU
kernel body in interpret mode behind the public API (leading dims,
QuantizedWeight, jit, vmap, grad), and the backend's supports() table.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_qops
from cases import Scheme, make_weight, make_x, op_args
import numpy_reference as ref
from xla_qops.backends import pallas as backend
from xla_qops.spec import MatmulSpec

CORE = [Scheme(8, -1, False, False, False), Scheme(4, 128, False, True, False),
        Scheme(8, 128, True, False, True), Scheme(4, -1, False, True, True),
        Scheme(4, 64, True, False, False)]  # last: int4 unpacked in an int8 container


def check(y, x, qw, qa):
    assert y.dtype == x.dtype
    ref.assert_close(y, x, qw.w, qw.scale, qw.zero_point, qw.block_size, qa)


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("scheme", CORE, ids=lambda s: s.id)
def test_impl_pallas_public_api(scheme, x_dtype):
    rng = np.random.default_rng(0)
    qw = make_weight(rng, n=136, k=256, scheme=scheme)
    x = make_x(rng, (2, 3, 256), x_dtype)
    y = xla_qops.quantized_matmul(x, *op_args(qw), scheme.quantize_activation, impl="pallas")
    assert y.shape == (2, 3, 136)
    check(y.reshape(6, 136), x.reshape(6, 256), qw, scheme.quantize_activation)


def test_quantized_weight_argument_jit_vmap_grad():
    rng = np.random.default_rng(1)
    scheme = Scheme(4, 128, False, True, False)
    qw = make_weight(rng, n=128, k=256, scheme=scheme)
    xs = make_x(rng, (3, 4, 256), "float32")
    f = jax.jit(jax.vmap(lambda x: xla_qops.quantized_matmul(x, qw, impl="pallas")))
    ys = f(xs)
    for x, y in zip(xs, ys):
        check(y, x, qw, False)
    # grad w.r.t. x goes through the custom VJP (fused-XLA backward): it
    # must equal the gradient of the float formula, sum(x @ W.T) -> colsum(W).
    g = jax.grad(lambda x: xla_qops.quantized_matmul(x, qw, impl="pallas").sum())(xs[0])
    w_float = np.asarray(qw.dequantize(), np.float64)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(w_float.sum(0), g.shape),
                               rtol=1e-5, atol=1e-5)


def test_no_rows():
    rng = np.random.default_rng(2)
    qw = make_weight(rng, n=128, k=256, scheme=Scheme(8, -1, True, False, False))
    y = xla_qops.quantized_matmul(jnp.zeros((0, 256), jnp.bfloat16), qw, impl="pallas")
    assert y.shape == (0, 128) and y.dtype == jnp.bfloat16


def test_auto_on_cpu_keeps_the_cpu_path():
    """impl="auto" never runs the (slow) interpret-mode kernel on the CPU."""
    rng = np.random.default_rng(3)
    qw = make_weight(rng, n=128, k=256, scheme=Scheme(4, 128, False, True, False))
    x = make_x(rng, (4, 256), "bfloat16")
    def lowered(impl):  # with source locations, which name the kernel files
        fn = jax.jit(lambda x: xla_qops.quantized_matmul(x, qw, impl=impl))
        return fn.lower(x).as_text(debug_info=True)

    assert "pallas_kernels" not in lowered("auto")
    assert "pallas_kernels" in lowered("pallas")


def spec(block_size=-1, packed=False, qa=False):
    return MatmulSpec(in_features=4096, out_features=4096, block_size=block_size,
                      bits=4 if packed else 8, packed=packed, has_zero_point=True,
                      quantize_activation=qa, x_dtype="bfloat16")


def test_supports_table():
    assert backend.available()
    for platform in ("tpu", "cpu", "cuda", "gpu"):
        assert backend.supports(spec(), platform)
        assert backend.supports(spec(128, True, True), platform)
    assert not backend.supports(spec(), "rocm")
    # Blockwise rows must fill sublanes (TPU) / be a power of 2 >= 16 (Triton).
    assert backend.supports(spec(48, True), "tpu") and not backend.supports(spec(48, True), "cuda")
    assert not backend.supports(spec(12), "tpu") and not backend.supports(spec(12), "cuda")
    assert not backend.supports(spec(16, True), "cuda")  # B/2 = 8 < 16
    with pytest.raises(ValueError, match="platform: the pallas backend has kernels for"):
        backend.matmul(None, None, None, None, spec(), "rocm")


def _pallas_grids(fn, *args):
    """The grid of every pallas_call in fn's jaxpr."""
    from pallas_kernels import jax_compat

    grids = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids.append(tuple(eqn.params["grid_mapping"].grid))
            for sub in jax_compat.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


@pytest.mark.parametrize("scheme", [Scheme(8, -1, False, False, False),
                                    Scheme(4, -1, True, True, True)], ids=lambda s: s.id)
def test_override_tiles_reach_the_kernel_with_partial_weight_blocks(scheme):
    """Tiles set per call through block_sizes.override_tiles (public API, the
    interpreted TPU kernel): K = 4544 (Falcon-7B's hidden size, no multiple of
    128) and N = 300 in 512 x 128 tiles, so the weight's last block is partial
    along both -- and the result is still right."""
    from pallas_kernels import block_sizes

    rng = np.random.default_rng(7)
    qw = make_weight(rng, n=300, k=4544, scheme=scheme)
    x = make_x(rng, (5, 4544), "bfloat16")
    qa = scheme.quantize_activation

    def f(x):
        return xla_qops.quantized_matmul(x, qw, quantize_activation=qa, impl="pallas")

    tk = 512 * (2 if scheme.packed else 1)
    with block_sizes.override_tiles(tpu=dict(tn=128, tk=tk)):
        grids = _pallas_grids(f, x)
        y = f(x)
    # The TPU kernel's grid (M, N, K) in the cpu (interpret) and tpu branches;
    # the cuda branch's Triton grid is 2-D.
    tpu_grids = {g for g in grids if len(g) == 3}
    assert tpu_grids == {(1, 3, -(-4544 // tk))}, grids
    check(y, x, qw, qa)
    # Outside the block, a new trace gets the rule's tiles again (a function
    # traced inside it keeps its tiles: make_jaxpr(f) would hit its cache).
    assert {g for g in _pallas_grids(lambda x: f(x), x) if len(g) == 3} == {(1, 1, 1)}
