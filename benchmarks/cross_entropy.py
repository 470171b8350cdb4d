"""Issue-2 benchmark: fp32 forward+backward of crossent.cross_entropy vs F.cross_entropy on this CPU.

Both run in one process on the same tensors; the table gives medians and the ratio to PyTorch.
Run:  .venv/bin/python benchmarks/cross_entropy.py [--reps 7] [--dtype float32]
(`crossent bench` runs the same measurement on its default shapes.)
"""

from __future__ import annotations

import argparse

import torch

from crossent.bench import cross_entropy as ce_bench
from crossent.cli import DTYPES

SHAPES = ((4096, 32768), (1024, 131072))  # issue 2: the sizes of LLM loss heads with 32k and 128k vocabularies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, median of {args.reps}")
    results = ce_bench.run(SHAPES, DTYPES[args.dtype], torch.device(args.device), args.reps)
    print(ce_bench.format_table(results))


if __name__ == "__main__":
    main()
