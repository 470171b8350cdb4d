"""The linear-CE benchmark script runs end to end on tiny shapes and writes its table and plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_linear_ce_benchmark_quick(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "linear_ce.py"), "--quick", "--out", str(tmp_path),
           "--methods", "floor", "naive", "crossent"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "linear_ce.md").read_text()
    assert table.count("| crossent |") == 2 and "failed" not in table, table
    assert (tmp_path / "linear_ce.png").stat().st_size > 1000
