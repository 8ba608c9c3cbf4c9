"""The host-CPU kernels at every row count from 1 to 17, for every scheme.

Which loop form a call takes depends on the number of rows (M, and M*T for
A16 with T bf16 terms per f16/f32 value: the per-channel dot form up to 16,
the blockwise decode up to 16, in registers up to 4 and in the wide form
beyond; panels beyond 16), so each row count is checked
against the float64 reference, on odd shapes (N = 100, not a multiple of 64;
several groups; an odd block size where int4 cannot be packed), and with one
and with two threads (bit-identical). The kernels are reached through the
torch operator (no compilation per shape); tests/test_custom_call.py and
tests/test_torch_cpu_direct.py show that the JAX custom call runs the same
kernels bit for bit.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import numpy_reference as ref
from cases import Scheme, all_schemes, make_weight
from torch_bridge import _cpu_ops
from torch_bridge.op import check

from conftest import torch_ops_expected

# Skipped only where the build does not make the operator (not x86-64); a
# missing one there fails (tests/test_torch_cpu_direct.py says why).
pytestmark = pytest.mark.skipif(not torch_ops_expected() and not _cpu_ops.available(),
                                reason="torch_bridge._torch_ops is not built on this platform")

SCHEMES = all_schemes(32) + [Scheme(4, 6, False, True, True), Scheme(8, 5, True, False, False),
                             Scheme(4, 3, False, False, False)]
ROWS = range(1, 18)


def run(x, w, s, z, scheme, threads):
    spec = check(x, w, s, z, scheme.block_size, scheme.bits == 4, scheme.quantize_activation)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _cpu_ops.matmul(x, _cpu_ops.prepare(w, s, z, spec), scheme.quantize_activation)
    finally:
        torch.set_num_threads(before)


def to_numpy(t):
    return t.float().numpy().astype(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.id)
def test_every_row_count(scheme):
    rng = np.random.default_rng(21)
    k = 6 * 30 if scheme.block_size in (6, 3) else (5 * 30 if scheme.block_size == 5 else 96)
    qw = make_weight(rng, 100, k, scheme)
    w, s = torch.from_numpy(np.array(qw.w)), torch.from_numpy(np.array(qw.scale))
    z = None if qw.zero_point is None else torch.from_numpy(np.array(qw.zero_point))
    for m in ROWS:
        for dtype in (torch.bfloat16, torch.float32):
            if dtype == torch.float32 and m not in (1, 2, 5, 6, 17):  # M*T = 3..51
                continue
            x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
            y = run(x, w, s, z, scheme, threads=2)
            assert torch.equal(y, run(x, w, s, z, scheme, threads=1)), (m, dtype)
            ref.assert_close(to_numpy(y), to_numpy(x), np.array(qw.w), np.array(qw.scale),
                             None if qw.zero_point is None else np.array(qw.zero_point),
                             scheme.block_size, scheme.quantize_activation)
