"""Issue 14: the fused linear losses with 16-bit input against the 16-bit GEMM floor and the naive recipe.

Per family, (N, D, V) and dtype, forward+backward (gradients for X and W), methods interleaved in one process
(medians of --reps, the order reversed every other round, so a ratio compares like with like under the same load):

- ``floor``: the family's products alone in the input dtype, the N×V block preallocated once outside the timed
  calls (so no fresh pages for it: the strictest floor) — cross-entropy 3 products (``X Wᵀ`` into the block,
  ``G W``, ``Gᵀ X``); per-token log-probs 4 (the logits again for backward); distillation 4 (the teacher's
  logits, the student's, ``G W``, ``Gᵀ X``);
- ``floor_alloc``: the same products as ``x @ w.T`` runs them, each N×V block a fresh tensor (what any
  implementation that does not keep an N×V buffer between calls pays: first-touch page faults, ~0.5 ms per MiB
  on the project's VM);
- ``naive``: the PyTorch recipe the fused loss replaces, 16-bit ``x @ w.T`` then fp32 with autograd (the float64
  reference is the same recipe on float64 inputs, kept in float64);
- the fused loss: for the cross-entropy each ``accumulate_dtype`` (``float32`` the default, ``float32_products``,
  ``weight``); for the others ``fused`` (the default).

Errors (max |error| of the loss, dX, dW, and ‖dW err‖ / ‖dW‖) are against the float64 computation on the same
rounded inputs. float16 on a CPU without fp16 matrix instructions is emulated (hundreds of times slower than
fp32): the floor and the naive recipe then take minutes at the bf16 sizes, so use a small --shape for it.

Run:  .venv/bin/python benchmarks/half_precision.py [--family ce log_probs distill] [--shape 2048 1024 32768]
      [--dtype bfloat16] [--reps 3] [--skip-errors] [--load loaded]   (loaded: one busy process beside the rounds)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import crossent
from crossent._precision import fast_half_products
from crossent.bench import load
from crossent.bench.measure import interleaved_medians

ACCUMULATE = ("float32", "float32_products", "weight")
FAMILIES = ("ce", "log_probs", "distill")


def make(shape, dtype, seed=0):
    """x (N, D), w (V, D), ids (N,), the teacher's x_t, w_t, and per-token upstream gradients (float32)."""
    n, d, v = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype)
    x_t = torch.randn(n, d, generator=g).to(dtype)
    w_t = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype)
    return dict(x=x, w=w, ids=torch.randint(0, v, (n,), generator=g), x_t=x_t, w_t=w_t,
                g_lp=torch.randn(n, generator=g), g_h=torch.randn(n, generator=g))  # fmt: skip


