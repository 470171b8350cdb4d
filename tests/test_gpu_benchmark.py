"""benchmarks/gpu.py --smoke: every code path of the GPU benchmark runs on CPU (Triton's interpreter); --predict's
speed-of-light table against hand-computed values."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
# format_rows' fixed-width prefix: shape (20), dtype (5), method (22), each followed by one space
CELLS_AT = 20 + 1 + 5 + 1 + 22 + 1
COLUMNS = ("ms", "rate", "peak_pct", "ratio", "mem", "mem_floor", "error")


def run_smoke(*extra: str) -> str:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", *extra], capture_output=True, text=True, env=env, timeout=180
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "device: cpu" in run.stdout
    return run.stdout


@pytest.fixture(scope="module")
def smoke_out() -> str:
    """One smoke run of every section, shared by the tests below (it is the slow part)."""
    return run_smoke()


def section_rows(out: str, title: str) -> Dict[str, Dict[str, Optional[float]]]:
    """The table printed under the title that starts with ``title``: method -> its numeric cells (None for "–").
    A skipped or failed method fails the parse (its cells are a note), so a test sees it."""
    blocks = [block for block in out.split("\n\n") if block.startswith(title)]
    assert len(blocks) == 1, out
    lines = blocks[0].splitlines()
    header, table = lines[1], lines[3:]  # title, header, dashes, rows
    columns = (("value",) if " value " in header else ()) + COLUMNS
    rows = {}
    for line in table:
        method, cells = line[CELLS_AT - 23 : CELLS_AT].strip(), line[CELLS_AT:].split()
        assert len(cells) == len(columns), f"row {method!r} did not run: {line}"
        rows[method] = {name: None if cell == "–" else float(cell) for name, cell in zip(columns, cells)}
    return rows


def finite(row: Dict[str, Optional[float]], names: List[str]) -> bool:
    return all(row[name] is not None and math.isfinite(row[name]) for name in names)


def test_gpu_benchmark_smoke(smoke_out):
    out = smoke_out
    for method in ("F.cross_entropy", "torch.compile(F.ce)", "crossent in-place", "GEMM floor", "eager F.ce"):
        assert method in out, out
    # every plain-CE row of crossent timed and with a loss error printed (not "failed"/"skipped")
    crossent_rows = [line for line in out.splitlines() if " crossent" in line and "x1000" in line]
    assert len(crossent_rows) == 4 and not any("failed" in line for line in crossent_rows), out


def test_gpu_benchmark_sweep():
    out = run_smoke("--sweep")
    assert out.count("BLOCK=") == 4, out


def test_log_probs_section(smoke_out):
    rows = section_rows(smoke_out, "fused per-token log-probs")
    # TRL's fused head (trl.kernels.ChunkedLogProbFunction, the crossent[trl] extra) is a peer where installed
    methods = ["materialized", "crossent", "crossent lp"] + (["TRL"] if importlib.util.find_spec("trl") else [])
    assert list(rows) == ["4-GEMM floor", *methods, "1-GEMM floor (no grad)", *(f"{m} (no grad)" for m in methods)]
    for method, row in rows.items():
        assert finite(row, ["ms", "rate", "ratio"]) and row["ms"] > 0, (method, row)
    assert rows["4-GEMM floor"]["ratio"] == rows["1-GEMM floor (no grad)"]["ratio"] == 1.0
    # every fwd+bwd method against the fp32 reference (fp32 smoke inputs: rounding only); a wrong sign, a
    # missing entropy or misaligned ids would be O(1)
    for method in methods:
        assert finite(rows[method], ["error", "mem_floor"]) and rows[method]["error"] < 1e-4, (method, rows[method])


def test_distill_section(smoke_out):
    rows = section_rows(smoke_out, "fused distillation")
    assert list(rows) == ["4-GEMM floor", "materialized β=0", "crossent β=0", "materialized β=0.5",
                          "crossent β=0.5"], rows  # fmt: skip
    for method, row in rows.items():
        assert finite(row, ["ms", "rate", "ratio"]) and row["ms"] > 0, (method, row)
    for beta in ("0", "0.5"):
        fused, recipe = rows[f"crossent β={beta}"], rows[f"materialized β={beta}"]
        assert finite(fused, ["value", "error"]) and finite(recipe, ["value", "error"]), (fused, recipe)
        assert fused["value"] > 1e-3, fused  # a divergence the teacher's perturbation makes non-trivial
        assert abs(fused["value"] - recipe["value"]) <= 1e-5 * max(1.0, recipe["value"]), (fused, recipe)
        assert fused["error"] < 1e-5 and recipe["error"] < 1e-5, (fused, recipe)
    # the two betas are different divergences (a beta that never reached the kernels would print one value twice)
    assert rows["crossent β=0"]["value"] != rows["crossent β=0.5"]["value"], rows


def test_predict_prints_the_speed_of_light_table():
    run = subprocess.run([sys.executable, str(SCRIPT), "--predict"], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    sol = {}
    for line in run.stdout.splitlines()[3:]:
        section, shape, dtype, work, *_, last = line.split()
        sol[(section, shape, dtype, work)] = float(last)
    assert {key[0] for key in sol} == {"ce", "lce", "lp", "distill"}, run.stdout
    # by hand, H100 SXM: plain CE bf16 moves 3·N·C·2 + 32·N = 6 442 713 088 B → / 3.35e12 B/s = 1.923 ms;
    # the fused CE's 6·N·D·V = 2.582e13 FLOP → / 989e12 FLOP/s = 26.109 ms (its 2.2 GB take 0.67 ms: compute-bound)
    assert sol[("ce", "8192x131072", "bf16", "fwd+bwd")] == 1.923, run.stdout
    assert sol[("lce", "8192x4096x128256", "bf16", "fwd+bwd")] == 26.109, run.stdout
    assert sol[("lp", "8192x4096x128256", "bf16", "fwd")] == 8.703, run.stdout  # no grad: 2·N·D·V, 1 of the 4 GEMMs
