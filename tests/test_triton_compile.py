"""Every Triton launch the public API makes compiles for real GPUs: sm_80, sm_90 and sm_100, no register spills,
shared memory within each architecture's limit.

Triton's interpreter, which runs the kernels in the CPU tests, accepts code its compiler refuses: until this test,
the log-prob stats and distillation kernels read plain-float module globals and raised NameError on every GPU.
``tests/_triton_launches.py`` (its docstring has the details) records the launches of each public function with
``impl="triton"`` over options × dtype × target kind × gradient outputs under the interpreter — the kernels, their
constexprs and options come from the launches, the options from the functions' signatures, so a new kernel,
constexpr or option is covered without editing either file — and compiles each distinct variant with Triton's
bundled ptxas, no GPU needed. Both steps run here in fresh processes (this one may be interpreting).

Print the resource table (registers / shared bytes / resident warps per SM, per architecture)::

    python -m pytest tests/test_triton_compile.py -s

Time: a cold run compiles ~400 variants per architecture (6 CPU-minutes). Each variant's result is keyed by
Triton's own hash of what its cubin depends on (``_triton_launches.result_key``: kernel and callee sources,
signature, constexprs, options, target, ptxas and Triton versions), and the results of the kernels as committed are
kept in ``tests/triton_compile_results.json``: CI (a fresh clone) compiles only the variants whose key is not
there — those of a kernel changed since — and reads the rest. After changing a kernel, refresh the table (the
commit then shows which variants' resources changed)::

    CROSSENT_WRITE_TRITON_TABLE=1 python -m pytest tests/test_triton_compile.py

pytest's cache directory (``.pytest_cache/d/triton_compile``) also keeps the recorded launches under a hash of
crossent's sources and every result compiled here, so a local rerun recompiles nothing it has seen.
"""

from __future__ import annotations

import _triton_mode  # noqa: F401, I001  (first: it may set TRITON_INTERPRET before anything imports Triton)
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("_triton_launches.py")
TABLE = Path(__file__).with_name("triton_compile_results.json")
ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "src" / "crossent"
ARCHES = (80, 90, 100)
pytestmark = pytest.mark.timeout(1800)  # a cold cache on 2 loaded cores


def _sources_hash() -> str:
    """What the recorded launches depend on: crossent's Python sources, the helper, torch's and Triton's versions."""
    import torch
    import triton

    digest = hashlib.sha256(f"{torch.__version__} {triton.__version__}".encode())
    for path in sorted(SOURCES.rglob("*.py")) + [HELPER]:
        digest.update(str(path.resolve().relative_to(ROOT)).encode() + path.read_bytes())
    return digest.hexdigest()[:20]


def _helper(*args: str, env) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, env=env)
    assert run.returncode == 0, f"{' '.join(args[:1])} failed:\n{run.stderr[-5000:]}"
    return run


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """(launches, results): every recorded launch, and one result per compiled (variant, architecture)."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}) or not hasattr(triton, "knobs"):
        pytest.skip("needs Triton >= 3.4 with its NVIDIA backend (ptxas, cuobjdump)")
    tmp = tmp_path_factory.mktemp("triton_compile")
    kept = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: nothing is kept then
    cache = Path(kept.mkdir("triton_compile")) if kept is not None else tmp / "kept"  # apart from the recording
    cache.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton")  # the cubins themselves are not kept: results are
    parts = max(1, min(os.cpu_count() or 1, 4))
    key = _sources_hash()
    recorded = [cache / f"launches-{key}-{k}of{parts}.json" for k in range(parts)]
    if not all(path.exists() for path in recorded):
        runs = [subprocess.Popen([sys.executable, str(HELPER), "record", str(tmp / path.name), "--part", f"{k}/{parts}"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for k, path in enumerate(recorded)]  # fmt: skip
        for run in runs:
            _, err = run.communicate()
            assert run.returncode == 0, f"record failed:\n{err[-5000:]}"
        for stale in cache.glob("launches-*.json"):  # recorded from sources that have changed since
            stale.unlink()
        for path in recorded:
            os.replace(tmp / path.name, path)
    results = tmp / "results.json"
    arch = ",".join(str(a) for a in ARCHES)
    refresh = ["--write-table", str(TABLE)] if os.environ.get("CROSSENT_WRITE_TRITON_TABLE") == "1" else []
    out = _helper("compile", *map(str, recorded), str(results), "--arch", arch, "--cache", str(cache / "results"),
                  "--table", str(TABLE), *refresh, env=env).stdout  # fmt: skip
    print(f"\n{out}")
    launches = [launch for path in recorded for launch in json.loads(path.read_text())["launches"]]
    return launches, json.loads(results.read_text())["results"]


def test_every_launch_compiles_without_spills(compiled):
    launches, results = compiled
    assert {r["arch"] for r in results} == set(ARCHES)
    failed = [f"sm_{r['arch']} {r['kernel']} [{r['variant']}] from {r['caller']}: {r['error']}" for r in results
              if "error" in r]  # fmt: skip
    assert not failed, f"{len(failed)} of {len(results)} variants did not compile:\n" + "\n".join(failed[:20])
    spilled = [f"sm_{r['arch']} {r['kernel']} [{r['variant']}]: LOCAL {r['local']} B" for r in results if r["local"]]
    assert not spilled, "register spills to local memory:\n" + "\n".join(spilled)
    over = [f"sm_{r['arch']} {r['kernel']} [{r['variant']}]: {r['shared']} B > {r['shared_limit']} B" for r in results
            if r["shared"] > r["shared_limit"]]  # fmt: skip
    assert not over, "shared memory over the architecture's limit:\n" + "\n".join(over)
    assert all(r["occupancy"] >= r["num_warps"] for r in results), "a program that cannot be resident"


def _launched_kernels() -> set:
    """(module, name) of every jitted function in crossent.kernels that its module launches (``name[grid](...)``)."""
    import crossent.kernels

    found = set()
    for info in pkgutil.iter_modules(crossent.kernels.__path__, "crossent.kernels."):
        module = importlib.import_module(info.name)
        source = inspect.getsource(module)
        for name, value in vars(module).items():
            if isinstance(getattr(value, "pre_run_hooks", None), list) and f"{name}[" in source:
                found.add((info.name, name))
    return found


def test_every_kernel_is_launched_by_the_grid(compiled):
    # The grid reaches every kernel that crossent launches; one it never launches is named here.
    launches, _ = compiled
    recorded = {(launch["module"], launch["kernel"]) for launch in launches}
    kernels = _launched_kernels()
    assert kernels and kernels <= recorded, f"never launched by the public API grid: {sorted(kernels - recorded)}"
