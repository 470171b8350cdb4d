"""The CPU's level and CROSSENT_CPU_CAPABILITY (crossent._cpu_level): the flags each level needs, what the switch
accepts, that it only lowers, what it turns off — and the CPU-path-dependent tests (marked ``cpu_path``) run again
under the switch at x86-64-v3, so that a CI machine with AVX-512 and AVX512-BF16 also takes an AVX2 CPU's paths
(issue 21: seven tests failed on such a CPU only)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossent import _cpu_level, _precision
from crossent.kernels import cpu_rows

V2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@pytest.fixture
def level(monkeypatch):
    """Set CROSSENT_CPU_CAPABILITY and the CPU's detected level, and clear the cached answers around the test."""

    def setup(requested, cpu):
        monkeypatch.setenv(_cpu_level.ENV, requested)
        monkeypatch.setattr(_cpu_level, "detected", lambda: cpu)
        _cpu_level.level.cache_clear()
        _precision.fast_half_products.cache_clear()

    yield setup
    _cpu_level.level.cache_clear()
    _precision.fast_half_products.cache_clear()


@pytest.mark.parametrize(
    "flags, want",
    [(set(), "default"), (V2, "x86-64-v2"), (V3, "x86-64-v3"), (V4, "x86-64-v4"),
     (V4 - {"movbe"}, "x86-64-v2"),  # AVX-512 without a v3 flag: only what every level up to it has counts
     (V3 - {"sse4_2"}, "default")],
)  # fmt: skip
def test_level_of_the_cpu_flags(flags, want):
    assert _cpu_level.level_of(flags | {"fpu", "sse2"}) == want


@pytest.mark.parametrize("requested, want", [("", "x86-64-v4"), ("x86-64-v3", "x86-64-v3"), (" Default ", "default"),
                                             ("x86-64-v4", "x86-64-v4")])  # fmt: skip
def test_the_switch_lowers_the_level(requested, want, level):
    level(requested, "x86-64-v4")
    assert _cpu_level.level() == want
    assert _cpu_level.lowered() == (want != "x86-64-v4")


def test_the_switch_never_raises_the_level(level):
    level("x86-64-v4", "x86-64-v3")
    with pytest.warns(RuntimeWarning, match="CROSSENT_CPU_CAPABILITY=x86-64-v4 asks for more than this CPU has"):
        assert _cpu_level.level() == "x86-64-v3"
    assert not _cpu_level.lowered()


def test_an_unknown_level_raises(level):
    level("avx2", "x86-64-v4")
    with pytest.raises(ValueError, match=r"CROSSENT_CPU_CAPABILITY='avx2': expected one of default, x86-64-v2"):
        _cpu_level.level()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_below_the_cpus_level_16_bit_products_are_not_native(dtype, level, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: True)
    level("x86-64-v3", "x86-64-v4")
    assert not _precision.fast_half_products("cpu", dtype)
    assert _precision.fast_half_products("cuda", dtype)  # the switch is about the CPU
    level("", "x86-64-v4")
    assert _precision.fast_half_products("cpu", dtype)


def _run(code: str, **env) -> str:
    """``code``'s stdout in a fresh interpreter with ``env`` added to the environment."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_the_switch_picks_the_build_and_turns_16_bit_products_off():
    """In a fresh process (the level is read once, at import): every level at or below the CPU's runs its own
    build, where it was built (setup.py builds them all with GCC or clang on x86-64)."""
    code = ("from crossent.kernels import cpu_rows; from crossent._precision import fast_half_products as f; "
            "import torch; print(cpu_rows.VARIANT, f('cpu', torch.bfloat16), f('cpu', torch.float16))")  # fmt: skip
    cpu = _cpu_level.detected()
    for requested in _cpu_level.LEVELS[: _cpu_level.LEVELS.index(cpu)]:
        variant, bf16, fp16 = _run(code, CROSSENT_CPU_CAPABILITY=requested).split()
        assert (bf16, fp16) == ("False", "False")
        if importlib.util.find_spec(f"crossent.{cpu_rows.BUILDS[requested]}") is not None:
            assert variant == requested


@pytest.mark.timeout(900)
@pytest.mark.skipif(bool(os.environ.get(_cpu_level.ENV)), reason="this run is already under the switch")
@pytest.mark.skipif(_cpu_level.detected() in ("default", "x86-64-v2", "x86-64-v3"),
                    reason="the CPU is at most x86-64-v3: this run took those paths already")  # fmt: skip
def test_cpu_path_tests_pass_at_x86_64_v3(tmp_path):
    """The tests marked ``cpu_path`` again, in a fresh pytest under CROSSENT_CPU_CAPABILITY=x86-64-v3: an AVX2 CPU's
    C kernels and fp32 products of 16-bit operands, on a CI machine that has AVX-512 and bf16 matrix units. PyTorch
    takes its AVX2 kernels too (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), as on such a CPU: the tests compare with
    its results, which round differently there (a tolerance set on AVX-512 rounding failed on AVX2). Inductor gets
    its own cache: it does not key on ATEN_CPU_CAPABILITY."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, _cpu_level.ENV: "x86-64-v3", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-m", "cpu_path", "-q", "-p", "no:cacheprovider", "-x"],
        cwd=root, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
