"""The float element formats (API.md section 7) split over 8 virtual CPU devices.

fp8 weights per-channel and blockwise, W8A8-fp8 (activation_format "fp8"), MX
fp4 (B = 32, power-of-two scales), NV fp4 (B = 16) with and without fp8
activations, and int4 weights with fp8 activations, through the layouts the
int rows take in tests/test_sharding.py, with its assertions:

* `sharding.sharded_quantized_matmul` column (split ``out``: bit for bit one
  device on the same rows) and row (split ``in``: float32 partials
  all-reduced, checked against the float64 reference with its tolerance;
  per-channel fp8 activations take the token maxima across the shards, so
  every shard rounds to the single-device e4m3 values), on a 2x4 and a 1x8
  mesh, with no all-gather in the compiled HLO;
* plain `jax.jit` on sharded operands (`xla_qops.partitioning`): the weight
  replicated, column and row, on every impl the int rows run there;
* gradients with respect to x, sharded and on one device, equal c @ W_dequant
  in float64;
* an fp4 split the kernels cannot honour is resharded under plain jit (and
  stays right), and refused up front by the sharding helpers.

One subprocess (tests/spmd_child.py --formats) runs every case; this process
asserts.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

import spmd_child
from spmd_child import FloatScheme
from test_sharding import (IMPLS, assert_gradient_is_c_times_w, check_fallback,
                           check_plain_hlo, check_plain_matmul, check_sharded_hlo,
                           check_sharded_matmul, load, run_spmd_child)
import xla_qops
from xla_qops import sharding
from xla_qops.quantize import QuantizedWeight

CASES = spmd_child.float_cases(IMPLS)
PLAIN = spmd_child.float_plain_cases(IMPLS)


@pytest.fixture(scope="module")
def formats_run(tmp_path_factory):
    return run_spmd_child(tmp_path_factory.mktemp("spmd_formats"), "--formats", *IMPLS)


def test_every_impl_and_float_row_is_covered():
    """Each impl runs the core float rows in both layouts (none dropped
    silently by `supported`), and the host kernels run every row."""
    for impl in IMPLS:
        ran = {(c.scheme, c.layout) for c in CASES if c.impl == impl and not c.grad}
        schemes = spmd_child.FLOAT_SCHEMES if impl == "custom_call" else spmd_child.FLOAT_CORE
        assert ran >= {(s, lay) for s in schemes for lay in sharding.LAYOUTS}, impl
        assert any(c.grad for c in CASES if c.impl == impl), impl


@pytest.mark.parametrize("case", [c for c in CASES if not c.grad], ids=lambda c: c.id)
def test_sharded_float_formats_match_the_reference(formats_run, case):
    out, hlo = formats_run
    check_sharded_matmul(load(out, case.id), case)
    check_sharded_hlo(hlo[case.id], case)


@pytest.mark.parametrize("case", [c for c in CASES if c.grad], ids=lambda c: c.id)
def test_sharded_float_gradient_with_respect_to_x(formats_run, case):
    out, _ = formats_run
    rec = load(out, case.id)
    for name in ("dx_single", "dx_sharded"):
        assert_gradient_is_c_times_w(rec, case.scheme, name)


@pytest.mark.parametrize("case", [c for c in PLAIN if not c.grad], ids=lambda c: c.id)
def test_plain_jit_float_formats_match_the_reference(formats_run, case):
    out, hlo = formats_run
    check_plain_matmul(load(out, case.id), case)
    check_plain_hlo(hlo[case.id], out, case)


@pytest.mark.parametrize("case", [c for c in PLAIN if c.grad], ids=lambda c: c.id)
def test_plain_jit_float_gradient_with_respect_to_x(formats_run, case):
    out, _ = formats_run
    assert_gradient_is_c_times_w(load(out, case.id), case.scheme, "dx_sharded")


@pytest.mark.skipif("custom_call" not in IMPLS, reason="custom_call backend not built here")
@pytest.mark.parametrize("name", spmd_child.FLOAT_FALLBACKS)
def test_plain_jit_fp4_fallback_reshards_and_stays_exact(formats_run, name):
    out, hlo = formats_run
    check_fallback(out, hlo, name, spmd_child.FLOAT_FALLBACKS[name])


# ---- layouts the float formats cannot take (this process, no devices needed) ----

def _per_channel_fp4(n, k):
    """A per-channel fp4 weight (API.md section 7 allows one; the quantizers
    make MX/NV blocks), codes of +1.0 (0b0010) in both nibbles."""
    return QuantizedWeight(w=jnp.full((n, k // 2), 0x22, jnp.uint8),
                           scale=jnp.ones((n,), jnp.float32), zero_point=None, bits=4,
                           block_size=-1, packed=True, format="fp4")


def _quantized(fmt, n, k, block_size):
    w = np.random.default_rng(5).standard_normal((n, k)).astype(np.float32)
    return xla_qops.quantize_weight(w, format=fmt, block_size=block_size)


@pytest.mark.parametrize("qw, mesh, layout, match", [
    # 8 devices over in=128: 16 features each, inside one MX block of 32.
    (lambda: _quantized("mxfp4", 8, 128, 32), (1, 8), "row",
     r"qw: row-parallel blockwise splits whole blocks over the 8 devices of mesh axis "
     r"'model'; in/B = 128/32 = 4 blocks must be a multiple of 8"),
    (lambda: _quantized("nvfp4", 8, 48, 16), (2, 4), "row",
     r"in/B = 48/16 = 3 blocks must be a multiple of 4"),
    # 20 input features over 4: 5 per shard, so a byte of two codes would straddle.
    (lambda: _per_channel_fp4(8, 20), (2, 4), "row",
     r"packed fp4 \(e2m1 codes\) stores two input features per byte.*in=20, 5 per shard"),
    (lambda: _quantized("fp8", 10, 64, -1), (2, 4), "column",
     r"column-parallel splits out=10 over the 4 devices of mesh axis 'model'"),
])
def test_float_layout_that_does_not_divide_is_refused_before_any_work(qw, mesh, layout, match):
    qw = qw()
    mesh = AbstractMesh(mesh, ("data", "model"))
    with pytest.raises(ValueError, match=match):
        sharding.check_layout(qw, mesh, layout, "model")
    x = jnp.zeros((2, qw.in_features), jnp.float32)
    with pytest.raises(ValueError, match=match):
        sharding.sharded_quantized_matmul(x, qw, mesh, layout)


def test_sharded_helper_checks_the_float_formats_as_the_op_does():
    """The helper validates the activation format in the op's one place
    (xla_qops.spec) before any work: an unknown name, or one without
    quantize_activation, is refused naming the argument."""
    qw = _quantized("nvfp4", 8, 64, 16)
    mesh = AbstractMesh((2, 4), ("data", "model"))
    x = jnp.zeros((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="activation_format: expected None or one of "
                                         "'int8', 'fp8', got 'e4m3'"):
        sharding.sharded_quantized_matmul(x, qw, mesh, "column", quantize_activation=True,
                                          activation_format="e4m3")
    with pytest.raises(ValueError, match="activation_format: applies with "
                                         "quantize_activation=True"):
        sharding.sharded_quantized_matmul(x, qw, mesh, "column", activation_format="fp8")


def test_float_scheme_rows_name_their_formats():
    """The case ids the child writes are distinct and say the formats."""
    ids = [s.id for s in spmd_child.FLOAT_SCHEMES]
    assert len(set(ids)) == len(ids)
    assert FloatScheme("fp8", -1, "fp8").id == "w8a8-fp8-pc"
    assert FloatScheme("nvfp4", 16).id == "w4a16-nvfp4-g16"
    assert spmd_child.reference_formats(FloatScheme("mxfp4", 32)) == dict(
        weight_format="fp4", activation_format=None)
