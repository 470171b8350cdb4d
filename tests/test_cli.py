"""`crossent bench` (cross_entropy): tables, JSON, plot, the loaded mode's busy process, flag errors."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crossent import cli
from crossent.bench import cross_entropy as ce_bench
from crossent.bench import linear_ce, load, plot
from crossent.bench.report import COLUMNS

CE_TITLES = [title for title, _ in COLUMNS["ce"]]


def _table_rows(out: str):
    """The first four cells (shape, dtype, load, method) of each data line of the table in ``out``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line) == {"-"})
    return lines[start - 1], [line.split()[:4] for line in lines[start + 1 :]]


def _children(pid: int):
    """PIDs of the live (not reaped) children of ``pid``, from /proc."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += (task / "children").read_text().split()
    return kids


def test_quick_prints_a_table_with_a_row_per_method(capsys):
    assert cli.main(["bench", "--quick"]) == 0
    head, rows = _table_rows(capsys.readouterr().out)
    assert head.split() == " ".join(CE_TITLES).split()
    assert rows == [["64x1000", "float32", "quiet", method] for method in ce_bench.METHODS]


def test_json_is_parseable_and_out_writes_both_files(capsys, tmp_path):
    assert cli.main(["bench", "--quick", "--json", "--out", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else
    assert data["meta"]["op"] == "ce" and data["meta"]["mode"] == "quick"
    assert [r["method"] for r in data["rows"]] == list(ce_bench.METHODS)
    torch_row, ours = data["rows"]
    assert torch_row["ratio"] == 1.0 and ours["ratio"] == pytest.approx(ours["seconds"] / torch_row["seconds"])
    assert json.loads((tmp_path / "bench-ce.json").read_text())["rows"] == data["rows"]
    assert (tmp_path / "bench-ce.txt").read_text().count("64x1000") == 2


def test_header_and_meta_name_the_cpu_paths_that_run(monkeypatch, capsys):
    from crossent.bench import report

    assert cli.main(["bench", "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["meta"]["cpu"] == report.cpu_paths()
    assert cli.main(["bench", "--quick"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(f"threads; {report.cpu_paths()}")
    # cpu_paths' other cases, faked: the switch below an AVX-512 CPU, and a machine without the C kernels
    monkeypatch.setattr(report._cpu_level, "detected", lambda: "x86-64-v4")
    monkeypatch.setattr(report._cpu_level, "level", lambda: "x86-64-v3")
    monkeypatch.setattr(report.cpu_rows, "VARIANT", "x86-64-v3")
    monkeypatch.setattr(report.cpu_rows, "available", lambda: True)
    monkeypatch.setattr(report, "fast_half_products", lambda device, dtype: dtype == torch.bfloat16)
    assert report.cpu_paths() == ("CPU x86-64-v4, run as x86-64-v3 (CROSSENT_CPU_CAPABILITY); C kernels: x86-64-v3 "
                                  "build; native 16-bit products: bf16")  # fmt: skip
    monkeypatch.setattr(report._cpu_level, "level", lambda: "x86-64-v4")
    monkeypatch.setattr(report.cpu_rows, "available", lambda: False)
    monkeypatch.setattr(report, "fast_half_products", lambda device, dtype: False)
    assert report.cpu_paths() == "CPU x86-64-v4; C kernels: off (not built); native 16-bit products: none"


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "bench.png"
    assert cli.main(["bench", "--quick", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_without_matplotlib_is_refused_before_measuring(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(plot, "available", lambda: False)
    monkeypatch.setattr(ce_bench, "run", _must_not_run)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick", "--plot", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install 'crossent[plot]'" in err


def test_results_are_accurate_and_crossent_saves_o_n():
    rows = ce_bench.measure(ce_bench.Case((37, 129), "float32", "quiet"), torch.device("cpu"), reps=1)
    by_method = {r.method: r for r in rows}
    assert by_method["torch"].ratio == 1.0
    # PyTorch keeps the (N, C) fp32 log-probabilities; crossent only O(N) (target + float64 lse + small).
    assert by_method["torch"].memory >= 37 * 129 * 4
    assert by_method["crossent"].memory <= 37 * 64
    for r in rows:
        assert r.loss_error < 1e-5 and r.grad_error < 1e-6, r


def test_loaded_mode_runs_a_busy_process_during_timing_and_stops_it(monkeypatch, capsys):
    seen = []
    real = load.busy_process

    @contextlib.contextmanager
    def spy(seconds):
        with real(seconds) as proc:
            seen.append((proc, proc.poll() is None and str(proc.pid) in _children(os.getpid())))
            yield proc

    monkeypatch.setattr(load, "busy_process", spy)
    others = set(_children(os.getpid()))  # e.g. inductor's compile workers, left by an earlier test in this process
    assert cli.main(["bench", "--quick", "--load", "both", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["load"], r["method"]) for r in rows] == [
        ("quiet", "torch"), ("quiet", "crossent"), ("loaded", "torch"), ("loaded", "crossent")]  # fmt: skip
    assert [alive for _, alive in seen] == [True]  # one busy child, alive while the loaded case ran
    assert seen[0][0].returncode is not None and set(_children(os.getpid())) <= others  # stopped, nothing new left


def test_busy_process_is_busy_and_stopped_even_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with load.busy_process(60) as proc:
            before = _cpu_ticks(proc.pid)
            deadline = time.monotonic() + 5
            while _cpu_ticks(proc.pid) < before + 10 and time.monotonic() < deadline:  # 10 ticks = 0.1 s of CPU
                pass
            assert _cpu_ticks(proc.pid) >= before + 10, "the busy process does not use the CPU"
            raise RuntimeError("boom")
    assert proc.returncode is not None and str(proc.pid) not in _children(os.getpid())


def test_busy_process_ends_by_itself_after_its_bound():
    with load.busy_process(0.2) as proc:
        assert proc.wait(timeout=30) == 0  # exited on its own, before the with block ended


def test_module_entry_point_with_explicit_shape_and_dtype():
    proc = subprocess.run(
        [sys.executable, "-m", "crossent", "bench", "--shape", "8x50", "--reps", "1", "--dtype", "bfloat16"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _, rows = _table_rows(proc.stdout)
    assert rows == [["8x50", "bfloat16", load_, m] for load_ in ("quiet", "loaded") for m in ce_bench.METHODS]


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--op", "--quick", "--full", "--shape", "--dtype", "--load", "--device", "--reps", "--json",
                 "--plot", "--out"):  # fmt: skip
        assert flag in out, flag


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "8by50"], "argument --shape: shape must be sizes joined by x"),
        (["--shape", "0x5"], "argument --shape: shape must have 2 or 3 sizes, each >= 1"),
        (["--shape", "8x5x3"], "--shape for --op ce must be NxC"),
        (["--op", "linear", "--shape", "8x5"], "--shape for --op linear must be NxDxV"),
        (["--reps", "0"], "argument --reps: must be a whole number >= 1"),
        (["--quick", "--full"], "argument --full: not allowed with argument --quick"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--load", "heavy"], "argument --load: invalid choice: 'heavy'"),
        (["--op", "mse"], "argument --op: invalid choice: 'mse'"),
        (["--op", "linear", "--device", "cuda"], "--device cuda: --op linear measures peak RSS"),
    ],
)
def test_bad_flags_are_refused_with_a_message_naming_the_flag(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(ce_bench, "run", _must_not_run)
    monkeypatch.setattr(linear_ce, "run", _must_not_run)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def _must_not_run(*args, **kwargs):
    raise AssertionError("a refused command must not start measuring")


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])

