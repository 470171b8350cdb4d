"""TRL's fused-head function against crossent's (crossent.trl.CrossentLogProbFunction) under the same call.

The call every TRL trainer's fused head makes (trl 1.16.0, ``add_fused_lm_head``):
``fn.apply(hidden (N, D), weight (V, D), None, targets (N,), 1.0, 32768, None, 1.0, ("log_probs", "entropy"))``,
then backward from a random per-token upstream gradient on both outputs. "ignored 50%" is that call as TRL makes
it on CPU for a batch with half its labels −100: every position is scored (labels clamped to 0) and the ignored
positions' upstream gradients are 0 (TRL masks the outputs after the call).

- time: median of --reps forward+backward rounds, TRL, crossent and the 4 products alone (TRL's work; crossent
  keeps the logits at N <= 4096, V <= 32768 on CPU and runs 3) interleaved in one process, fp32 and bf16
  (hidden and weight in that dtype), ignored 0% and 50%, quiet and loaded (one busy process beside);
- peak extra memory: peak RSS during one round minus the RSS with the inputs alive, after a warm-up round, each in
  its own subprocess (large blocks mmap-ed, as ``crossent bench``'s memory runs);
- max |error| vs float64 (materialized ``log_softmax`` in float64 from the same rounded inputs) of the log-probs,
  the entropy, dX and dW, at (--acc-rows, D, V).

Run:  .venv/bin/python benchmarks/trl_head.py [--rows 4096 --dim 1024 --vocab 32768 --reps 3 --acc-rows 512]
      [--dtypes float32 bfloat16] [--ignored 0 0.5] [--loads quiet loaded] [--skip time memory accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from crossent.bench import load
from crossent.bench.linear_memory import _reset_peak_rss, _rss_bytes
from crossent.bench.report import cpu_paths
from crossent.bench.measure import interleaved_medians, logit_products, max_abs_diff

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from trl.trainer import utils as trl_utils  # noqa: E402  (after the offline switch)

from crossent.trl import CrossentLogProbFunction  # noqa: E402

FUNCTIONS = {"trl": trl_utils._ChunkedLogProbFunction, "crossent": CrossentLogProbFunction}
CHUNK = 32768  # TRL's vocabulary tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
OUTPUTS = ("log_probs", "entropy")  # what GRPO asks for; SFT adds is_top1, DPO mean_logits and is_top1


def problem(n, d, v, dtype=torch.float32, ignored=0.0, seed=0):
    """Inputs as TRL's CPU path passes them: targets clamped to 0 where ignored, upstream 0 there."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype)
    ids = torch.randint(0, v, (n,), generator=g)
    keep = torch.rand(n, generator=g) >= ignored
    ids = torch.where(keep, ids, 0)
    g_lp, g_h = torch.randn(n, generator=g) * keep, torch.randn(n, generator=g) * keep
    return x, w, ids, g_lp, g_h


def step(fn, x, w, ids, g_lp, g_h):
    """Forward + backward of TRL's call; returns (log_probs, entropy, dX, dW)."""
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = fn.apply(xl, wl, None, ids, 1.0, CHUNK, None, 1.0, OUTPUTS)
    dx, dw = torch.autograd.grad([out[0], out[1]], [xl, wl], [g_lp, g_h])
    return out[0].detach(), out[1].detach(), dx, dw


def times(n, d, v, dtype, ignored, load_name, reps):
    data = problem(n, d, v, dtype, ignored)
    fns = {name: (lambda f=f: step(f, *data)) for name, f in FUNCTIONS.items()}
    g_full = torch.empty(n, v, dtype=dtype)
    fns["floor"] = lambda: logit_products(data[0], data[1], g_full)  # the work both do; beyond it, each its own
    for fn in fns.values():  # warm-up
        fn()
    with load.condition(load_name):
        return interleaved_medians(fns, reps)


