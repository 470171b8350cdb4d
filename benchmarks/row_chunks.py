"""Chunk size of the torch row kernels (``torch_rows.CHUNK_ELEMENTS``) against PyTorch, in one process.

For each candidate chunk size (log2 elements) and for ``F.cross_entropy``, forward+backward is timed in turns
(best of 2 per turn, median over turns); the ratio is against PyTorch's time in the same turns. Run quiet and
with another process busy (e.g. ``python -c "while True: pass" &``): the row kernels run a few parallel regions
per chunk, and every region ends in a barrier that a taken core stalls. The C kernels (``kernels/cpu_rows``) take
whole rows without chunks, so they are switched off here: this measures the torch-ops kernels, what a machine
without a C compiler runs (``benchmarks/cpu_kernels.py`` compares the two).

Run:  .venv/bin/python benchmarks/row_chunks.py [--shape 4096 32768] [--dtype float32] [--log2 21 22 23] [--turns 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import crossent
from crossent.kernels import cpu_rows, torch_rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 32768), metavar=("N", "C"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--log2", type=int, nargs="+", default=[21, 22, 23])
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    n, c = args.shape
    z = torch.randn(n, c).to(getattr(torch, args.dtype)).requires_grad_()
    t = torch.randint(0, c, (n,))

    def ours():
        crossent.cross_entropy(z, t, impl="torch").backward()
        z.grad = None

    def theirs():
        F.cross_entropy(z, t).backward()
        z.grad = None

    key = "cpu16" if z.dtype.itemsize == 2 else "cpu"  # the entry this dtype's chunks are sized by
    saved, saved_c = torch_rows.CHUNK_ELEMENTS[key], cpu_rows.ENABLED
    cpu_rows.ENABLED = False
    times = {k: [] for k in [*args.log2, "torch"]}
    try:
        for _ in range(args.turns):
            for k in times:
                if k != "torch":
                    torch_rows.CHUNK_ELEMENTS[key] = 1 << k
                fn = theirs if k == "torch" else ours
                fn()
                best = []
                for _ in range(2):
                    start = time.perf_counter()
                    fn()
                    best.append(time.perf_counter() - start)
                times[k].append(min(best))
    finally:
        torch_rows.CHUNK_ELEMENTS[key], cpu_rows.ENABLED = saved, saved_c
    base = statistics.median(times["torch"])
    print(f"{n}x{c} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for k, v in times.items():
        name = "F.cross_entropy" if k == "torch" else f"chunk 2^{k}"
        print(f"{name:16} {statistics.median(v):8.3f} s  {statistics.median(v) / base:5.2f}x")


if __name__ == "__main__":
    main()
