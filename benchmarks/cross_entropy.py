"""Issue-2 benchmark: forward+backward of crossent.cross_entropy vs F.cross_entropy on this machine.

Both run in one process on the same tensors, timed in turns; the table gives medians and the ratio to PyTorch.
Run:  .venv/bin/python benchmarks/cross_entropy.py [--reps 7] [--dtype float32]
(`crossent bench --full --load quiet` runs the same measurement on these and the small shapes.)
"""

from __future__ import annotations

import argparse

import torch

from crossent.bench import cross_entropy as ce_bench
from crossent.bench.measure import DTYPES
from crossent.bench.report import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, median of {args.reps}")
    cases = [ce_bench.Case(shape, args.dtype, "quiet") for shape in ce_bench.LARGE_SHAPES]  # issue 2's sizes
    print(format_table(ce_bench.run(cases, torch.device(args.device), args.reps)))


if __name__ == "__main__":
    main()
