"""The block rule (pallas_kernels.block_sizes) keeps every hardware constraint
over a sweep of shapes, dtypes, schemes and chips, tiles real models without
copying their weights, detects TPU generations exactly, and honours per-call
overrides and measured tables. Pure Python, no kernels run (that the kernels
take the weight uncopied is tests/test_pallas_lowering.py's).
"""

import itertools
import json
import warnings

import pytest

from pallas_kernels import block_sizes as bs
from pallas_kernels import jax_compat, shapes

MS = [1, 7, 16, 64, 65, 256, 300, 600, 2048]
# Llama-3-8B, Llama-2-7B's MLP, then odd and small shapes.
LLAMA = [tuple(s) for s in shapes.LLAMA3_8B] + [(4096, 11008), (11008, 4096)]
KN = LLAMA + [tuple(s) for s in shapes.ODD] + [(4096, 1024), (256, 128)]
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
        # The grid covers the problem in whole tiles (x and the scales are
        # padded to it; the weight's last block may be partial).
        assert t.m_pad >= m and t.n_pad >= n and t.k_pad >= k, where
        assert t.m_pad % t.tm == 0 and t.n_pad % t.tn == 0 and t.k_pad % t.tk == 0, where
        assert t.n_pad - n < t.tn and t.k_pad - k < t.tk, where
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
    for chip, (k, n), b in itertools.product(("v5e", "v6e"), LLAMA, (-1, 128)):
        t = bs.tpu_blocks(1, k, n, block_size=b, packed=True, x_dtype="bfloat16",
                          quantize_activation=False, chip=chip)
        assert t.grid[0] == 1
        assert t.grid[1] * t.grid[2] >= 8, (chip, k, n, t)
        assert t.tk == k, (chip, k, n, t)


def test_tpu_prefill_tiles_are_mxu_aligned_on_v6e():
    t = bs.tpu_blocks(2048, 4096, 14336, block_size=-1, packed=False, x_dtype="bfloat16",
                      quantize_activation=False, chip="v6e")
    assert t.tm % 256 == 0 and t.tn % 256 == 0 and t.tm >= 512 and t.tn >= 512


def _real_cases():
    for shape in shapes.real_model_shapes():
        k, n = shape
        block = next(b for b in (128, 64, 32) if k % b == 0)
        for b, packed in ((-1, False), (-1, True), (block, True), (block, False)):
            yield shape, b, packed


@pytest.mark.parametrize("chip", list(bs.CHIPS))
def test_tpu_rule_prefers_tiles_that_divide_for_real_models(chip):
    """Every real-model shape: tiles that divide N and K, or the whole extent,
    wherever that fits VMEM -- and where neither does, the grid covers N and K
    with at most one partial weight block (never a padded copy; see
    test_pallas_lowering.py). On the chips with 64 MiB or more of VMEM, every
    shape some 128-multiple (256 packed) divides is tiled exactly."""
    partial = []
    for (shape, b, packed), m in itertools.product(_real_cases(), (1, 16, 256, 2048)):
        k, n = shape
        t = bs.tpu_blocks(m, k, n, block_size=b, packed=packed, x_dtype="bfloat16",
                          quantize_activation=False, chip=chip)
        assert t.n_pad - n < t.tn and t.k_pad - k < t.tk, (shape.label, m, b, t)
        if (t.n_pad, t.k_pad) != (n, k):
            partial.append((shape.label, m, b, packed))
    unit_ok = {s.label for s in shapes.real_model_shapes()
               if s.out_features % 128 == 0 and s.in_features % 256 == 0}
    if bs.CHIPS[chip].vmem_bytes >= 64 * bs.MiB:
        assert not [p for p in partial if p[0] in unit_ok], partial


def test_gpu_rule_never_pads_real_model_weights():
    """K tiles divide K (Falcon-7B's 4544 = 64 x 71, packed Qwen2-0.5B's 448
    stored bytes = 64 x 7) or the last step is masked; N tiles divide N."""
    for (shape, b, packed), m in itertools.product(_real_cases(), (1, 16, 256, 2048)):
        k, n = shape
        g = bs.gpu_blocks(m, k, n, block_size=b, packed=packed)
        assert (g.n_pad, g.k_pad) == (n, k), (shape.name, shape.label, m, b, packed, g)
    falcon = bs.gpu_blocks(1, 4544, 18176, block_size=-1, packed=False)
    qwen = bs.gpu_blocks(1, 896, 4864, block_size=-1, packed=True)
    assert (falcon.bk, qwen.bk) == (64, 128)  # 64 stored bytes each: both divide K


