"""Issue 14: the fused linear cross-entropy with 16-bit input against the 16-bit GEMM floor and the naive recipe.

Per (N, D, V) and dtype, forward+backward (gradients for X and W), methods interleaved in one process (medians of
--reps, the order reversed every other round, so a ratio compares like with like under the same load):

- ``floor``: the 3 products alone in the input dtype (``X Wᵀ`` into a preallocated N×V block, ``G W``, ``Gᵀ X``);
- ``naive``: ``F.cross_entropy((x @ w.T).float(), t)`` with autograd (the recipe the fused loss replaces);
- ``float32`` (crossent's default), ``float32_products``, ``weight``: ``linear_cross_entropy`` with that
  ``accumulate_dtype``.

Errors (max |error| of the loss, dX, dW, and ‖dW error‖ / ‖dW‖) are against the float64 computation on the same
rounded inputs. float16 on a CPU without fp16 matrix instructions is emulated (hundreds of times slower than
fp32): the floor and the naive recipe then take minutes at the bf16 sizes, so use a small --shape for it.

Run:  .venv/bin/python benchmarks/half_precision.py [--shape 2048 1024 32768] [--dtype bfloat16] [--reps 3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import crossent
from crossent._precision import fast_half_products
from crossent.bench.measure import interleaved_medians

ACCUMULATE = ("float32", "float32_products", "weight")


def make(shape, dtype, seed=0):
    n, d, v = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype)
    return x, w, torch.randint(0, v, (n,), generator=g)


def methods(x, w, t):
    """name → a callable running forward+backward once, returning (loss, dX, dW)."""

    def step(loss_fn):
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        loss = loss_fn(xs, ws)
        loss.backward()
        return loss.detach(), xs.grad, ws.grad

    block = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)

    def floor():
        torch.mm(x, w.T, out=block)
        return None, block @ w, block.T @ x

    out = {"floor": floor, "naive": lambda: step(lambda a, b: F.cross_entropy((a @ b.T).float(), t))}
    for acc in ACCUMULATE:
        out[acc] = lambda acc=acc: step(lambda a, b: crossent.linear_cross_entropy(a, b, t, accumulate_dtype=acc))
    return out


def errors(fns, x, w, t):
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(x64 @ w64.T, t)
    ref.backward()
    result = {}
    for name, fn in fns.items():
        if name == "floor":
            continue
        loss, dx, dw = fn()
        dw_err = dw.double() - w64.grad
        result[name] = dict(loss=abs(loss.double() - ref).item(), dx=(dx.double() - x64.grad).abs().max().item(),
                            dw=dw_err.abs().max().item(), dw_rel=(dw_err.norm() / w64.grad.norm()).item())  # fmt: skip
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "D", "V"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-errors", action="store_true")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(s) for s in args.shape] if args.shape else [(2048, 1024, 32768), (4096, 1024, 32768)]
    print(f"fused linear CE, {args.dtype}, forward+backward, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} (interleaved); 16-bit products fast here: "
          f"{fast_half_products('cpu', dtype)}")  # fmt: skip
    for shape in shapes:
        x, w, t = make(shape, dtype)
        fns = methods(x, w, t)
        errs = {} if args.skip_errors else errors(fns, x, w, t)
        for fn in fns.values():
            fn()  # warm-up
        times = interleaved_medians(fns, args.reps)
        print(f"\n(N, D, V) = {shape}")
        print(f"{'method':17} {'time (s)':>9} {'× floor':>8} {'× naive':>8} {'|loss err|':>11} {'max|dX err|':>12} "
              f"{'max|dW err|':>12} {'‖dW err‖/‖dW‖':>15}")  # fmt: skip
        for name, sec in times.items():
            e = errs.get(name)
            err_cols = "" if e is None else f" {e['loss']:11.2e} {e['dx']:12.2e} {e['dw']:12.2e} {e['dw_rel']:15.2e}"
            print(f"{name:17} {sec:9.3f} {sec / times['floor']:8.3f} {sec / times['naive']:8.3f}{err_cols}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
