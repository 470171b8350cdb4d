"""The linear-CE benchmark runs end to end on tiny shapes and writes its table and plot; the CLI reaches it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from crossent import cli
from crossent.bench import linear_ce

ROOT = Path(__file__).resolve().parents[1]


def test_linear_ce_benchmark_quick(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "linear_ce.py"), "--quick", "--out", str(tmp_path),
           "--methods", "floor", "naive", "crossent"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "linear_ce.md").read_text()
    assert table.count("| crossent |") == 2 and "failed" not in table, table
    assert (tmp_path / "linear_ce.png").stat().st_size > 1000


def test_cli_bench_op_linear_dispatches(tmp_path, monkeypatch):
    """`crossent bench --op linear` runs this benchmark (measurement stubbed: the test above runs it)."""
    seen = {}

    def fake_measure(shapes, methods, reps, on_result=None):
        seen.update(shapes=shapes, reps=reps)
        return [{"method": m, "shape": list(s), "seconds": 1.0, "peak_bytes": 2**20, "loss": None}
                for s in shapes for m in methods if linear_ce.available(m)]  # fmt: skip

    monkeypatch.setattr(linear_ce, "measure", fake_measure)
    assert cli.main(["bench", "--op", "linear", "--quick", "--out", str(tmp_path)]) == 0
    assert seen["shapes"] == linear_ce.QUICK_SHAPES
    assert (tmp_path / "linear_ce.md").exists() and (tmp_path / "linear_ce.png").exists()
