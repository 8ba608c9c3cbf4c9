"""The host-CPU C++ kernels (impl="custom_call") against the float64 reference.

Shapes are chosen to hit every code path of csrc/ (docs/cpu_kernels.md):
per-channel decode in dot-product form (M*T <= 16 prepared rows, x in K
chunks that stay in L1), blockwise decode (M*T <= 4, K slices summed in
order), the panel + microkernel path (everything else), several k-chunks per
panel, tails in M,
N and K that are not multiples of the kernels' tiles, odd block sizes, and
the portable kernels (XLA_QOPS_CPU_ISA=generic, in a subprocess).

The file is skipped only where the build does not make the kernels
(conftest.cpu_kernels_expected: not x86-64); on x86-64 a missing or
unimportable extension fails every test here, and
test_extension_loads_from_the_installed_package says why.
"""

import concurrent.futures
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_qops
from xla_qops import dispatch
from xla_qops.backends import custom_call
from xla_qops.spec import check_args
from cases import (X_DTYPES, Scheme, all_schemes, assert_same_at_every_thread_count,
                   make_weight, make_x, op_args)
import numpy_reference as ref
from conftest import (cpu_kernels_expected, import_error, isa_expected, run_under_isa,
                      run_with_env)

pytestmark = pytest.mark.skipif(not cpu_kernels_expected() and not custom_call.available(),
                                reason="xla_qops._cpu_kernels is not built on this platform")

SCHEMES = all_schemes(block_size=32)


def run(x, qw, scheme):
    return xla_qops.quantized_matmul(x, *op_args(qw), scheme.quantize_activation,
                                     impl="custom_call")


def check(y, x, qw, scheme):
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (qw.out_features,)
    ref.assert_close(y, x, qw.w, qw.scale, qw.zero_point, qw.block_size,
                     scheme.quantize_activation)


def test_extension_loads_from_the_installed_package():
    error = import_error("xla_qops._cpu_kernels")
    assert error is None, f"xla_qops._cpu_kernels does not import: {error!r}"
    from xla_qops import _cpu_kernels
    assert custom_call.available()
    assert custom_call.TARGET in _cpu_kernels.registrations()
    assert custom_call.isa() in ("avx512", "avx2", "generic")
    features = _cpu_kernels.cpu_features()
    if custom_call.isa() == "avx512":
        assert features["avx512_bf16"] and features["avx512_vnni"]
    if custom_call.isa() == "avx2":
        assert features["avx2"]
    # The CPU's best set, never the portable one where a vector set runs.
    assert custom_call.isa() == isa_expected(), features
    assert custom_call.num_threads() >= 1


def test_auto_uses_the_kernels_on_cpu():
    rng = np.random.default_rng(0)
    qw = make_weight(rng, 8, 32, Scheme(4, 16, False, True, False))
    x = make_x(rng, (2, 32), "bfloat16")
    spec = check_args(x, *op_args(qw), False)
    assert dispatch.auto_choice(spec, "cpu") == "custom_call"
    assert custom_call.supports(spec, "cpu") and not custom_call.supports(spec, "tpu")


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.id)
def test_every_scheme_and_dtype(scheme, x_dtype):
    rng = np.random.default_rng(1)
    qw = make_weight(rng, n=67, k=96, scheme=scheme)
    for m in (1, 3, 11):  # dot-product decode (per-channel, bf16) ... panel path
        x = make_x(rng, (m, 96), x_dtype)
        check(run(x, qw, scheme), x, qw, scheme)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.id)
def test_tails_and_chunks(scheme):
    """N and K not multiples of 64 / 128, several k-chunks per panel, leading dims."""
    rng = np.random.default_rng(2)
    k = 640 if scheme.block_size == -1 else 160  # per-channel: 3 A16 / 2 A8 chunks
    qw = make_weight(rng, n=130, k=k, scheme=scheme)
    for shape in ((2, 4, k), (9, k), (1, k)):
        x = make_x(rng, shape, "bfloat16")
        check(run(x, qw, scheme), x, qw, scheme)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.block_size == -1], ids=lambda s: s.id)
def test_dot_form_k_chunks(scheme):
    """Per-channel decode with up to 16 prepared rows: K = 2304 spans two or
    three x chunks (32 KiB of x each), the last one partial."""
    rng = np.random.default_rng(8)
    qw = make_weight(rng, n=70, k=2304, scheme=scheme)
    for m, x_dtype in ((16, "bfloat16"), (5, "float32"), (9, "float16")):
        x = make_x(rng, (m, 2304), x_dtype)
        check(run(x, qw, scheme), x, qw, scheme)


@pytest.mark.parametrize("m, x_dtype", [(1, "bfloat16"), (4, "bfloat16"), (16, "bfloat16"),
                                        (5, "float32"), (20, "bfloat16")])
