"""`xla-qops demo --synthetic` prints one row per scheme with sane figures."""

import re

from xla_qops_app import cli


def test_synthetic_demo_table(capsys):
    assert cli.main(["demo", "--synthetic", "--size", "64", "256", "--tokens", "2",
                     "--runs", "1", "--impls", "reference,xla"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if re.match(r"w[48]a(8|16) ", line)]
    # 4 schemes x {per-channel, g128} x {symmetric, zero point}.
    assert len(rows) == 16
    for scheme, layout, zp, ratio, max_err, mean_err, t_ref, t_xla in rows:
        bits = int(scheme[1])
        # Weight bytes vs bf16: bits/16 plus float32 scales (and zero points).
        assert bits / 16 < float(ratio) < bits / 16 + 0.1
        # Mean error relative to mean |y|: int8 ~1e-2, int4 ~1e-1 on Gaussian weights.
        assert 0 < float(mean_err) < (0.03 if bits == 8 else 0.3)
        assert float(max_err) >= float(mean_err)
        assert float(t_ref) > 0 and float(t_xla) > 0


def test_unknown_command_and_impl_are_clear_errors(capsys):
    import pytest
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
    assert cli.main(["demo", "--synthetic", "--size", "8", "16", "--impls", "fast"]) == 2
    assert re.search(r"xla-qops demo: error: impl: expected one of .* got 'fast'",
                     capsys.readouterr().err)
