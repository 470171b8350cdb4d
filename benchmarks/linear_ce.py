"""Issue-3 benchmark: fused linear + cross-entropy vs the matrix-product floor, PyTorch and CCE, on this CPU.

The measurement is :mod:`crossent.bench.linear_ce`'s (``crossent bench --op linear --full`` runs it at these
sizes with 0/50/90% of targets ignored): (N, D, V) = (4096, 1024, 32768) and (2048, 2048, 131072), fp32,
forward+backward, no target ignored; per method the median time (methods interleaved in one process) and the
peak RSS (a fresh process per method); a table (linear_ce.md) and a figure (linear_ce.png) in --out.
Run:  .venv/bin/python benchmarks/linear_ce.py [--reps 3] [--out bench-out] [--methods ...] [--shape N D V] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from crossent.bench import linear_ce, plot
from crossent.bench.linear_methods import METHODS
from crossent.bench.report import format_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, 2 reps: a smoke test")
    parser.add_argument("--out", default="bench-out", help="folder for linear_ce.md and linear_ce.png")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "D", "V"),
                        help="instead of the default shapes (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    shapes, reps = (linear_ce.QUICK_SHAPES, 2) if args.quick else (linear_ce.FULL_SHAPES, args.reps)
    shapes = [tuple(s) for s in args.shape] if args.shape else shapes
    header = (f"linear CE forward+backward, float32, CPU, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, median of {reps}")  # fmt: skip
    print(header, flush=True)
    cases = [linear_ce.Case(shape, "float32", 0.0, "quiet") for shape in shapes]
    rows = linear_ce.run(cases, args.methods, reps)
    table = format_table(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_ce.md").write_text(header + "\n\n```\n" + table + "\n```\n")
    if plot.available():
        plot.write_plot(rows, out / "linear_ce.png")
    print(f"wrote {out / 'linear_ce.md'}" + (f" and {out / 'linear_ce.png'}" if plot.available() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
