"""`crossent bench --op linear` and benchmarks/linear_ce.py on tiny shapes; the float64 oracle they use."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from crossent import cli
from crossent.bench import linear_ce
from crossent.bench.linear_methods import make_inputs, make_target
from crossent.bench.report import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``crossent bench --op linear --quick --out DIR``: its stdout and DIR."""
    out_dir = tmp_path_factory.mktemp("linear")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["bench", "--op", "linear", "--quick", "--out", str(out_dir)]) == 0
    return stdout.getvalue(), out_dir


def test_quick_prints_a_table_row_per_fraction_and_method(quick_run):
    out, _ = quick_run
    lines = out.splitlines()
    dashes = next(i for i, line in enumerate(lines) if set(line) == {"-"})
    assert lines[dashes - 1].split() == " ".join(title for title, _ in COLUMNS["linear"]).split()
    cells = [line.split()[:5] for line in lines[dashes + 1 :]]
    want = [["256x64x2048", "float32", "quiet", f"{p}%", m] for p in (0, 50, 90) for m in ("torch", "crossent")]
    assert cells == want
    assert "failed" not in out and "not installed" not in out


def test_quick_results_are_measured_and_accurate(quick_run):
    _, out_dir = quick_run
    rows = json.loads((out_dir / "bench-linear.json").read_text())["rows"]
    assert sorted({r["ignored"] for r in rows}) == [0.0, 0.5, 0.9]
    for r in rows:
        # crossent's peak at 90% ignored can be all reused pages (its few kept rows fit freed memory): 0 bytes
        assert r["seconds"] > 0 and r["memory"] >= 0, r
        assert r["loss_error"] < 1e-5 and r["grad_error"] < 1e-6, r
        if r["method"] == "torch":
            assert r["ratio"] == 1.0
            assert r["memory"] >= 256 * 2048 * 4, r  # PyTorch holds the (N, V) fp32 logits at least


def test_oracle_matches_float64_autograd_across_blocks(monkeypatch):
    monkeypatch.setattr(linear_ce, "ORACLE_BLOCK_BYTES", 3 * 8 * 50)  # 3 rows per block: 5 blocks, the last short
    x, w = make_inputs((13, 7, 50), "float32")
    t = make_target(13, 50, 0.5)
    loss, dx, dw = linear_ce.oracle(x, w, t)
    x64, w64 = (x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True))
    want = F.cross_entropy(x64 @ w64.T, t, ignore_index=-100)
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(dx, x64.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dw, w64.grad, rtol=1e-12, atol=1e-15)


def test_issue3_script_quick_writes_table_and_plot(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "benchmarks" / "linear_ce.py"))["main"]
    assert main(["--quick", "--out", str(tmp_path), "--methods", "floor", "crossent"]) == 0
    table = (tmp_path / "linear_ce.md").read_text()
    assert [line.split()[4] for line in table.splitlines() if "256x64x2048" in line] == ["floor", "crossent"]
    assert "failed" not in table
    assert (tmp_path / "linear_ce.png").stat().st_size > 5000
