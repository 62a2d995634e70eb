"""tools/peak_flops.py: the measured FMA roofline (a figure, not a timing assertion)."""

from __future__ import annotations

import re
import shutil

import pytest
from tool_modules import load_tool

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def test_measures_a_positive_peak_or_skips_the_isa(capsys):
    tool = load_tool("peak_flops.py", "_peak_flops")
    assert tool.main(["--threads", "1", "--seconds", "0.02", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ") and "load" in out
    for isa in ("avx512", "avx2"):
        m = re.search(rf"^{isa}\s+1 thread\s+([\d.]+) GFLOP/s", out, re.M)
        assert m is not None or f"{isa}: skipped" in out
        if m:
            assert float(m.group(1)) > 0


def test_unknown_isa_is_one_line(capsys):
    assert load_tool("peak_flops.py", "_peak_flops").main(["--isa", "sse9"]) == 2
    assert "unknown ISA 'sse9'" in capsys.readouterr().err
