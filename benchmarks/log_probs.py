"""Benchmark of crossent.linear_token_log_probs (fused per-token log-probs + entropy) on this CPU.

At (N, D, V) (default (4096, 1024, 32768)), fp32, ``entropy=True``, one id per token, a random per-token upstream
gradient on both outputs:

- time (median of --reps, all methods interleaved in one process) of forward+backward of
  ``fused``: crossent.linear_token_log_probs;  ``fused_stats``: the same with log Σp², the mean logit and top-1
  (what TRL's trainers also ask for);  ``recipe``: F.linear → log_softmax → gather, −Σ p log p (PyTorch,
  materializing N×V); ``floor``: the 4 GEMMs alone (X Wᵀ twice, G W, Gᵀ X: 8·N·D·V FLOPs);
  and of the no-grad forward: ``fused_nograd`` vs ``product`` (one X Wᵀ);
- peak extra memory (peak RSS minus the RSS with the inputs alive), each method in its own subprocess;
- accuracy vs the float64 materialized result, at (--acc-rows, D, V), fp32 and bf16: max |error| of the
  log-probs, the entropy and dX, for ``fused`` and the same-dtype ``recipe``.

Run:  .venv/bin/python benchmarks/log_probs.py [--rows 4096 --dim 1024 --vocab 32768 --reps 3 --acc-rows 512]
      [--load loaded]   (one busy process beside the timed rounds)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

import crossent
from crossent.bench import load
from crossent.bench.linear_memory import _reset_peak_rss, _rss_bytes
from crossent.bench.measure import interleaved_medians, logit_products, max_abs_diff


def problem(n, d, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype)
    ids = torch.randint(0, v, (n,), generator=g)
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return x, w, ids, g_lp, g_h


def recipe(x, w, ids):
    logits = F.linear(x, w)  # 16-bit logits upcast to fp32; float64 stays float64 (the reference)
    logp = torch.log_softmax(logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits, -1)
    return logp.gather(-1, ids[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def fused(x, w, ids, **statistics):
    out = crossent.linear_token_log_probs(x, w, ids, entropy=True, **statistics)
    return out.log_probs, out.entropy


STATISTICS = dict(log_sum_sq_probs=True, mean_logits=True, is_top1=True)  # TRL's extra outputs, no gradient


def step(fn, x, w, ids, g_lp, g_h):
    """Forward + backward with the per-token upstream gradients; returns (log_probs, entropy, dX, dW)."""
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    lp, h = fn(xl, wl, ids)
    dx, dw = torch.autograd.grad([lp, h], [xl, wl], [g_lp, g_h])
    return lp.detach(), h.detach(), dx, dw


def methods(x, w, ids, g_lp, g_h):
    g_full = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)

    def fused_nograd():
        with torch.no_grad():
            return fused(x, w, ids)

    return {
        "fused": lambda: step(fused, x, w, ids, g_lp, g_h),
        "fused_stats": lambda: step(lambda *a: fused(*a, **STATISTICS), x, w, ids, g_lp, g_h),
        "recipe": lambda: step(recipe, x, w, ids, g_lp, g_h),
        "floor": lambda: logit_products(x, w, g_full),  # the 4 products alone
        "fused_nograd": fused_nograd,
        "product": lambda: torch.mm(x, w.T),
    }


def times(n, d, v, reps, load_name="quiet"):
    """Median seconds per method, interleaved in one process; ``load_name="loaded"`` runs one busy process beside."""
    fns = methods(*problem(n, d, v))
    for fn in fns.values():  # warm-up
        fn()
    with load.condition(load_name):
        return interleaved_medians(fns, reps)


def peak_child(n, d, v, name):
    """Peak RSS during one call minus the RSS before it (inputs alive), in bytes. The high-water mark is reset
    first (``/proc/self/clear_refs``), so the inputs' own creation does not count."""
    data = problem(n, d, v)
    fn = methods(*data)[name]
    _reset_peak_rss()
    base = _rss_bytes("VmRSS")
    fn()
    return _rss_bytes("VmHWM") - base


def peak(n, d, v, name):
    code = f"import sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); import log_probs as b; print(b.peak_child({n}, {d}, {v}, {name!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def accuracy(n, d, v):
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w, ids, g_lp, g_h = problem(n, d, v, dtype)
        want = step(recipe, x.double(), w.double(), ids, g_lp.double(), g_h.double())
        for name, fn in (("fused", fused), ("recipe", recipe)):
            got = step(fn, x, w, ids, g_lp.to(torch.float32), g_h.to(torch.float32))
            errors = zip(("log_probs", "entropy", "dX"), got, want)
            out[f"{name} {str(dtype)[6:]}"] = {what: max_abs_diff(a, b) for what, a, b in errors}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--acc-rows", type=int, default=512)
    p.add_argument("--skip", nargs="*", default=[], choices=["time", "memory", "accuracy"])
    p.add_argument("--load", default="quiet", choices=["quiet", "loaded"], help="loaded: one busy process beside")
    args = p.parse_args(argv)
    n, d, v = args.rows, args.dim, args.vocab
    print(f"# (N, D, V) = ({n}, {d}, {v}) fp32, entropy=True, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.load}")  # fmt: skip
    result = {"shape": [n, d, v]}
    if "time" not in args.skip:
        t = times(n, d, v, args.reps, args.load)
        result["seconds"] = t
        print("median seconds:", json.dumps({k: round(s, 3) for k, s in t.items()}))
        print(f"fused / floor (fwd+bwd) = {t['fused'] / t['floor']:.3f}   recipe / floor = {t['recipe'] / t['floor']:.3f}   "
              f"fused_nograd / product = {t['fused_nograd'] / t['product']:.3f}   "
              f"fused_stats / fused = {t['fused_stats'] / t['fused']:.3f}")  # fmt: skip
    if "memory" not in args.skip:
        m = {name: peak(n, d, v, name) for name in ("fused", "recipe")}
        result["peak_bytes"] = m
        print(f"peak extra memory: fused {m['fused'] / 2**20:.0f} MiB, recipe {m['recipe'] / 2**20:.0f} MiB, "
              f"ratio {m['fused'] / max(m['recipe'], 1):.3f}")  # fmt: skip
    if "accuracy" not in args.skip:
        a = accuracy(args.acc_rows, d, v)
        result["max_abs_error"] = a
        print(f"accuracy at ({args.acc_rows}, {d}, {v}) vs float64:", json.dumps(a, indent=1))
    return result


if __name__ == "__main__":
    main()
