"""The checker itself: tests/numpy_reference.assert_close and its tolerance.

Every numerics test leans on `numpy_reference.tolerance`, so it is tested
here without xla_qops, against emulated implementations in numpy:

* honest float32 implementations pass, at every K the suite runs (96 ...
  14336), for every activation dtype, A16 and A8, per-channel and blockwise,
  symmetric and asymmetric: float32 summation in sequential order (the worst
  order: its partial sums are the largest), in BLAS's order, and in the form
  the backends use (``(x @ q) * scale - (sum x) * zero_point``), each rounded
  once to x's dtype;
* three plausible bugs fail at each of those sizes and dtypes: the result 1%
  too large, 8 of the K input features dropped, the dequantized weight
  rounded to bfloat16 (the old worst-case bound, ``(K + 2) u32 sum|x||w|``,
  let all three through at full-size K);
* the statistical term's safety margin: the sequential-order emulation stays
  under a quarter of it;
* A8: an activation rounded to the other int8 neighbour fails, unless it is
  at a tie and activation_ties=True; NaN where the reference is finite fails.
"""

import ml_dtypes
import numpy as np
import pytest

import numpy_reference as ref

KS = (96, 640, 1280, 2304, 4096, 11008, 14336)  # the K values tests/ runs
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
# (bits, block_size, symmetric, quantize_activation): API.md's rows, both layouts.
SCHEMES = [(8, -1, False, False), (4, 32, False, False), (4, -1, True, False),
           (8, -1, True, True), (4, 32, False, True), (8, 128, False, True)]
M, N = 4, 48


def scheme_id(s):
    bits, block, sym, qa = s
    return f"w{bits}a{8 if qa else 16}-{'pc' if block == -1 else f'g{block}'}-" \
           f"{'sym' if sym else 'asym'}"