def test_every_int8_value_decodes_exactly(m, x_dtype):
    """The per-channel W8A16 decode turns int8 into bf16 by table lookups with
    -128 set apart (Int8Decoder; a quantizer seldom makes -128, so the random
    weights above may never hold it): every int8 value in every weight row,
    x one-hot (one product per output, scale 1), so each output must be the
    weight value, bit for bit. K = 200: three 64-feature steps and a masked
    tail of 8; -128 at feature 0 of some rows (x's first row reads feature
    0). The dot form: M = 1 (its int8 conversions), M = 4, 16 and 5 float32
    rows (T = 3: 15 prepared rows; the lookups); M = 20 the panel path."""
    rng = np.random.default_rng(3)
    k, n = 200, 300
    values = np.arange(-128, 128, dtype=np.int8)
    w = np.stack([np.resize(rng.permutation(values), k) for _ in range(n)])  # [out, in]
    w[::3, 0] = -128
    cols = rng.choice(k, m, replace=False)
    cols[0] = 0
    x = np.zeros((m, k), np.float32)
    x[np.arange(m), cols] = 1.0
    y = xla_qops.quantized_matmul(jnp.asarray(x, x_dtype), jnp.asarray(w),
                                  jnp.ones((n,), jnp.float32), impl="custom_call")
    np.testing.assert_array_equal(np.asarray(y, np.float32), w[:, cols].T.astype(np.float32))


@pytest.mark.parametrize("scheme", [Scheme(4, 128, True, True, False), Scheme(4, 128, False, True, False),
                                    Scheme(4, 32, True, True, False)], ids=lambda s: s.id)
def test_int4_decode_accuracy_worst_cases(scheme):
    """The blockwise int4 A16 decode with bf16 activations (the register form,
    1-4 rows, and the wide form, 5-16) on two worst cases for float32 sums: x
    spanning 2^-12 .. 2^12 within every group, and an outlier feature 2^12 times
    the rest whose weight is 0 in every column. Tolerance: the reference's own
    (tests/numpy_reference.py: bf16 output rounding plus float32 sums of the
    terms x (s q - z)). An unpack that adds a bias to the weights' images and
    takes it off per group (an "offset form", 1.5 + q/16 as bf16: tried, commit
    e6258ba) fails the outlier case by up to 13x: its sums carry 1.5 x_outlier
    where the true term is 0."""
    rng = np.random.default_rng(15)
    k, n = 512, 130
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    outlier = 200
    w[:, outlier] = 0.0  # q = 0 there (the symmetric schemes; asymmetric: q of -zp / s)
    qw = xla_qops.quantize_weight(w, bits=4, block_size=scheme.block_size,
                                  symmetric=scheme.symmetric, pack=True)
    for m in (1, 3, 4, 5, 16):
        wide = rng.standard_normal((m, k)) * 2.0 ** rng.uniform(-12, 12, (m, k))
        spike = rng.standard_normal((m, k))
        spike[:, outlier] = 4096.0
        for x in (wide, spike):
            x = jnp.asarray(x.astype(np.float32), jnp.bfloat16)
            y = np.asarray(run(x, qw, scheme), np.float64)
            want = ref.quantized_matmul(x, qw.w, qw.scale, qw.zero_point, qw.block_size)
            rounding, accumulation = ref.tolerance_parts(x, qw.w, qw.scale, qw.zero_point,
                                                         qw.block_size, x.dtype)
            err = np.abs(y - want)
            tol = rounding + accumulation
            assert (err <= tol).all(), (m, float((err / tol).max()))


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.block_size != -1], ids=lambda s: s.id)
def test_blockwise_decode_slices(scheme):
    """Blockwise decode (M*T <= 16; the register form up to 4 rows, the wide
    form beyond): K = 40 blocks of 32, cut into 8 slices of 5 blocks whose
    partial sums are added in order; N not a multiple of 64."""
    rng = np.random.default_rng(9)
    qw = make_weight(rng, n=100, k=1280, scheme=scheme)
    for m, x_dtype in ((1, "bfloat16"), (4, "bfloat16"), (2, "float16"), (1, "float32"),
                       (5, "bfloat16"), (16, "bfloat16"), (7, "float16"), (5, "float32")):
        x = make_x(rng, (m, 1280), x_dtype)
        check(run(x, qw, scheme), x, qw, scheme)


@pytest.mark.parametrize("scheme", [Scheme(4, 32, False, True, True), Scheme(4, 32, True, False, True),
                                    Scheme(8, 32, False, False, True), Scheme(4, 6, False, True, True),
                                    Scheme(8, 6, True, False, True), Scheme(8, 5, False, False, True),
                                    Scheme(4, 32, True, True, False), Scheme(8, 32, False, False, False)],
                         ids=lambda s: s.id)