def test_gpu_rule_masks_a_k_tail_nothing_divides():
    g = bs.gpu_blocks(3, 1000, 256, block_size=-1, packed=False)
    assert g.k_pad == 1000 and g.bk == 128 and 1000 % g.bk  # last step masked in-kernel


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
        assert g.m_pad % g.bm == 0 and g.n_pad % g.bn == 0, where
        assert g.m_pad >= m and g.n_pad >= n and g.k_pad == k, where  # K never padded
        # N is padded only where no power-of-2 tile >= 16 divides it.
        assert g.n_pad == n or n % 16, where


def test_chip_selection(monkeypatch):
    assert bs.tpu_chip("v5e").mxu == 128 and bs.tpu_chip("v6e").mxu == 256
    monkeypatch.setenv("XLA_QOPS_TPU_CHIP", "v5p")
    assert bs.tpu_chip().name == "v5p"
    monkeypatch.delenv("XLA_QOPS_TPU_CHIP")
    assert bs.tpu_chip().name == bs.DEFAULT_CHIP  # no TPU attached here
    with pytest.raises(ValueError, match=r"chip: expected one of v4, v5e, v5p, v6e, v7, got 'v3'"):
        bs.tpu_chip("v3")


@pytest.mark.parametrize("kind,chip,vmem_mib", [
    ("TPU v4", "v4", 16), ("TPU v5 lite", "v5e", 128), ("TPU v5e", "v5e", 128),
    ("TPU v5", "v5p", 64), ("TPU v5p", "v5p", 64), ("TPU v6 lite", "v6e", 128),
    ("TPU7x", "v7", 64)])
def test_tpu_generation_from_device_kind(kind, chip, vmem_mib):
    """Device kinds match exactly: by JAX's own table (pltpu.get_tpu_info,
    through an abstract TPU device) where this JAX has one, else by ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known kind never warns
        by_kind = bs.chip_for_device_kind(kind)
        with jax_compat.lowering_target("tpu", kind):
            target = bs.tpu_chip()
            info = jax_compat.tpu_info()
    assert (by_kind.name, by_kind.vmem_bytes) == (chip, vmem_mib * bs.MiB)
    if jax_compat.abstract_devices_supported():
        assert info is not None and info.vmem_capacity_bytes == vmem_mib * bs.MiB
        assert (target.name, target.vmem_bytes) == (chip, vmem_mib * bs.MiB)
    else:  # JAX 0.7.1 lowers for the attached TPU only: the default chip here
        assert info is None and target.name == bs.DEFAULT_CHIP
    assert jax_compat.tpu_info() is None  # outside the block: no TPU here


@pytest.mark.parametrize("kind", ["TPU v9", "TPU v5 something", "TPU v4 lite", "tpu v6e"])
def test_unknown_tpu_kind_warns_and_gets_a_conservative_budget(kind):
    """Near misses ('TPU v5 something', lower case) are unknown too: no
    substring matching, and never v6e's 128 MiB silently."""
    with pytest.warns(RuntimeWarning, match=rf"TPU device kind '{kind}' is not one of .*"
                                            r"conservative Pallas tiles \(16 MiB VMEM"):
        chip = bs.chip_for_device_kind(kind)
    assert chip.name == f"unknown ({kind})" and chip.vmem_bytes == 16 * bs.MiB
    assert chip.weight_tile == bs.CONSERVATIVE.weight_tile


def test_unknown_kind_that_jax_knows_keeps_its_vmem():
    """A chip JAX's table has but ours does not (v4 lite): JAX's VMEM size and
    MXU width, our conservative tiles, and the warning."""
    info = type("Info", (), dict(chip_version="v4i", generation=4,
                                 vmem_capacity_bytes=16 * bs.MiB, mxu_column_size=128))()
    with pytest.warns(RuntimeWarning, match="conservative Pallas tiles"):
        chip = bs.chip_for_device_kind("TPU v4 lite", info)
    assert (chip.generation, chip.vmem_bytes, chip.tm_max) == (4, 16 * bs.MiB, 256)


LLAMA_UP = dict(m=16, k=4096, n=14336, block_size=-1, packed=True, x_dtype="bfloat16",
                quantize_activation=False)