def make_case(k, scheme, x_dtype, seed):
    """x in its dtype and a round-to-nearest weight of Gaussian floats, in API.md's
    layout (int4 packed), as the suite's tests/cases.py makes them."""
    bits, block, symmetric, _ = scheme
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, k)).astype(DTYPES[x_dtype])
    w = rng.standard_normal((N, k)) * 0.1 + (0 if symmetric else rng.uniform(-0.05, 0.05, (N, 1)))
    group = k if block == -1 else block
    g = w.reshape(N, k // group, group).astype(np.float32)
    qmin, qmax = (-8, 7) if bits == 4 else (-128, 127)
    if symmetric:
        scale = (np.abs(g).max(-1) / qmax).astype(np.float32)
        zp = None
        q = np.clip(np.rint(g / scale[..., None]), qmin, qmax)
    else:
        lo, hi = g.min(-1), g.max(-1)
        scale = ((hi - lo) / (qmax - qmin)).astype(np.float32)
        zp = (scale * qmin - lo).astype(np.float32)
        q = np.clip(np.rint((g + zp[..., None]) / scale[..., None]), qmin, qmax)
    q = q.astype(np.int8).reshape(N, k)
    if block == -1:
        wq = ref.pack_int4(q, -1) if bits == 4 else q
        return x, wq, scale[:, 0], None if zp is None else zp[:, 0]
    q3 = q.T.reshape(k // block, block, N)
    wq = ref.pack_int4(q3, 1) if bits == 4 else q3
    return x, wq, scale.T.copy(), None if zp is None else zp.T.copy()


def float32_operands(x, w, scale, zp, block, qa):
    """What a float32 implementation multiplies: activations [M, K] (x_scale * x_q
    for A8, one float32 rounding) and the weight parts [N, K] scale * q and zp."""
    x = np.asarray(x, np.float32)
    if qa:
        q, s = ref.quantize_activation(x, block)
        x = (q * np.repeat(s, x.shape[1] // s.shape[1], axis=1)).astype(np.float32)
    sq, z = ref._weight_terms(w, scale, zp, block)
    return x, sq.astype(np.float32), None if z is None else np.ascontiguousarray(z, np.float32)


def sequential(x, w):
    """float32 sum over k in order, each product rounded: [M, N]."""
    prods = x[:, None, :] * w[None, :, :]
    return np.cumsum(prods, axis=-1, dtype=np.float32)[..., -1]


def implementations(x, wq, scale, zp, block, qa):
    """float32 results [M, N] of honest implementations, before the output rounding."""
    xf, sq, z = float32_operands(x, wq, scale, zp, block, qa)
    w32 = sq if z is None else sq - z  # the float32 dequantized weight
    out = {"sequential": sequential(xf, w32), "blas": xf @ w32.T}
    # The backends' form: integer-weight contraction (per block), scaled, minus sum(x) * zp.
    k = xf.shape[1]
    group = k if block == -1 else block
    q = ref.dequantize(wq, np.ones(np.shape(scale)), None, block,
                       np.asarray(wq).dtype == np.uint8).astype(np.float32)  # [N, K]
    parts = xf.reshape(M, -1, group).transpose(1, 0, 2) @ q.reshape(N, -1, group).transpose(1, 2, 0)
    s = np.asarray(scale, np.float32).reshape(-1, N)  # [groups, N]
    y = (parts * s[:, None, :]).sum(0, dtype=np.float32)
    if zp is not None:
        y = y - xf.reshape(M, -1, group).sum(-1, dtype=np.float32) @ np.asarray(
            zp, np.float32).reshape(-1, N)
    out["split"] = y
    return out


def mutations(x, wq, scale, zp, block, qa):
    """float32 results [M, N] of three wrong implementations."""
    xf, sq, z = float32_operands(x, wq, scale, zp, block, qa)
    w32 = sq if z is None else sq - z
    dropped = xf.copy()
    dropped[:, np.linspace(0, xf.shape[1] - 1, 8).astype(int)] = 0  # 8 features forgotten
    w_bf16 = w32.astype(ml_dtypes.bfloat16).astype(np.float32)
    return {"plus_one_percent": (xf @ w32.T) * np.float32(1.01),
            "eight_features_dropped": dropped @ w32.T,
            "weight_in_bfloat16": xf @ w_bf16.T}


def check(y32, x, wq, scale, zp, block, qa):
    ref.assert_close(y32.astype(x.dtype).reshape(M, N), x, wq, scale, zp, block, qa)


CASES = [(k, s, d) for k in KS for s in SCHEMES for d in DTYPES
         if s[1] == -1 or k % s[1] == 0]


@pytest.mark.parametrize("k,scheme,x_dtype", CASES,
                         ids=[f"K{k}-{scheme_id(s)}-{d}" for k, s, d in CASES])
def test_honest_implementations_pass_and_mutations_fail(k, scheme, x_dtype):
    x, wq, scale, zp = make_case(k, scheme, x_dtype, seed=k)
    block, qa = scheme[1], scheme[3]
    for name, y in implementations(x, wq, scale, zp, block, qa).items():
        check(y, x, wq, scale, zp, block, qa)
    for name, y in mutations(x, wq, scale, zp, block, qa).items():
        with pytest.raises(AssertionError, match="outside tolerance"):
            check(y, x, wq, scale, zp, block, qa)
            pytest.fail(f"mutation {name} passed")  # not reached when the checker works


@pytest.mark.parametrize("k", KS)
def test_statistical_term_has_a_fourfold_margin(k):
    """The sequential float32 sum, the order with the largest partial sums, over
    M x N = 4096 elements per K, every scheme: its error stays below a quarter of
    the accumulation part of the bound (docstring of numpy_reference.tolerance)."""
    worst = 0.0
    for i, scheme in enumerate(SCHEMES):
        block, qa = scheme[1], scheme[3]
        if block != -1 and k % block:
            continue
        for seed in range(4 if k < 4096 else 1):
            rng_seed = 1000 * k + 10 * i + seed
            x, wq, scale, zp = make_case(k, scheme, "float32", rng_seed)
            xf, sq, z = float32_operands(x, wq, scale, zp, block, qa)
            y = sequential(xf, sq if z is None else sq - z).astype(np.float64)
            exact = ref.quantized_matmul(x, wq, scale, zp, block, False, qa)
            _, acc = ref.tolerance_parts(x, wq, scale, zp, block, np.float32, qa)
            worst = max(worst, float((np.abs(y - exact) / acc).max()))
    assert 0.01 < worst < 0.25, worst


def tie_case():
    """One row whose activation 1 sits exactly on a .5 tie of x * inv_scale."""
    rng = np.random.default_rng(7)
    x = np.clip(rng.standard_normal((1, 64)), -3.5, 3.5).astype(np.float32)
    x[0, 0] = 4.0  # absmax: inv_scale = 127 / 4 = 31.75, exact
    x[0, 1] = np.float32(2.5 / 31.75)  # 31.75 * x = 2.5 (to float32 precision)
    v = np.float32(x[0, 1] * np.float32(31.75))
    for _ in range(4):  # nudge to the exact tie
        if v == 2.5:
            break
        x[0, 1] = np.nextafter(x[0, 1], np.float32(np.inf if v < 2.5 else -np.inf))
        v = np.float32(x[0, 1] * np.float32(31.75))
    assert v == 2.5
    _, wq, scale, zp = make_case(64, (8, -1, False, True), "float32", seed=3)
    return x, wq, scale, zp


def test_a8_flips_fail_unless_at_a_tie_with_activation_ties():
    """By default A8's integers must be API.md's exactly (every backend computes
    them with the reference's float32 operations); with activation_ties=True (an
    implementation outside the project, e.g. torch_xla's x / x_scale) an
    activation at a .5 tie may go to either neighbour, and no other may."""
    x, wq, scale, zp = tie_case()
    assert ref.near_ties(x, -1)[0, 1] and ref.near_ties(x, -1).sum() == 1
    xf, sq, z = float32_operands(x, wq, scale, zp, -1, True)
    w32 = sq - z
    step = np.float32(4.0 / 127)
    for k, expect_ok in ((1, True), (2, False)):
        flipped = xf.copy()
        # x_q = 2 (half to even) -> 3 at the tie; elsewhere one int8 step off.
        flipped[0, k] += step
        y = flipped @ w32.T
        with pytest.raises(AssertionError, match="outside tolerance"):
            ref.assert_close(y, x, wq, scale, zp, -1, True)
        if expect_ok:
            ref.assert_close(y, x, wq, scale, zp, -1, True, activation_ties=True)
        else:
            with pytest.raises(AssertionError, match="outside tolerance"):
                ref.assert_close(y, x, wq, scale, zp, -1, True, activation_ties=True)


def test_nan_where_the_reference_is_finite_fails():
    x, wq, scale, zp = make_case(96, SCHEMES[0], "float32", seed=1)
    xf, sq, z = float32_operands(x, wq, scale, zp, -1, False)
    y = xf @ (sq - z).T
    ref.assert_close(y, x, wq, scale, zp)
    y[1, 2] = np.nan
    with pytest.raises(AssertionError, match="1 of 192 elements outside tolerance"):
        ref.assert_close(y, x, wq, scale, zp)