@pytest.mark.parametrize("groups", [40, 2])
def test_blockwise_decode_slices_and_column_blocks(scheme, groups):
    """Blockwise decode, A8 (M <= 16) and A16 (M*T <= 16), N = 2200 (not a
    multiple of 64): 40 groups make 16 K slices of 2-3 groups; 2 groups make 2
    slices, each cut into column blocks so that both threads have work; groups
    whose last quad of k is partly outside the group (B = 6, 5); row counts
    of the register form (<= 4) and of the wide form's row groups (5; 11 =
    6 + 5; 12 = 6 + 6; 16 = 6 + 5 + 5)."""
    rng = np.random.default_rng(10)
    k = groups * scheme.block_size
    qw = make_weight(rng, n=2200, k=k, scheme=scheme)
    for m, x_dtype in ((1, "bfloat16"), (2, "float32"), (3, "float16"), (4, "bfloat16"),
                       (5, "bfloat16"), (11, "bfloat16"), (6, "float16"), (16, "bfloat16")):
        x = make_x(rng, (m, k), x_dtype)
        check(run(x, qw, scheme), x, qw, scheme)


@pytest.mark.parametrize("scheme", [Scheme(4, 96, False, True, False), Scheme(4, 256, True, True, False),
                                    Scheme(8, 96, False, False, False), Scheme(4, 96, False, True, True),
                                    Scheme(4, 256, True, True, True), Scheme(8, 96, True, False, True)],
                         ids=lambda s: s.id)
def test_blockwise_wide_form_sweeps(scheme):
    """The wide form's sweeps (32 k-pairs, or 4 quads for A8) against the
    group: 96 = one whole sweep and a partial one, 256 = four whole sweeps;
    its prefetch runs past the block's last tile into the next sweep."""
    rng = np.random.default_rng(12)
    k = 6 * scheme.block_size
    qw = make_weight(rng, n=300, k=k, scheme=scheme)
    for m, x_dtype in ((5, "bfloat16"), (9, "bfloat16"), (16, "bfloat16"), (5, "float32")):
        x = make_x(rng, (m, k), x_dtype)
        check(run(x, qw, scheme), x, qw, scheme)


@pytest.mark.parametrize("scheme", [Scheme(4, 32, True, True, False), Scheme(8, 32, False, False, False),
                                    Scheme(4, 32, False, True, True), Scheme(8, 32, True, False, True)],
                         ids=lambda s: s.id)
def test_blockwise_decode_column_blocks_within_a_task(scheme):
    """N = 33000 (an lm_head's width): each K slice's columns are cut into
    blocks inside the kernel (the register form's accumulators: 512 tiles at
    1 row, 128 at 4; the wide form's prefetched sweep: 64 tiles of int4, 32 of
    int8), the last block short."""
    rng = np.random.default_rng(13)
    qw = make_weight(rng, n=33000, k=64, scheme=scheme)
    for m in (1, 4, 5, 16):
        x = make_x(rng, (m, 64), "bfloat16")
        check(run(x, qw, scheme), x, qw, scheme)


@pytest.mark.parametrize("scheme", [
    Scheme(8, -1, False, False, False), Scheme(8, -1, True, False, True),
    Scheme(8, 3, False, False, False), Scheme(8, 5, True, False, True),
    Scheme(4, 6, False, True, True), Scheme(4, 6, True, True, False),
    Scheme(4, 3, False, False, False)], ids=lambda s: s.id)
@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
def test_odd_sizes(scheme, x_dtype):
    """Odd K (per-channel int8), odd or tiny block sizes (padding inside a group)."""
    rng = np.random.default_rng(3)
    k = 37 if (scheme.block_size == -1 and not scheme.packed) else (
        30 if scheme.block_size == -1 else 5 * scheme.block_size)
    qw = make_weight(rng, n=19, k=k, scheme=scheme)
    for m in (1, 2, 7):
        x = make_x(rng, (m, k), x_dtype)
        check(run(x, qw, scheme), x, qw, scheme)


@pytest.mark.parametrize("scheme", [
    Scheme(4, 32, False, True, False), Scheme(8, -1, False, False, True),
    Scheme(8, -1, True, False, False)], ids=lambda s: s.id)
def test_m_1023(scheme):
    rng = np.random.default_rng(4)
    qw = make_weight(rng, n=72, k=64, scheme=scheme)
    x = make_x(rng, (1023, 64), "float16")
    check(run(x, qw, scheme), x, qw, scheme)


def test_empty_m():
    rng = np.random.default_rng(5)
    scheme = Scheme(8, -1, True, False, False)
    qw = make_weight(rng, n=8, k=32, scheme=scheme)
    y = run(jnp.zeros((0, 32), jnp.float32), qw, scheme)
    assert y.shape == (0, 8)