def _tpu(chip="v6e", **kw):
    args = dict(LLAMA_UP, **kw)
    return bs.tpu_blocks(args.pop("m"), args.pop("k"), args.pop("n"), chip=chip, **args)


def test_override_tiles_per_call():
    rule = _tpu()
    with bs.override_tiles(tpu=dict(tn=512, tk=2048)):
        t = _tpu()
        with bs.override_tiles(tpu=dict(tn=256)):  # nested: replaces the tpu entry
            inner = _tpu()
    assert (t.tn, t.tk, t.k_chunk, t.tm) == (512, 2048, 1024, rule.tm)
    assert t.grid == (1, 14336 // 512, 2) and (inner.tn, inner.tk) == (256, rule.tk)
    assert _tpu() == rule  # gone after the block
    with bs.override_tiles(gpu=dict(bn=32, num_stages=4)):
        g = bs.gpu_blocks(16, 4096, 14336, block_size=-1, packed=True)
        assert _tpu() == rule  # a gpu override leaves the TPU rule alone
    assert (g.bn, g.num_stages, g.bk) == (32, 4, 256)


@pytest.mark.parametrize("tiles,match", [
    (dict(tn=200), r"tiles: tn=200 must be a multiple of 128 or all of N=14336"),
    (dict(tm=12), r"tm=12 must be a positive multiple of 16"),
    (dict(tk=384), r"tk=384 must be a multiple of 256 or all of K=4096"),
])
def test_override_breaking_a_tpu_rule_is_refused(tiles, match):
    with bs.override_tiles(tpu=tiles), pytest.raises(ValueError, match=match):
        _tpu()


def test_override_arguments_are_checked():
    with pytest.raises(ValueError, match=r"tpu: expected fields among tm, tn, tk, k_chunk, "
                                         r"got bn"):
        with bs.override_tiles(tpu=dict(bn=64)):
            pass
    with pytest.raises(ValueError, match=r"gpu: expected int values, got bm=16.0"):
        with bs.override_tiles(gpu=dict(bm=16.0)):
            pass
    with bs.override_tiles(gpu=dict(bm=24)), pytest.raises(
            ValueError, match=r"bm=24 must be a power of 2 >= 16"):
        bs.gpu_blocks(16, 4096, 4096, block_size=-1, packed=False)


def test_measured_table_is_used_for_its_bucket_only(tmp_path):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps([
        dict(target="tpu:v6e", m=16, k=4096, n=14336, block_size=-1, packed=True,
             x_dtype="bfloat16", quantize_activation=False, tiles=dict(tn=1024, tk=4096)),
        dict(target="cuda", m=1, k=4096, n=14336, block_size=-1, packed=True,
             x_dtype="bfloat16", quantize_activation=False, tiles=dict(bn=128))]))
    rule_tpu = {m: _tpu(m=m) for m in (9, 16, 17)}
    rule_v5e = _tpu(chip="v5e")
    rule_gpu = bs.gpu_blocks(1, 4096, 14336, block_size=-1, packed=True)
    assert rule_gpu.bn == 64 and rule_tpu[16].tn != 1024
    try:
        assert bs.load_measured_tiles(str(path)) == 2
        # M = 9..16 share the bucket of 16; M = 17 and other chips do not.
        for m in (9, 16):
            assert (_tpu(m=m).tn, _tpu(m=m).tk) == (1024, 4096)
        assert _tpu(m=17) == rule_tpu[17] and _tpu(chip="v5e") == rule_v5e
        assert bs.gpu_blocks(1, 4096, 14336, block_size=-1, packed=True).bn == 128
        with bs.override_tiles(tpu=dict(tn=512)):  # an override beats the table
            assert (_tpu().tn, _tpu().tk) == (512, 4096)
    finally:
        bs.clear_measured_tiles()
    assert _tpu() == rule_tpu[16]


def test_m_bucket():
    assert [bs.m_bucket(m) for m in (1, 2, 3, 16, 17, 1024, 5000)] == [1, 2, 4, 16, 32, 1024, 2048]


def test_docs_roofline_table_is_current():
    """docs/pallas_kernels.md shows what pallas_kernels.roofline computes for
    the current block rule (regenerate with `python -m pallas_kernels.roofline`)."""
    import pathlib

    from pallas_kernels import roofline

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "pallas_kernels.md").read_text()
    table = doc.split("<!-- roofline-table:begin -->\n")[1].split("<!-- roofline-table:end -->")[0]
    assert table.strip() == roofline.markdown().strip()
