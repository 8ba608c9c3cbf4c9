"""The block rule (pallas_kernels.block_sizes) keeps every hardware constraint
over a sweep of shapes, dtypes, schemes and chips. Pure Python, no kernels run.
"""

import itertools

import numpy as np
import pytest

from pallas_kernels import block_sizes as bs

MS = [1, 7, 16, 64, 65, 256, 300, 600, 2048]
KN = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 11008), (11008, 4096),
      (1000, 200), (640, 96), (4096, 1024), (256, 128)]
X_DTYPES = ["bfloat16", "float16", "float32"]
# (block_size, packed, quantize_activation)
SCHEMES = [(-1, False, False), (-1, True, False), (-1, False, True), (-1, True, True),
           (128, False, False), (128, True, False), (64, True, True), (32, False, True)]


def tpu_cases():
    for chip, m, (k, n), x_dtype, (b, packed, qa) in itertools.product(
            bs.CHIPS, MS, KN, X_DTYPES, SCHEMES):
        if b != -1 and k % b:
            continue
        yield chip, m, k, n, x_dtype, b, packed, qa


@pytest.mark.parametrize("chip", list(bs.CHIPS))
def test_tpu_blocks_respect_mosaic_rules(chip):
    for c, m, k, n, x_dtype, b, packed, qa in tpu_cases():
        if c != chip:
            continue
        t = bs.tpu_blocks(m, k, n, block_size=b, packed=packed, x_dtype=x_dtype,
                          quantize_activation=qa, chip=chip)
        where = (chip, m, k, n, x_dtype, b, packed, qa, t)
        p = 2 if packed else 1
        op = bs.tpu_operand_dtype(x_dtype, qa)
        # Padded extents cover the problem and are tile multiples.
        assert t.m_pad >= m and t.n_pad >= n and t.k_pad >= k, where
        assert t.m_pad % t.tm == 0 and t.n_pad % t.tn == 0 and t.k_pad % t.tk == 0, where
        # Sublane packing of the activation operand: 8 / 16 / 32 rows.
        assert t.tm % (8 * 4 // op.itemsize) == 0, where
        # Last-two-dims rule: multiples of 128 or the full (padded) extent.
        assert t.tn % 128 == 0 or t.tn == t.n_pad, where
        if b == -1:
            assert (t.tk // p) % 128 == 0 or t.tk == t.k_pad, where
            assert t.tk % t.k_chunk == 0 and ((t.k_chunk // p) % 128 == 0 or t.k_chunk == t.tk), where
        else:
            assert t.tk % b == 0 and t.k_pad == k and t.k_chunk == b, where
        # VMEM estimate within a quarter of the core's VMEM; limit below 3/4.
        est = bs.tpu_vmem_bytes(t.tm, t.tn, t.tk, t.k_chunk, packed=packed, w_itemsize=1,
                                x_itemsize=op.itemsize,
                                out_itemsize=4 if x_dtype != "bfloat16" else 2,
                                blockwise=b != -1)
        assert est <= bs.CHIPS[chip].vmem_bytes // 4, where
        assert t.vmem_limit_bytes <= bs.CHIPS[chip].vmem_bytes * 3 // 4, where


def test_tpu_decode_streams_the_weight_in_enough_tiles():
    """Llama decode: one M tile, full K per tile when it fits, >= 8 weight tiles."""
    for chip, (k, n), b in itertools.product(("v5e", "v6e"), KN[:5], (-1, 128)):
        t = bs.tpu_blocks(1, k, n, block_size=b, packed=True, x_dtype="bfloat16",
                          quantize_activation=False, chip=chip)
        assert t.grid[0] == 1
        assert t.grid[1] * t.grid[2] >= 8, (chip, k, n, t)
        assert t.tk == k, (chip, k, n, t)


def test_tpu_prefill_tiles_are_mxu_aligned_on_v6e():
    t = bs.tpu_blocks(2048, 4096, 14336, block_size=-1, packed=False, x_dtype="bfloat16",
                      quantize_activation=False, chip="v6e")
    assert t.tm % 256 == 0 and t.tn % 256 == 0 and t.tm >= 512 and t.tn >= 512


def test_no_weight_padding_for_llama_shapes():
    """Padding the weight copies it every call; the rule avoids it for these."""
    for m, (k, n) in itertools.product(MS, KN[:5]):
        for b, packed in ((-1, False), (-1, True), (128, True)):
            t = bs.tpu_blocks(m, k, n, block_size=b, packed=packed, x_dtype="bfloat16",
                              quantize_activation=False)
            assert (t.n_pad, t.k_pad) == (n, k), (m, k, n, b, t)
            g = bs.gpu_blocks(m, k, n, block_size=b, packed=packed)
            assert (g.n_pad, g.k_pad) == (n, k), (m, k, n, b, g)


def test_gpu_blocks_are_triton_shaped():
    pow2 = lambda v: v > 0 and v & (v - 1) == 0
    for m, (k, n), (b, packed, _) in itertools.product(MS, KN, SCHEMES):
        if b != -1 and k % b:
            continue
        g = bs.gpu_blocks(m, k, n, block_size=b, packed=packed)
        p = 2 if packed else 1
        where = (m, k, n, b, packed, g)
        assert pow2(g.bm) and pow2(g.bn) and g.bm >= 16 and g.bn >= 16, where
        assert pow2(g.bk // p) and g.bk // p >= 16 or b != -1, where
        assert g.m_pad % g.bm == 0 and g.n_pad % g.bn == 0 and g.k_pad % g.bk == 0, where
        assert g.m_pad >= m and g.n_pad >= n and g.k_pad >= k, where


def test_chip_selection(monkeypatch):
    assert bs.tpu_chip("v5e").mxu == 128 and bs.tpu_chip("v6e").mxu == 256
    monkeypatch.setenv("XLA_QOPS_TPU_CHIP", "v5p")
    assert bs.tpu_chip().name == "v5p"
    monkeypatch.delenv("XLA_QOPS_TPU_CHIP")
    assert bs.tpu_chip().name == bs.DEFAULT_CHIP  # no TPU attached here
    with pytest.raises(ValueError, match=r"chip: expected one of v5e, v5p, v6e, v7, got 'v4'"):
        bs.tpu_chip("v4")


def test_docs_roofline_table_is_current():
    """docs/pallas_kernels.md shows what pallas_kernels.roofline computes for
    the current block rule (regenerate with `python -m pallas_kernels.roofline`)."""
    import pathlib

    from pallas_kernels import roofline

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "pallas_kernels.md").read_text()
    table = doc.split("<!-- roofline-table:begin -->\n")[1].split("<!-- roofline-table:end -->")[0]
    assert table.strip() == roofline.markdown().strip()