def test_extreme_activation_magnitudes():
    """Rows of tiny (subnormal-range) or huge values: the kernels scale each row
    by a power of two, so bf16 terms never fall into the range vdpbf16ps flushes."""
    rng = np.random.default_rng(6)
    for scheme in (Scheme(8, -1, False, False, False), Scheme(4, 32, False, True, False)):
        qw = make_weight(rng, n=40, k=64, scheme=scheme)
        x = rng.standard_normal((4, 64)).astype(np.float32)
        x[0] *= 1e-39
        x[1] *= 1e30
        x[2, :32] *= 1e-30
        x = jnp.asarray(x)
        check(run(x, qw, scheme), x, qw, scheme)


NAN_ROW_SCHEMES = [Scheme(8, -1, True, False, False), Scheme(4, 32, False, True, False),
                   Scheme(8, -1, True, False, True), Scheme(4, 32, True, True, True)]


def nan_rows_check(run_impl, scheme, rng):
    """A NaN in x makes its row NaN and an inf its row non-finite (API.md's formula
    in float64 does), the other rows are untouched; for every impl."""
    qw = make_weight(rng, n=40, k=64, scheme=scheme)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[1, 5], x[2, 7] = np.nan, np.inf
    y = np.asarray(run_impl(jnp.asarray(x, jnp.bfloat16), qw), np.float32)
    assert np.isnan(y[1]).all() and not np.isfinite(y[2]).all()
    assert np.isfinite(y[[0, 3]]).all()


@pytest.mark.parametrize("scheme", NAN_ROW_SCHEMES, ids=lambda s: s.id)
@pytest.mark.parametrize("impl", ["custom_call", "xla"])
def test_nan_and_inf_stay_in_their_rows(scheme, impl):
    nan_rows_check(lambda x, qw: xla_qops.quantized_matmul(
        x, *op_args(qw), scheme.quantize_activation, impl=impl), scheme,
        np.random.default_rng(11))


def test_packed_and_unpacked_int4_are_identical():
    rng = np.random.default_rng(7)
    for block in (-1, 32):
        for qa in (False, True):
            scheme = Scheme(4, block, False, True, qa)
            qw = make_weight(rng, n=48, k=128, scheme=scheme)
            for m in (1, 20):
                x = make_x(rng, (m, 128), "bfloat16")
                a = run(x, qw, scheme)
                b = run(x, qw.unpack(), scheme)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmap_over_x_and_over_weights():
    rng = np.random.default_rng(8)
    scheme = Scheme(4, 32, False, True, False)
    layers = [make_weight(rng, n=40, k=64, scheme=scheme) for _ in range(3)]
    xs = make_x(rng, (3, 5, 64), "bfloat16")
    f = jax.jit(lambda x, qw: run(x, qw, scheme))
    # Only x batched: folded into M.
    y = jax.vmap(f, in_axes=(0, None))(xs, layers[0])
    check(y, xs, layers[0], scheme)
    # x and weights batched: one problem per batch element.
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    ys = jax.vmap(f)(xs, stacked)
    for i, qw in enumerate(layers):
        check(ys[i], xs[i], qw, scheme)
    # Weights batched, x shared.
    ys = jax.vmap(f, in_axes=(None, 0))(xs[0], stacked)
    for i, qw in enumerate(layers):
        check(ys[i], xs[0], qw, scheme)


def _results(fn, args):
    return [np.asarray(fn(*a)) for a in args]


def _mixed_cases(rng):
    cases = []
    for scheme in (Scheme(4, 32, False, True, False), Scheme(8, -1, True, False, True),
                   Scheme(8, -1, False, False, False), Scheme(4, -1, True, True, True)):
        qw = make_weight(rng, n=200, k=256, scheme=scheme)
        for m in (1, 4, 12, 40):  # blockwise decode / dot form / panels
            x = make_x(rng, (m, 256), "bfloat16")
            cases.append((x, qw, scheme))
    return cases


def test_results_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(9)
    cases = _mixed_cases(rng)
    assert_same_at_every_thread_count(run, cases)
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        custom_call.set_num_threads(0)


def test_concurrent_calls_from_threads_give_identical_results():
    rng = np.random.default_rng(10)
    cases = _mixed_cases(rng)
    fns = [jax.jit(lambda x, qw, s=c[2]: run(x, qw, s)) for c in cases]
    expected = [np.asarray(f(x, qw)) for f, (x, qw, _) in zip(fns, cases)]
    work = [i % len(cases) for i in range(48)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda i: np.asarray(fns[i](*cases[i][:2])), work))
    for i, y in zip(work, got):
        np.testing.assert_array_equal(y, expected[i])


def test_bad_input_is_rejected_before_the_kernel():
    rng = np.random.default_rng(11)
    qw = make_weight(rng, n=16, k=64, scheme=Scheme(4, 32, False, True, False))
    with pytest.raises(ValueError, match=r"w: expected shape \[2, 16, 16\]"):
        xla_qops.quantized_matmul(make_x(rng, (2, 64), "float32"), qw.w[:, :8], qw.scale,
                                  qw.zero_point, 32, True, impl="custom_call")
    with pytest.raises(TypeError, match="x: expected dtype"):
        xla_qops.quantized_matmul(jnp.zeros((2, 64), jnp.int32), qw, impl="custom_call")


