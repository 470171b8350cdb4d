"""The C row kernels against the torch-ops kernels they replace and against PyTorch, in one process (CPU).

Per (N, C) and dtype, cross-entropy forward+backward (mean, class indices): ``F.cross_entropy``; crossent with the C
kernels (``crossent._cpu_rows``); crossent with ``cpu_rows.ENABLED = False`` (the torch-ops kernels, what a machine
without a C compiler runs). Methods interleaved (``bench.measure.interleaved_medians``); ratios to PyTorch.
Shapes above 2^20 logits only: below, ``cross_entropy`` takes PyTorch's fused ops (``_materialized.py``) anyway.

Run:  .venv/bin/python benchmarks/cpu_kernels.py [--reps 5] [--load loaded]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import crossent
from crossent.bench import load
from crossent.bench.measure import interleaved_medians
from crossent.kernels import cpu_rows

SHAPES = [(128, 32000), (4096, 32768), (1024, 131072)]


def methods(x: torch.Tensor, t: torch.Tensor):
    def step(fn):
        def run():
            fn(x, t).backward()
            x.grad = None

        return run

    def with_c(enabled):
        def loss(a, b):
            saved, cpu_rows.ENABLED = cpu_rows.ENABLED, enabled
            try:
                return crossent.cross_entropy(a, b)
            finally:
                cpu_rows.ENABLED = saved

        return loss

    return {"torch": step(F.cross_entropy), "C kernels": step(with_c(True)), "torch ops": step(with_c(False))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--load", default="quiet", choices=["quiet", "loaded"])
    args = parser.parse_args(argv)
    if not cpu_rows.available():
        raise SystemExit("crossent._cpu_rows was not built (no C compiler at install): nothing to compare")
    print(f"cross_entropy forward+backward, CPU, {args.load}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, median of {args.reps} (interleaved); ratio to F.cross_entropy")  # fmt: skip
    print(f"{'N x C':>12} {'dtype':>9} {'torch':>9} {'C kernels':>10} {'torch ops':>10}")
    for n, c in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
            t = torch.randint(0, c, (n,), generator=g)
            fns = methods(x, t)
            for fn in fns.values():  # warm-up
                fn()
            with load.condition(args.load):
                sec = interleaved_medians(fns, args.reps, min_sample=0.02)
            base = sec["torch"]
            print(f"{n:>5}x{c:<6} {str(dtype)[6:]:>9} {base * 1e3:7.1f}ms {sec['C kernels'] / base:9.2f}x "
                  f"{sec['torch ops'] / base:9.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
