"""The C row kernels against the torch-ops kernels they replace and against PyTorch, in one process (CPU).

Per (N, C) and dtype, cross-entropy forward+backward (mean, class indices): ``F.cross_entropy``; crossent with the C
kernels (the build that runs, ``cpu_rows.VARIANT``); crossent with ``cpu_rows.ENABLED = False`` (the torch-ops
kernels, what a machine without a C compiler runs). Methods interleaved (``bench.measure.interleaved_medians``); ratios to PyTorch.
Shapes above 2^20 logits only: below, ``cross_entropy`` takes the small inputs' one pass (``kernels/one_pass.py``, the
same C kernels in one pass; ``benchmarks/small_shapes.py`` measures it).

Then the kernels alone on one thread, ns per logit: the C cross-entropy forward (``cpu_rows.forward``) and forward +
gradient in one pass (``cpu_rows.loss_and_grad``) against PyTorch's ``log_softmax`` (forward only, in the input
dtype) on the same rows, interleaved.

``--ab PATH``: a second build of the extension (e.g. the previous revision's ``_cpu_rows*.so``, built by hand from
``git show REV:src/crossent/csrc/cpu_rows.c``) timed beside the running one ("B build" columns), interleaved.
The header names the CPU's level, the running build and ``CROSSENT_CPU_CAPABILITY``
(``CROSSENT_CPU_CAPABILITY=x86-64-v3`` takes an AVX2 CPU's build on an AVX-512 one).

Run:  .venv/bin/python benchmarks/cpu_kernels.py [--reps 5] [--load loaded] [--ab PATH] [--kernels-only]
      [--statistic fastest]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import math
import time

import torch
import torch.nn.functional as F

import crossent
from crossent.bench import load
from crossent.bench.measure import interleaved_medians
from crossent.bench.report import cpu_paths
from crossent._options import RowOptions
from crossent.kernels import cpu_rows

SHAPES = [(128, 32000), (4096, 32768), (1024, 131072)]


def load_build(path: str):
    """The extension in the file ``path`` (any build of cpu_rows.c: its module name is read from the file name)."""
    name = "crossent." + path.rsplit("/", 1)[-1].split(".", 1)[0]
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def build(native):
    """crossent's C kernels from ``native`` (a loaded build) inside the block."""
    saved, cpu_rows._native = cpu_rows._native, native
    try:
        yield
    finally:
        cpu_rows._native = saved


def methods(x: torch.Tensor, t: torch.Tensor, other=None):
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

    fns = {"torch": step(F.cross_entropy), "C kernels": step(with_c(True)), "torch ops": step(with_c(False))}
    if other is not None:
        fns["B build"] = step(lambda a, b: _with(other, crossent.cross_entropy, a, b))
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--load", default="quiet", choices=["quiet", "loaded"])
    parser.add_argument("--ab", metavar="PATH", help="a second build of the extension, timed beside the running one")
    parser.add_argument("--kernels-only", action="store_true", help="only the kernels-alone table")
    parser.add_argument("--statistic", default="median", choices=["median", "fastest"],
                        help="kernels alone: the median, or the fastest call (a machine shared with other jobs)")
    args = parser.parse_args(argv)
    if not cpu_rows.available():
        raise SystemExit("crossent._cpu_rows was not built (no C compiler at install): nothing to compare")
    other = None if args.ab is None else load_build(args.ab)
    paths = cpu_paths() + ("" if other is None else f"; B build: {args.ab}")
    if args.kernels_only:
        print(f"CPU, {args.load}, torch {torch.__version__}; {paths}")
    else:
        steps(args, other, paths)
    with load.condition(args.load):
        kernels_alone(args.reps, other, args.statistic)


def steps(args, other, paths: str) -> None:
    """The forward+backward table: per shape and dtype, each method's median as a ratio to F.cross_entropy's."""
    print(f"cross_entropy forward+backward, CPU, {args.load}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, median of {args.reps} (interleaved); ratio to F.cross_entropy; {paths}")  # fmt: skip
    print(f"{'N x C':>12} {'dtype':>9} {'torch':>9} {'C kernels':>10} {'torch ops':>10}"
          + ("" if other is None else f" {'B build':>10}"))  # fmt: skip
    for n, c in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
            t = torch.randint(0, c, (n,), generator=g)
            fns = methods(x, t, other)
            for fn in fns.values():  # warm-up
                fn()
            with load.condition(args.load):
                sec = interleaved_medians(fns, args.reps, min_sample=0.02)
            base = sec["torch"]
            print(f"{n:>5}x{c:<6} {str(dtype)[6:]:>9} {base * 1e3:7.1f}ms {sec['C kernels'] / base:9.2f}x "
                  f"{sec['torch ops'] / base:9.2f}x" + ("" if other is None else f" {sec['B build'] / base:9.2f}x"))


KERNEL_SHAPES = [(64, 1000), (64, 32000)]


def fastest(fns, reps: int):
    """The fastest of ``reps`` single calls of each function, timed in turns: on a machine shared with other jobs,
    the closest figure to a quiet machine's (a median there measures the other jobs)."""
    best = {name: math.inf for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def kernels_alone(reps: int, other=None, statistic: str = "median") -> None:
    """ns per logit on one thread: the C forward, the C forward + gradient (and the same of the ``other`` build),
    PyTorch's log_softmax; ``statistic`` "fastest": the fastest of 60 × ``reps`` calls instead of the median."""
    what = f"median of {reps}" if statistic == "median" else f"fastest of {60 * reps} calls"
    print(f"\nkernels alone, one thread, ns per logit, {what} (interleaved)")
    print(f"{'N x C':>12} {'dtype':>9} {'C forward':>10} {'C fwd+grad':>11} {'log_softmax':>12}"
          + ("" if other is None else f" {'B forward':>10} {'B fwd+grad':>11}"))  # fmt: skip
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
                if other is not None:
                    fns["B forward"] = lambda: _with(other, cpu_rows.forward, x, t, None, opts)
                    fns["B both"] = lambda: _with(other, cpu_rows.loss_and_grad, x, t, None, 1.0 / n, opts, grad)
                for fn in fns.values():
                    fn()
                if statistic == "median":
                    sec = interleaved_medians(fns, reps, min_sample=0.005)
                else:
                    sec = fastest(fns, 60 * reps)
                ns = {k: v / (n * c) * 1e9 for k, v in sec.items()}
                print(f"{n:>5}x{c:<6} {str(dtype)[6:]:>9} {ns['forward']:10.2f} {ns['both']:11.2f} {ns['torch']:12.2f}"
                      + ("" if other is None else f" {ns['B forward']:10.2f} {ns['B both']:11.2f}"))
    finally:
        torch.set_num_threads(threads)
        cpu_rows.PARALLEL_MIN_ELEMENTS = saved


def _with(native, fn, *args):
    with build(native):
        return fn(*args)


if __name__ == "__main__":
    main()
