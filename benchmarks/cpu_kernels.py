"""The C row kernels against the torch-ops kernels they replace and against PyTorch, in one process (CPU).

Per (N, C) and dtype, cross-entropy forward+backward (mean, class indices): ``F.cross_entropy``; crossent with the C
kernels (``crossent._cpu_rows``); crossent with ``cpu_rows.ENABLED = False`` (the torch-ops kernels, what a machine
without a C compiler runs). Methods interleaved (``bench.measure.interleaved_medians``); ratios to PyTorch.
Shapes above 2^20 logits only: below, ``cross_entropy`` takes the small-input path (``_small_cpu.py``, the same C
kernels in one pass; ``benchmarks/small_shapes.py`` measures it).

Then the kernels alone on one thread, ns per logit: the C cross-entropy forward (``cpu_rows.forward``) and forward +
gradient in one pass (``cpu_rows.loss_and_grad``) against PyTorch's ``log_softmax`` (forward only, in the input
dtype) on the same rows, interleaved.

Run:  .venv/bin/python benchmarks/cpu_kernels.py [--reps 5] [--load loaded]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import crossent
from crossent.bench import load
from crossent.bench.measure import interleaved_medians
from crossent._options import RowOptions
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
    with load.condition(args.load):
        kernels_alone(args.reps)


KERNEL_SHAPES = [(64, 1000), (64, 32000)]


def kernels_alone(reps: int) -> None:
    """ns per logit on one thread: the C forward, the C forward + gradient, PyTorch's log_softmax."""
    print(f"\nkernels alone, one thread, ns per logit, median of {reps} (interleaved)")
    print(f"{'N x C':>12} {'dtype':>9} {'C forward':>10} {'C fwd+grad':>11} {'log_softmax':>12}")
    opts = RowOptions()
    threads, saved = torch.get_num_threads(), cpu_rows.PARALLEL_MIN_ELEMENTS
    torch.set_num_threads(1)
    cpu_rows.PARALLEL_MIN_ELEMENTS = 1 << 62  # every C call on the calling thread
    try:
        for n, c in KERNEL_SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(n, c, generator=g).to(dtype)
                t = torch.randint(0, c, (n,), generator=g)
                grad = torch.empty_like(x)
                fns = {
                    "forward": lambda: cpu_rows.forward(x, t, None, opts),
                    "both": lambda: cpu_rows.loss_and_grad(x, t, None, 1.0 / n, opts, grad),
                    "torch": lambda: torch.log_softmax(x, -1),
                }
                for fn in fns.values():
                    fn()
                ns = {k: v / (n * c) * 1e9 for k, v in interleaved_medians(fns, reps, min_sample=0.02).items()}
                print(f"{n:>5}x{c:<6} {str(dtype)[6:]:>9} {ns['forward']:10.2f} {ns['both']:11.2f} {ns['torch']:12.2f}")
    finally:
        torch.set_num_threads(threads)
        cpu_rows.PARALLEL_MIN_ELEMENTS = saved


if __name__ == "__main__":
    main()