def peak_child(n, d, v, dtype, name):
    """Peak RSS during one round minus the RSS before it (inputs alive), in bytes, after a warm-up round (lazy
    imports and first-call set-up stay out); the high-water mark is reset first (``/proc/self/clear_refs``)."""
    data = problem(n, d, v, getattr(torch, dtype))
    step(FUNCTIONS[name], *data)
    base = _rss_bytes("VmRSS")
    _reset_peak_rss()
    step(FUNCTIONS[name], *data)
    return _rss_bytes("VmHWM") - base


def peak(n, d, v, dtype, name):
    """:func:`peak_child` in a fresh process, large blocks mmap-ed (freed memory goes back to the system)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import trl_head as b; "
            f"print(b.peak_child({n}, {d}, {v}, {dtype!r}, {name!r}))")  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(done.stdout.strip().splitlines()[-1])


def reference(x, w, ids, g_lp, g_h):
    """Float64, materialized: log_softmax of X Wᵀ, the entropy, and their gradients by autograd."""
    xl, wl = x.double().requires_grad_(), w.double().requires_grad_()
    logp = torch.log_softmax(xl @ wl.T, -1)
    lp, h = logp.gather(-1, ids[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    dx, dw = torch.autograd.grad([lp, h], [xl, wl], [g_lp.double(), g_h.double()])
    return lp.detach(), h.detach(), dx, dw


def accuracy(n, d, v, dtypes):
    out = {}
    for dtype in dtypes:
        data = problem(n, d, v, getattr(torch, dtype))
        want = reference(*data)
        for name, fn in FUNCTIONS.items():
            got = step(fn, *data)
            errors = zip(("log_probs", "entropy", "dX", "dW"), got, want)
            out[f"{name} {dtype}"] = {what: max_abs_diff(a, b) for what, a, b in errors}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--acc-rows", type=int, default=512)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--ignored", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--loads", nargs="+", default=["quiet", "loaded"], choices=["quiet", "loaded"])
    p.add_argument("--skip", nargs="*", default=[], choices=["time", "memory", "accuracy"])
    args = p.parse_args(argv)
    n, d, v = args.rows, args.dim, args.vocab
    import trl

    print(f"# (N, D, V) = ({n}, {d}, {v}), outputs {OUTPUTS}, trl {trl.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {cpu_paths()}")  # fmt: skip
    result = {"shape": [n, d, v], "rows": []}
    if "time" not in args.skip:
        print("| dtype | ignored | load | TRL s | crossent s | 4 products s | crossent / TRL | floor / TRL |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |")
        for dtype in args.dtypes:
            for ignored in args.ignored:
                for load_name in args.loads:
                    t = times(n, d, v, getattr(torch, dtype), ignored, load_name, args.reps)
                    result["rows"].append({"dtype": dtype, "ignored": ignored, "load": load_name, "seconds": t})
                    print(f"| {dtype} | {ignored:.0%} | {load_name} | {t['trl']:.2f} | {t['crossent']:.2f} | "
                          f"{t['floor']:.2f} | {t['crossent'] / t['trl']:.2f} | {t['floor'] / t['trl']:.2f} |",
                          flush=True)  # fmt: skip
    if "memory" not in args.skip:
        for dtype in args.dtypes:
            m = {name: peak(n, d, v, dtype, name) for name in FUNCTIONS}
            result[f"peak_bytes {dtype}"] = m
            print(f"peak extra memory {dtype}: TRL {m['trl'] / 2**20:.0f} MiB, crossent {m['crossent'] / 2**20:.0f} MiB",
                  flush=True)  # fmt: skip
    if "accuracy" not in args.skip:
        a = accuracy(args.acc_rows, d, v, args.dtypes)
        result["max_abs_error"] = a
        print(f"max |error| vs float64 at ({args.acc_rows}, {d}, {v}):")
        for name, errs in a.items():
            print(f"  {name}: " + "  ".join(f"{k} {e:.2e}" for k, e in errs.items()))
    return result


if __name__ == "__main__":
    main()
