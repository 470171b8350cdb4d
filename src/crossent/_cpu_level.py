"""The CPU's instruction-set level, and ``CROSSENT_CPU_CAPABILITY``, the switch that makes crossent take a lesser
CPU's paths (modelled on PyTorch's ``ATEN_CPU_CAPABILITY``).

Levels, lowest first: ``default`` (the compiler's baseline: any CPU), ``x86-64-v2`` (SSE4.2, POPCNT),
``x86-64-v3`` (AVX2, FMA, BMI2, F16C), ``x86-64-v4`` (AVX-512 F/BW/CD/DQ/VL). The level decides which build of the
C kernels runs (``crossent.kernels.cpu_rows``: ``_cpu_rows_v4`` … ``_cpu_rows``) and, below the CPU's own level,
turns native 16-bit products off (``crossent._precision.fast_half_products``: no level below the CPU's is taken to
have AVX512-BF16 / AMX). The switch may lower the level, never raise it: asking for more than the CPU has gives
a RuntimeWarning and the CPU's own level (running x86-64-v4 code on a v3 CPU would crash on the first AVX-512
instruction; PyTorch clamps its switch the same way). It is read once, at ``import crossent``.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
import torch

ENV = "CROSSENT_CPU_CAPABILITY"
LEVELS = ("default", "x86-64-v2", "x86-64-v3", "x86-64-v4")  # lowest first

# The /proc/cpuinfo flags each x86-64 level adds to the one below (the psABI's list; "pni" is SSE3, "abm" LZCNT)
_FLAGS = {
    "x86-64-v2": {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"},
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}
# Elsewhere than Linux: PyTorch's own CPU capability (its AVX2 asks AVX2 and FMA, close to x86-64-v3)
_ATEN = {"AVX512": "x86-64-v4", "AVX2": "x86-64-v3"}


@functools.lru_cache(maxsize=None)
def detected() -> str:
    """The CPU's own level: from the flags the kernel reports in /proc/cpuinfo (Linux x86-64), else PyTorch's CPU
    capability; ``default`` on other architectures."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next(line for line in cpuinfo if line.startswith("flags"))
    except (OSError, StopIteration):
        return _ATEN.get(torch.backends.cpu.get_cpu_capability(), "default")
    return level_of(set(line.split(":", 1)[1].split()))


def level_of(flags: set) -> str:
    """The highest x86-64 level whose flags (and every lower level's) are all in ``flags``."""
    level = "default"
    for name in LEVELS[1:]:
        if not _FLAGS[name] <= flags:
            break
        level = name
    return level


@functools.lru_cache(maxsize=None)
def level() -> str:
    """The level crossent runs at: ``CROSSENT_CPU_CAPABILITY`` where set (at most :func:`detected`), else the CPU's.

    Raises ValueError for a value that names no level."""
    requested = os.environ.get(ENV, "").strip().lower()
    if not requested:
        return detected()
    if requested not in LEVELS:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(LEVELS)} (or unset: the CPU's own)")
    if LEVELS.index(requested) > LEVELS.index(detected()):
        warnings.warn(f"{ENV}={requested} asks for more than this CPU has ({detected()}): running at {detected()}",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return detected()
    return requested


def lowered() -> bool:
    """Whether the switch holds crossent below the CPU's own level (its 16-bit product units then count as absent)."""
    return level() != detected()

