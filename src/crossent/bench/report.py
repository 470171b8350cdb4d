"""What ``crossent bench`` measured, one :class:`Row` per (case, method), and its two renderings:
a fixed-width table (the default) and JSON (``--json``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

from crossent import _cpu_level
from crossent._precision import fast_half_products
from crossent.bench.measure import format_bytes
from crossent.kernels import cpu_rows


@dataclass(frozen=True)
class Row:
    """One method in one case. ``ratio`` compares with the PyTorch baseline of the same case, timed in the same
    process, interleaved with it; errors are against a float64 computation on the same (upcast) inputs."""

    op: Literal["ce", "linear"]
    shape: Tuple[int, ...]  # (N, C) for ce, (N, D, V) for linear
    dtype: str
    load: Literal["quiet", "loaded"]  # loaded: one other CPU-bound process ran beside the benchmark
    ignored: float  # fraction of the targets equal to ignore_index (-100)
    method: str
    seconds: Optional[float]  # median of one forward+backward; None when the method did not run
    ratio: Optional[float]  # seconds / the PyTorch baseline's seconds in the same case
    memory: Optional[int]  # ce: bytes saved for backward; linear: peak RSS of one call above the RSS before it
    loss_error: Optional[float]  # |loss − float64 loss|
    grad_error: Optional[float]  # max |grad − float64 grad| over every input gradient
    note: str = ""  # why a method has no figures: "not installed", "failed: ..."


def _ms(seconds: float) -> str:
    """``0.00012345`` → ``'0.123ms'``, ``0.5`` → ``'500.0ms'``, ``12.3`` → ``'12.30s'``.

    >>> _ms(0.00012345), _ms(0.5), _ms(12.3)
    ('0.123ms', '500.0ms', '12.30s')
    """
    if seconds >= 10:
        return f"{seconds:.2f}s"
    return f"{seconds * 1e3:.3f}ms" if seconds < 0.01 else f"{seconds * 1e3:.1f}ms"


def _opt(value, fmt: Callable[[object], str]) -> str:
    return "" if value is None else fmt(value)


def _tflops(r: Row) -> str:
    """TF/s of the fused linear CE on the 6·N·D·V FLOP count (logits, dX and dW: 2·N·D·V each)."""
    n, d, v = r.shape
    return _opt(r.seconds, lambda s: f"{6 * n * d * v / s / 1e12:.3f}")


# (title, cell) per column; the ce table and the linear table differ in shape naming, memory kind and TF/s.
_COMMON_HEAD = [("dtype", lambda r: r.dtype), ("load", lambda r: r.load)]
_COMMON_TAIL = [
    ("median", lambda r: _opt(r.seconds, _ms) or r.note),
    ("vs torch", lambda r: _opt(r.ratio, lambda x: f"{x:.2f}x")),
]
_ERRORS = [
    ("|loss err|", lambda r: _opt(r.loss_error, lambda x: f"{x:.2e}")),
    ("max|grad err|", lambda r: _opt(r.grad_error, lambda x: f"{x:.2e}")),
]
COLUMNS: Mapping[str, List[Tuple[str, Callable[[Row], str]]]] = {
    "ce": [("N x C", lambda r: "x".join(map(str, r.shape))), *_COMMON_HEAD, ("method", lambda r: r.method),
           *_COMMON_TAIL, ("saved for bwd", lambda r: _opt(r.memory, format_bytes)), *_ERRORS],
    "linear": [("N x D x V", lambda r: "x".join(map(str, r.shape))), *_COMMON_HEAD,
               ("ignored", lambda r: f"{r.ignored:.0%}"), ("method", lambda r: r.method), *_COMMON_TAIL,
               ("TF/s", _tflops), ("peak extra RSS", lambda r: _opt(r.memory, format_bytes)), *_ERRORS],
}  # fmt: skip


def format_table(rows: Sequence[Row]) -> str:
    """A right-aligned fixed-width table, one line per row (all rows of one op), the columns of that op."""
    columns = COLUMNS[rows[0].op]
    cells = [[title for title, _ in columns]] + [[cell(r) for _, cell in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(w) for text, w in zip(line, widths)) for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def to_json(meta: Mapping[str, object], rows: Sequence[Row]) -> str:
    """``{"meta": {...}, "rows": [{field: value}, ...]}``, the fields of :class:`Row`."""
    return json.dumps({"meta": dict(meta), "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)


def cpu_paths() -> str:
    """The CPU paths this process takes, for the header: the CPU's x86-64 level (and CROSSENT_CPU_CAPABILITY's where
    it lowers it), whether the C kernels run and which build, whether 16-bit products run natively."""
    level = _cpu_level.detected()
    if _cpu_level.lowered():
        level += f", run as {_cpu_level.level()} ({_cpu_level.ENV})"
    kernels = f"{cpu_rows.VARIANT} build" if cpu_rows.available() else "off (not built)"
    native = [name for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))
              if fast_half_products("cpu", dtype)]  # fmt: skip
    return f"CPU {level}; C kernels: {kernels}; native 16-bit products: {', '.join(native) or 'none'}"
