"""``crossent bench --plot PATH``: the table as a figure (matplotlib, an optional dependency).

Top, each method's median time over the PyTorch baseline's in the same case (below 1: faster than
PyTorch); bottom, its memory (saved for backward for ce, peak extra RSS for linear); both log scale. One
group of bars per case, one bar per method.
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
    from matplotlib.ticker import FormatStrFormatter

    cases: List[str] = list(dict.fromkeys(_case(r) for r in rows))
    methods: List[str] = list(dict.fromkeys(r.method for r in rows))
    by: Dict[tuple, Row] = {(_case(r), r.method): r for r in rows}
    width = 0.8 / len(methods)
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(cases)), 8))
    for k, method in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(cases))]
        got = [by.get((c, method)) for c in cases]
        ax_t.bar(xs, [r.ratio if r and r.ratio else float("nan") for r in got], width, label=method)
        ax_m.bar(xs, [r.memory if r and r.memory else float("nan") for r in got], width, label=method)
    # Log axes start below the smallest bar (a log bar has no zero to grow from), so lengths compare.
    ratios = [r.ratio for r in rows if r.ratio] or [1.0]
    memory = [r.memory for r in rows if r.memory] or [1]
    ax_t.set_yscale("log", base=2)
    ax_t.set_ylim(min(min(ratios), 1.0) / 2, max(max(ratios), 1.0) * 1.5)
    ax_t.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_t.axhline(1.0, color="black", linewidth=0.8)
    ax_t.set_title("median time / PyTorch's (same case, interleaved; below 1: faster)")
    ax_m.set_yscale("log")
    ax_m.set_ylim(min(memory) / 4, max(memory) * 2)
    ax_m.set_title(MEMORY_TITLE[rows[0].op])
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(cases)), cases, fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    ax_t.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
