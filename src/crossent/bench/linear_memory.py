"""Peak memory of one fused-linear-CE method, measured in a fresh Python process (Linux ``/proc``).

A fresh process per method keeps one method's allocator caches, lazy imports and compiled code out of
another's figure. In it: one warm-up call, then per ignore fraction the peak RSS of one forward+backward
above the RSS before it (inputs excluded; the gradients dX and dW count). glibc's mmap threshold is pinned
to 1 MiB there, so large blocks are unmapped when freed and RSS follows the live tensors instead of keeping
the warm-up's freed blocks.

Run by :func:`peak_rss` as ``python -m crossent.bench.linear_memory METHOD NxDxV DTYPE FRACTION...``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, Sequence, Tuple

from crossent.bench.linear_methods import make_inputs, make_target, run_step


def peak_rss(method: str, shape: Tuple[int, int, int], dtype: str, fractions: Sequence[float]) -> Dict[float, int]:
    """Peak extra bytes of one call of ``method`` per ignore fraction, from a fresh process.

    Raises:
        RuntimeError: the process failed; the message is the last line of its stderr.
    """
    cmd = [sys.executable, "-m", __name__, method, "x".join(map(str, shape)), dtype, *map(str, fractions)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
    return {float(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _measure(method: str, shape: Tuple[int, int, int], dtype: str, fractions: Sequence[float]) -> Dict[float, int]:
    """In this (fresh) process: a warm-up call (lazy imports, compilation, allocator set-up stay out of the
    peak), then one measured call per fraction, each also the warm-up of the next."""
    x, w = make_inputs(shape, dtype)
    peaks = {}
    for i, fraction in enumerate(fractions):
        t = make_target(shape[0], shape[2], fraction)
        if i == 0:
            run_step(method, x, w, t)
        x.grad = w.grad = None
        base = _rss_bytes("VmRSS")
        _reset_peak_rss()
        run_step(method, x, w, t)
        peaks[fraction] = _rss_bytes("VmHWM") - base
    return peaks


def _rss_bytes(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


if __name__ == "__main__":
    method, shape, dtype, *fractions = sys.argv[1:]
    n, d, v = (int(s) for s in shape.split("x"))
    print(json.dumps(_measure(method, (n, d, v), dtype, [float(f) for f in fractions])))
