"""Issue 10, small shapes: ``crossent.cross_entropy`` against ``F.cross_entropy`` per option, forward+backward (CPU).

Per (N, C), dtype and option (plain; a third of the targets ignored; class weights; label smoothing 0.1; z-loss
1e-4, against PyTorch's recipe ``F.cross_entropy + s · mean(logsumexp²)``), --rounds rounds of the two methods
interleaved (``bench.measure.interleaved_medians``, each sample ≥ 20 ms of calls); the ratio printed is the median
of the per-round ratios (a round's two samples share the machine's state), with PyTorch's median time per call.

Run:  .venv/bin/python benchmarks/small_shapes.py [--rounds 9] [--load loaded]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import crossent
from crossent.bench import load
from crossent.bench.measure import interleaved_medians

SHAPES = [(64, 1000), (256, 1000), (128, 32000)]


def cases(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor):
    """option → (PyTorch's loss, crossent's loss), each a zero-argument callable."""
    ignored = t.clone()
    ignored[::3] = -100
    z = 1e-4
    return {
        "plain": (lambda: F.cross_entropy(x, t), lambda: crossent.cross_entropy(x, t)),
        "ignore": (lambda: F.cross_entropy(x, ignored), lambda: crossent.cross_entropy(x, ignored)),
        "weight": (lambda: F.cross_entropy(x, t, w.to(x.dtype)), lambda: crossent.cross_entropy(x, t, w)),
        "smoothing": (lambda: F.cross_entropy(x, t, label_smoothing=0.1),
                      lambda: crossent.cross_entropy(x, t, label_smoothing=0.1)),
        "z_loss": (lambda: F.cross_entropy(x, t) + z * torch.logsumexp(x.float(), 1).pow(2).mean(),
                   lambda: crossent.cross_entropy(x, t, z_loss=z)),
    }  # fmt: skip


def step(loss, x):
    def run():
        loss().backward()
        x.grad = None

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--load", default="quiet", choices=["quiet", "loaded"])
    args = parser.parse_args(argv)
    print(f"cross_entropy forward+backward, CPU, {args.load}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; crossent / F.cross_entropy, median of {args.rounds} interleaved rounds (PyTorch's time)")  # fmt: skip
    for n, c in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
            t = torch.randint(0, c, (n,), generator=g)
            w = torch.rand(c, generator=g) + 0.5
            cols = []
            for option, (ref, ours) in cases(x, t, w).items():
                fns = {"torch": step(ref, x), "crossent": step(ours, x)}
                for fn in fns.values():
                    fn()  # warm-up
                ratios, base = [], []
                with load.condition(args.load):
                    for _ in range(args.rounds):
                        sec = interleaved_medians(fns, 1, min_sample=0.02)
                        ratios.append(sec["crossent"] / sec["torch"])
                        base.append(sec["torch"])
                cols.append(f"{option} {statistics.median(ratios):.2f}x ({statistics.median(base) * 1e6:.0f} us)")
            print(f"{n:>4} x {c:<6} {str(dtype)[6:]:>9}: " + "  ".join(cols), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
