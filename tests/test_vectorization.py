"""Every loop of ``csrc/cpu_rows.c`` that calls ``exp_f32`` vectorizes at each x86-64 level setup.py builds.

The file is compiled once per level (``-march=x86-64-v2 / v3 / v4``, the flags setup.py gives those builds, and
``x86-64``, the baseline GCC's default build ``_cpu_rows`` targets on x86-64), without multi-versioning, with
GCC's vectorization report (``-fopt-info-vec-all``), and a loop passes when the report says "loop vectorized" for
it and never "not vectorized" / "couldn't vectorize" (a scalar copy of an exp loop costs ~4x: issue 21, where
the clamps in exp_f32 kept every exp loop scalar below AVX-512). The machine running the test need not have the
instructions: only the compiler's report is read. Skipped without an x86-64 GCC ≥ 11 (the first to know the
levels) or without Python's headers.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "crossent" / "csrc" / "cpu_rows.c"
LEVELS = ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")
# a report line: path:line:column: optimized|missed: message
REPORT_LINE = re.compile(r"^(?P<path>.+?):(?P<line>\d+):\d+: (?P<kind>optimized|missed): (?P<message>.*)$")


def _gcc_major() -> int:
    """GCC's major version, 0 where there is no GCC for x86-64 (or ``gcc`` is clang)."""
    gcc = shutil.which("gcc")
    if gcc is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return 0
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    if "clang" in version.lower():
        return 0
    major = subprocess.run([gcc, "-dumpversion"], capture_output=True, text=True).stdout.strip().split(".")[0]
    return int(major) if major.isdigit() else 0


pytestmark = [
    pytest.mark.skipif(_gcc_major() < 11, reason="needs GCC >= 11 for x86-64 (-march=x86-64-v2/v3/v4)"),
    pytest.mark.skipif(not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists(),
                       reason="Python's C headers are not installed"),  # fmt: skip
]


def exp_loops(source: str) -> list[tuple[int, int]]:
    """The (first, last) source lines of every innermost ``for`` loop whose body calls ``exp_f32`` (a braced body up
    to its closing brace; otherwise the one statement after the loop header)."""
    loops = []
    for match in re.finditer(r"\bfor\s*\(", source):
        depth, i = 1, match.end()
        while depth:  # the loop header's closing parenthesis
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        j = i
        while source[j].isspace():
            j += 1
        if source[j] == "{":
            depth, end = 1, j + 1
            while depth:
                depth += {"{": 1, "}": -1}.get(source[end], 0)
                end += 1
        else:
            end = source.index(";", j) + 1
        if "exp_f32(" in source[i:end] and not re.search(r"\bfor\s*\(", source[i:end]):  # innermost loops
            loops.append((source.count("\n", 0, match.start()) + 1, source.count("\n", 0, end) + 1))
    return loops


def unvectorized(source_path: Path, level: str) -> list[str]:
    """The report's lines that show a loop calling exp_f32 in ``source_path`` left scalar when compiled at
    ``level`` (no multi-versioning), and a line for each such loop the report never calls vectorized."""
    include = sysconfig.get_paths()["include"]
    result = subprocess.run(
        ["gcc", "-O3", "-fopenmp", f"-march={level}", f"-I{include}", "-fPIC", "-c", str(source_path),
         "-o", "/dev/null", "-fopt-info-vec-all"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    reports = [m for m in map(REPORT_LINE.match, result.stderr.splitlines()) if m is not None]
    problems = []
    for first, last in exp_loops(source_path.read_text()):
        inside = [m for m in reports if first <= int(m["line"]) <= last]
        missed = [m.group(0) for m in inside if m["kind"] == "missed" and "vectoriz" in m["message"]]
        problems += missed
        if not missed and not any(m["message"].startswith("loop vectorized") for m in inside):
            problems.append(f"{source_path.name}:{first}: the loop calling exp_f32 is never reported vectorized")
    return problems


def test_the_exp_loops_are_found():
    # the block kernels' exp loops: sum (float64 lanes, and fp32 runs), exp-and-sum (fp32 runs), sum with Σ p log p,
    # gradient (with and without weights), log-probs gradient (with and without entropy), distillation's row pass
    # (both rows' exps and the divergence) and shifted exp
    assert len(exp_loops(SOURCE.read_text())) == 10


@pytest.mark.parametrize("level", LEVELS)
def test_every_exp_loop_vectorizes(level):
    problems = unvectorized(SOURCE, level)
    assert not problems, f"at -march={level}:\n" + "\n".join(problems)
