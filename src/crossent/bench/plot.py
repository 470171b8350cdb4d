"""``crossent bench --plot PATH``: the table as a figure (matplotlib, an optional dependency).

Left, each method's median time over the PyTorch baseline's in the same case (below 1: faster than
PyTorch); right, its memory (saved for backward for ce, peak extra RSS for linear), log scale. One group of
bars per case, one bar per method.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, List, Sequence

from crossent.bench.report import Row

MEMORY_TITLE = {"ce": "saved for backward (bytes)", "linear": "peak extra RSS (bytes)"}


def available() -> bool:
    """Whether matplotlib is installed (``pip install 'crossent[plot]'``)."""
    return importlib.util.find_spec("matplotlib") is not None


def _case(r: Row) -> str:
    """The x-axis label of the group ``r`` belongs to: every field of the case, none of the method."""
    ignored = f" {r.ignored:.0%} ign." if r.op == "linear" else ""
    return f"{'x'.join(map(str, r.shape))}\n{r.dtype}{ignored} {r.load}"


def write_plot(rows: Sequence[Row], path: Path) -> None:
    """Write the figure of ``rows`` (one op) to ``path``; the format follows the suffix (.png, .svg, .pdf)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    cases: List[str] = list(dict.fromkeys(_case(r) for r in rows))
    methods: List[str] = list(dict.fromkeys(r.method for r in rows))
    by: Dict[tuple, Row] = {(_case(r), r.method): r for r in rows}
    width = 0.8 / len(methods)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(cases)) * 1.6, 4.5))
    for k, method in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(cases))]
        got = [by.get((c, method)) for c in cases]
        ax_t.bar(xs, [r.ratio if r and r.ratio is not None else 0 for r in got], width, label=method)
        ax_m.bar(xs, [r.memory if r and r.memory else 0 for r in got], width, label=method)
    ax_t.axhline(1.0, color="black", linewidth=0.8)
    ax_t.set_title("median time / PyTorch's (same case, interleaved)")
    ax_m.set_title(MEMORY_TITLE[rows[0].op])
    ax_m.set_yscale("log")
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(cases)), cases, fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    ax_t.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