def _upcast(z):
    """16-bit logits to fp32 for the recipe; float64 (the reference's) stays float64."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def losses(family, case):
    """name → ``loss(x, w)``, a scalar whose gradients are the family's forward+backward (x, w leaves)."""
    ids, x_t, w_t, g_lp, g_h = (case[k] for k in ("ids", "x_t", "w_t", "g_lp", "g_h"))
    if family == "ce":
        out = {"naive": lambda x, w: F.cross_entropy(_upcast(x @ w.T), ids)}
        for acc in ACCUMULATE:
            out[acc] = lambda x, w, acc=acc: crossent.linear_cross_entropy(x, w, ids, accumulate_dtype=acc)
        return out
    if family == "log_probs":
        def naive(x, w):
            logp = _upcast(x @ w.T).log_softmax(-1)
            lp, h = logp.gather(-1, ids[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
            return (lp * g_lp.to(lp.dtype)).sum() + (h * g_h.to(h.dtype)).sum()

        def fused(x, w):
            out = crossent.linear_token_log_probs(x, w, ids, entropy=True)
            return (out.log_probs * g_lp.to(out.log_probs.dtype)).sum() + (out.entropy * g_h.to(out.entropy.dtype)).sum()

        return {"naive": naive, "fused": fused}

    def naive_kl(x, w):  # forward KL(p ‖ q), batch mean, the teacher without gradient
        log_p = _upcast(x_t.to(x.dtype) @ w_t.to(w.dtype).T).log_softmax(-1).detach()
        return F.kl_div(_upcast(x @ w.T).log_softmax(-1), log_p, log_target=True, reduction="batchmean")

    return {"naive": naive_kl, "fused": lambda x, w: crossent.linear_distill_loss(x, w, x_t.to(x.dtype), w_t.to(w.dtype))}


def floors(family, case):
    """``floor`` (the block preallocated) and ``floor_alloc`` (a fresh block per logits product)."""
    x, w, x_t, w_t = (case[k] for k in ("x", "w", "x_t", "w_t"))
    block = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)

    def logits(a, b, fresh):
        return a @ b.T if fresh else torch.mm(a, b.T, out=block)

    def products(fresh):
        def run():
            if family == "distill":
                logits(x_t, w_t, fresh)  # the teacher's logits
            elif family == "log_probs":
                logits(x, w, fresh)  # the forward's logits; backward computes them again
            g = logits(x, w, fresh)
            return g @ w, g.T @ x

        return run

    return {"floor": products(False), "floor_alloc": products(True)}


def step(loss_fn, x, w):
    """Forward+backward once: (loss, dX, dW)."""
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = loss_fn(xs, ws)
    loss.backward()
    return loss.detach(), xs.grad, ws.grad


def errors(fns, case):
    """Per method, the errors against the float64 computation (the ``naive`` recipe in float64)."""
    x64, w64 = case["x"].double(), case["w"].double()
    ref = step(fns["naive"], x64, w64)
    result = {}
    for name, fn in fns.items():
        loss, dx, dw = step(fn, case["x"], case["w"])
        dw_err = dw.double() - ref[2]
        result[name] = dict(loss=abs(loss.double() - ref[0]).item(), dx=(dx.double() - ref[1]).abs().max().item(),
                            dw=dw_err.abs().max().item(), dw_rel=(dw_err.norm() / ref[2].norm()).item())  # fmt: skip
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "D", "V"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-errors", action="store_true")
    parser.add_argument("--load", default="quiet", choices=["quiet", "loaded"], help="loaded: one busy process beside")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(s) for s in args.shape] if args.shape else [(2048, 1024, 32768), (4096, 1024, 32768)]
    print(f"fused linear losses, {args.dtype}, forward+backward, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.load}, median of {args.reps} (interleaved); 16-bit products fast here: "
          f"{fast_half_products('cpu', dtype)}")  # fmt: skip
    for family in args.family:
        for shape in shapes:
            case = make(shape, dtype)
            fns = losses(family, case)
            errs = {} if args.skip_errors else errors(fns, case)
            timed = {**floors(family, case), **{k: (lambda f=f: step(f, case["x"], case["w"])) for k, f in fns.items()}}
            for fn in timed.values():
                fn()  # warm-up
            with load.condition(args.load):
                times = interleaved_medians(timed, args.reps)
            print(f"\n{family}, (N, D, V) = {shape}")
            print(f"{'method':17} {'time (s)':>9} {'× floor':>8} {'× alloc':>8} {'× naive':>8} {'|loss err|':>11} "
                  f"{'max|dX err|':>12} {'max|dW err|':>12} {'‖dW err‖/‖dW‖':>15}")  # fmt: skip
            for name, sec in times.items():
                e = errs.get(name)
                err_cols = "" if e is None else f" {e['loss']:11.2e} {e['dx']:12.2e} {e['dw']:12.2e} {e['dw_rel']:15.2e}"
                print(f"{name:17} {sec:9.3f} {sec / times['floor']:8.3f} {sec / times['floor_alloc']:8.3f} "
                      f"{sec / times['naive']:8.3f}{err_cols}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