def test_kernel_checks_operands_it_is_given():
    """The FFI handler does not trust its caller: a spec that does not match
    the arrays is an error, not a wrong read."""
    rng = np.random.default_rng(12)
    qw = make_weight(rng, n=16, k=64, scheme=Scheme(8, -1, True, False, False))
    x = make_x(rng, (2, 64), "float32")
    spec = check_args(x, *op_args(qw), False)
    lying = spec.__class__(**{**spec.__dict__, "bits": 4, "packed": True})
    with pytest.raises(Exception, match="w: expected int8"):
        np.asarray(custom_call.matmul(x, qw.w, qw.scale, None, lying))


@pytest.mark.parametrize("forced", ["generic", "avx2"])
def test_lower_kernel_sets_match_the_reference(forced):
    """XLA_QOPS_CPU_ISA=generic: the C++ kernels every x86-64 can run;
    =avx2: the set for CPUs without AVX-512 (Haswell.., Zen 1-3), on any CPU
    that has AVX2. Shapes reach every form of each set: N and K tails, odd
    blocks (int8 pairs without a second row), the decode forms (per-channel
    dot products, blockwise streams with whole sweeps: groups of 64 and 128)
    for 1-4 rows of x and bf16 / f16 / f32 terms, and the panel path."""
    script = textwrap.dedent(f"""
        import numpy as np
        import xla_qops
        from xla_qops.backends import custom_call
        from cases import all_schemes, make_weight, make_x, op_args
        import numpy_reference as ref
        assert custom_call.isa() == {isa_expected(forced)!r}, custom_call.isa()
        rng = np.random.default_rng(0)
        shapes = ((20, 48, 16), (203, 256, 64), (72, 384, 128), (40, 99, 33))
        for n, k, block in shapes:
            for s in all_schemes(block_size=block):
                if k % 2 and s.bits == 4 and s.packed:
                    continue  # packed int4 needs an even K (quantize_weight refuses it)
                qw = make_weight(rng, n=n, k=k, scheme=s)
                rows = ((1, "float32"), (1, "bfloat16"), (4, "bfloat16"), (9, "bfloat16"),
                        (2, "float16"))
                for m, dt in rows if n == 20 else rows[:4]:
                    x = make_x(rng, (m, k), dt)
                    y = xla_qops.quantized_matmul(x, *op_args(qw), s.quantize_activation,
                                                  impl="custom_call")
                    ref.assert_close(y, x, qw.w, qw.scale, qw.zero_point, qw.block_size,
                                     s.quantize_activation)
        from test_custom_call import NAN_ROW_SCHEMES, nan_rows_check
        for s in NAN_ROW_SCHEMES:
            nan_rows_check(lambda x, qw: xla_qops.quantized_matmul(
                x, *op_args(qw), s.quantize_activation, impl="custom_call"), s, rng)
        print("lower set ok")
    """)
    out = run_under_isa(forced, script, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lower set ok" in out.stdout


def _outputs_under(forced: str, path: str) -> None:
    """Runs the panel-path cases of test_avx2_panel_path_is_the_portable_kernels_bit_for_bit
    with XLA_QOPS_CPU_ISA=forced, saving every output to `path` (.npz)."""
    script = textwrap.dedent(f"""
        import numpy as np
        import xla_qops
        from xla_qops.backends import custom_call
        from cases import all_schemes, make_weight, make_x, op_args
        assert custom_call.isa() == {isa_expected(forced)!r}, custom_call.isa()
        rng = np.random.default_rng(7)
        out = {{}}
        for i, s in enumerate(all_schemes(block_size=32)):
            qw = make_weight(rng, n=75, k=96, scheme=s)  # a tile of 11 columns: 8 + 3
            for m, dt in ((9, "bfloat16"), (7, "float32"), (6, "float16")):
                x = make_x(rng, (m, 96), dt)
                y = xla_qops.quantized_matmul(x, *op_args(qw), s.quantize_activation,
                                              impl="custom_call")
                out[f"{{i}}-{{m}}-{{dt}}"] = np.asarray(y, np.float32)
        np.savez({path!r}, **out)
    """)
    done = run_under_isa(forced, script)
    assert done.returncode == 0, done.stderr[-3000:]


def test_avx2_panel_path_is_the_portable_kernels_bit_for_bit(tmp_path):
    """Where x has more rows than the decode forms take (the panel path: every
    prefill), the AVX2 set's packers and microkernels give the portable
    kernels' results bit for bit (bf16 x bf16 products are exact in float32,
    so an FMA rounds as the portable multiply-then-add, in the same order; A8
    sums are exact integers), for every integer scheme and x dtype, the
    epilogues' vector columns and their tails alike."""
    _outputs_under("generic", str(tmp_path / "generic.npz"))
    _outputs_under("avx2", str(tmp_path / "avx2.npz"))
    generic, avx2 = np.load(tmp_path / "generic.npz"), np.load(tmp_path / "avx2.npz")
    assert sorted(generic.files) == sorted(avx2.files) and len(generic.files) == 3 * 24
    for key in generic.files:
        np.testing.assert_array_equal(avx2[key], generic[key], err_msg=key)



def _decode_outputs_with_prefetch(hint: str, path: str) -> dict:
    """Runs the decode forms (per-channel dot products, blockwise streams in
    their register and wide forms) of every integer scheme and the float
    formats with XLA_QOPS_PREFETCH=hint in a fresh process, saving the outputs
    to `path` (.npz); returns the module's cpu_features()."""
    script = textwrap.dedent(f"""
        import json
        import numpy as np
        import xla_qops
        from xla_qops import _cpu_kernels
        from cases import all_schemes, make_weight, make_x, op_args
        rng = np.random.default_rng(11)
        out = {{}}
        rows = (1, 4, 9)
        for i, s in enumerate(all_schemes(block_size=128)):
            qw = make_weight(rng, n=200, k=512, scheme=s)
            for m in rows:
                # float32 x: float32 outputs, so a change in the sums' last bits shows
                for dtype in ("bfloat16", "float32"):
                    x = make_x(rng, (m, 512), dtype)
                    y = xla_qops.quantized_matmul(x, *op_args(qw), s.quantize_activation,
                                                  impl="custom_call")
                    out[f"{{i}}-{{m}}-{{dtype}}"] = np.asarray(y, np.float32)
        for fmt, block, act in (("fp8", 128, None), ("fp8", -1, "fp8"), ("mxfp4", 32, None)):
            qw = xla_qops.quantize_weight(rng.standard_normal((200, 512)), format=fmt,
                                          block_size=block)
            for m in rows:
                x = make_x(rng, (m, 512), "bfloat16")
                y = xla_qops.quantized_matmul(x, qw, quantize_activation=act is not None,
                                              activation_format=act, impl="custom_call")
                out[f"{{fmt}}-{{block}}-{{act}}-{{m}}"] = np.asarray(y, np.float32)
        np.savez({path!r}, **out)
        print(json.dumps(_cpu_kernels.cpu_features()))
    """)
    done = run_with_env(script, XLA_QOPS_PREFETCH=hint)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_prefetch_hint_moves_no_arithmetic(tmp_path):
    """The AVX-512 set is built twice, its decode streams prefetching the
    weights into L1 (T0: Intel's default, 1.2-4.9x faster there) or
    non-temporally (NTA: the others'); XLA_QOPS_PREFETCH=t0 / nta picks one.
    The Intel set also forms the one-row W8A16 decode's products by FMA on
    float32 images where the other uses VDPBF16PS (kInt8ByFma; the rows=1
    cases here). The module reports the choice, and both give the same bits
    (on CPUs without AVX-512 the choice is reported and the other sets run
    alike)."""
    t0 = _decode_outputs_with_prefetch("t0", str(tmp_path / "t0.npz"))
    nta = _decode_outputs_with_prefetch("nta", str(tmp_path / "nta.npz"))
    assert (t0["stream_prefetch"], nta["stream_prefetch"]) == ("t0", "nta")
    a, b = np.load(tmp_path / "t0.npz"), np.load(tmp_path / "nta.npz")
    assert sorted(a.files) == sorted(b.files)
    assert len(a.files) == 3 * (2 * len(all_schemes(block_size=128)) + 3)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_default_prefetch_hint_follows_the_cpu_vendor():
    """Unset, the hint is T0 on Intel CPUs and NTA on the others."""
    from xla_qops import _cpu_kernels
    features = _cpu_kernels.cpu_features()
    with open("/proc/cpuinfo") as f:
        vendor = next((line.split(":", 1)[1].strip() for line in f
                       if line.startswith("vendor_id")), "")
    assert features["intel"] == (vendor == "GenuineIntel")
    expected = os.environ.get("XLA_QOPS_PREFETCH") or ("t0" if vendor == "GenuineIntel" else "nta")
    assert features["stream_prefetch"] == expected


def test_the_cpu_description_names_the_kernels_and_their_prefetch():
    """What benchmark headers print: the CPU, its count, the kernel set, the
    decode prefetch hint in use and whether prefill runs on AMX (the figures
    differ by all five)."""
    text = custom_call.cpu_description()
    features = custom_call._extension().cpu_features()
    assert f", {os.cpu_count()} CPUs, kernels '{custom_call.isa()}' " in text
    prefill = ", prefill on AMX" if features["amx"] else ""
    assert text.endswith(f"(decode prefetch {features['stream_prefetch']}{prefill})")
    assert features["amx"] == _amx_expected()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    assert text.startswith(names[0] if names else "")


def _amx_expected() -> bool:
    """Whether the panel path must multiply on AMX here: the AVX-512 set is
    active and the CPU reports AMX-TILE, -BF16 and -INT8 (a kernel that lists
    them in /proc/cpuinfo also grants their state), and XLA_QOPS_AMX is not 0."""
    if isa_expected() != "avx512" or os.environ.get("XLA_QOPS_AMX") == "0":
        return False
    with open("/proc/cpuinfo") as f:
        flags = f.read().split()
    return all(flag in flags for flag in ("amx_tile", "amx_bf16", "amx_int8"))


def _panel_outputs_with_amx(amx: str, path: str) -> dict:
    """Runs panel-path cases (16 rows of x or more: whole AMX tiles, with rows
    left over for the AVX-512 microkernel; K whose steps leave a tail of a
    tile's depth) of every integer scheme, x dtype and float format with
    XLA_QOPS_AMX=amx in a fresh process, asserting each against the float64
    reference and saving it to `path` (.npz); returns cpu_features()."""
    script = textwrap.dedent(f"""
        import json
        import numpy as np
        import jax.numpy as jnp
        import xla_qops
        from xla_qops import _cpu_kernels
        from cases import all_schemes, make_weight, make_x, op_args
        import numpy_reference as ref
        rng = np.random.default_rng(5)
        out = {{}}
        for n, k, block in ((70, 320, 64), (33, 200, 40)):
            for i, s in enumerate(all_schemes(block_size=block)):
                qw = make_weight(rng, n=n, k=k, scheme=s)
                for m, dt in ((16, "bfloat16"), (37, "bfloat16"), (50, "float32"), (16, "float16")):
                    x = make_x(rng, (m, k), dt)
                    y = xla_qops.quantized_matmul(x, *op_args(qw), s.quantize_activation,
                                                  impl="custom_call")
                    ref.assert_close(y, x, qw.w, qw.scale, qw.zero_point, qw.block_size,
                                     s.quantize_activation)
                    sums = "exact" if s.quantize_activation else "float"  # int32 / float32
                    out[f"{{sums}}|{{k}}|{{i}}|{{m}}|{{dt}}"] = np.asarray(y, np.float32)
        for fmt, block, act in (("fp8", 128, None), ("fp8", -1, "fp8"), ("mxfp4", 32, None),
                                ("nvfp4", 16, None), ("fp8", 64, "fp8"), ("mxfp4", 32, "fp8")):
            qw = xla_qops.quantize_weight(rng.standard_normal((90, 256)), format=fmt,
                                          block_size=block)
            for m in (16, 45):
                x = make_x(rng, (m, 256), "bfloat16")
                y = xla_qops.quantized_matmul(x, qw, quantize_activation=act is not None,
                                              activation_format=act, impl="custom_call")
                out[f"float|{{fmt}}|{{block}}|{{act}}|{{m}}|bfloat16"] = np.asarray(y, np.float32)
        # Panels of several groups, more groups than one holds (kAmxPanelSteps),
        # and 512 rows or more (long panels: per-channel K past one of them).
        for bits, block, m, k in ((4, 32, 48, 1088), (8, -1, 520, 1100), (4, 128, 512, 1280)):
            qw = xla_qops.quantize_weight(rng.standard_normal((72, k)), bits=bits, block_size=block)
            x = make_x(rng, (m, k), "bfloat16")
            y = xla_qops.quantized_matmul(x, qw, impl="custom_call")
            ref.assert_close(y, x, qw.w, qw.scale, qw.zero_point, qw.block_size, False)
            out[f"float|{{bits}}|{{block}}|{{m}}|{{k}}|bfloat16"] = np.asarray(y, np.float32)
        # Power-of-two scales without zero points (every MXFP4 weight) are scaled
        # into the panel from 64 rows: MXFP4 over several panels, int8 and packed
        # int4 too, with rows left for the AVX-512 microkernel.
        qw = xla_qops.quantize_weight(rng.standard_normal((72, 1088)), format="mxfp4",
                                      block_size=32)
        x = make_x(rng, (83, 1088), "bfloat16")
        out["float|mxfp4|1088|83|bfloat16"] = np.asarray(
            xla_qops.quantized_matmul(x, qw, impl="custom_call"), np.float32)
        # NVFP4's scales (e4m3 block scales times, or over, one float32 of the
        # tensor, rounded once) fold too; a column whose scales are off that
        # grid by 5% keeps the per-group epilogue for the whole weight.
        from xla_qops.quantize import quantize_float
        for name, divisor in (("times", False), ("over", True)):
            qw = quantize_float(rng.standard_normal((72, 1088)) * 3.7, "nvfp4", 16,
                                nvfp4_divisor=divisor)
            x = make_x(rng, (83, 1088), "bfloat16")
            y = xla_qops.quantized_matmul(x, qw, impl="custom_call")
            ref.assert_close(y, x, qw.w, qw.scale, None, 16, False, weight_format="fp4")
            out[f"float|nvfp4|{{name}}|83|bfloat16"] = np.asarray(y, np.float32)
        scale = qw.scale.at[:, 5].multiply(1.05)
        y = xla_qops.quantized_matmul(x, qw.w, scale, None, 16, True, weight_format="fp4",
                                      impl="custom_call")
        ref.assert_close(y, x, qw.w, scale, None, 16, False, weight_format="fp4")
        out["float|nvfp4|off-grid|83|bfloat16"] = np.asarray(y, np.float32)
        # A column whose first 8 block scales (e4m3 mantissas 1.5 and 1.125) also fit
        # the wrong factor 1.5 * G, its 9th (1.25) not: the search goes on to G.
        e = np.exp2(rng.integers(-3, 3, qw.scale.shape)) * rng.choice([1.0, 1.25, 1.5, 1.75],
                                                                       qw.scale.shape)
        e[:8, 9] = np.exp2(rng.integers(-3, 3, 8)) * rng.choice([1.5, 1.125], 8)
        e[8, 9] = 1.25
        scale = jnp.asarray((e * 0.0123457).astype(np.float32))
        y = xla_qops.quantized_matmul(x, qw.w, scale, None, 16, True, weight_format="fp4",
                                      impl="custom_call")
        ref.assert_close(y, x, qw.w, scale, None, 16, False, weight_format="fp4")
        out["float|nvfp4|second-factor|83|bfloat16"] = np.asarray(y, np.float32)
        for bits in (8, 4):
            qw = xla_qops.quantize_weight(rng.standard_normal((70, 256)), bits=bits, block_size=64)
            scale = jnp.exp2(jnp.round(jnp.log2(qw.scale)))
            x = make_x(rng, (70, 256), "bfloat16")
            y = xla_qops.quantized_matmul(x, qw.w, scale, None, 64, qw.int4_weight,
                                          impl="custom_call")
            ref.assert_close(y, x, qw.w, scale, None, 64, False)
            out[f"float|pow2|{{bits}}|bfloat16"] = np.asarray(y, np.float32)
        for qa in (False, True):  # a NaN / inf in a row of an AMX tile stays in its row
            qw = xla_qops.quantize_weight(rng.standard_normal((40, 64)), bits=4, block_size=32)
            x = rng.standard_normal((32, 64)).astype(np.float32)
            x[1, 5], x[18, 7] = np.nan, np.inf
            y = np.asarray(xla_qops.quantized_matmul(jnp.asarray(x, jnp.bfloat16), qw,
                                                     quantize_activation=qa,
                                                     impl="custom_call"), np.float32)
            assert np.isnan(y[1]).all() and not np.isfinite(y[18]).all()
            assert np.isfinite(np.delete(y, [1, 18], axis=0)).all()
        np.savez({path!r}, **out)
        print(json.dumps(_cpu_kernels.cpu_features()))
    """)
    done = run_with_env(script, XLA_QOPS_AMX=amx)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_amx_prefill_matches_the_reference_and_the_avx512_microkernels(tmp_path):
    """Where the CPU has AMX (Intel Sapphire Rapids and later), the panel path
    multiplies whole tiles of 16 rows of x on it; XLA_QOPS_AMX=0 keeps the
    AVX-512 microkernels. Both meet the float64 reference on every scheme,
    x dtype and float format (run in _panel_outputs_with_amx); integer A8
    sums are exact, so those outputs are the same bits; A16 float32 sums of
    the same exact products, added in another association inside a tile, may
    differ by float32 rounding only: a few float32 ulps of the largest
    partial sum, at most one unit of the output dtype's last place. On other
    CPUs the module reports no AMX and both runs are the same code."""
    on = _panel_outputs_with_amx("1", str(tmp_path / "on.npz"))
    off = _panel_outputs_with_amx("0", str(tmp_path / "off.npz"))
    assert on["amx"] == _amx_expected() and off["amx"] is False
    a, b = np.load(tmp_path / "on.npz"), np.load(tmp_path / "off.npz")
    assert sorted(a.files) == sorted(b.files)
    assert len(a.files) == 2 * 4 * len(all_schemes(block_size=64)) + 6 * 2 + 3 + 3 + 4
    for key in a.files:
        sums, dtype = key.split("|")[0], key.split("|")[-1]
        if sums == "exact" or not on["amx"]:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            ulp = np.spacing(np.abs(b[key]).astype(jnp.dtype(dtype))).astype(np.float32)
            np.testing.assert_array_less(np.abs(a[key] - b[key]), ulp + 1e-6 * np.abs(b[key]).max() + 1e-30,
                                         err_msg=key)
