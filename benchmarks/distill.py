"""Issue-12 benchmark: fused linear distillation vs the floor of its products and the materializing recipe (CPU).

Methods, forward+backward of the student (teacher under no_grad), one (N, D, V) shape, same D for both heads:

- ``fused``:  crossent.linear_distill_loss(x, W, x_t, W_t, beta=BETA), reduction "mean";
- ``recipe``: F.linear for both heads, log_softmax of both, F.kl_div (β = 0) or TRL's mixture formula,
              the "batchmean" over positions — the N×V tensors all materialized;
- ``floor``:  only the four products any method must run — teacher logits X_t W_tᵀ, student logits X Wᵀ,
              dX = G W and dW = Gᵀ X (G a preallocated N×V block) — 8·N·D·V FLOPs.

Times: medians of ``--reps`` calls, the methods interleaved in one process (load drifts hit all alike). Peak
memory: a fresh process per method (``--memory METHOD``), VmHWM − VmRSS over one measured call after a warm-up,
so the inputs and the interpreter are not counted. Error: |loss − float64| and max |dX − float64| at
``--error-shape`` (smaller: the float64 oracle is the recipe in float64), fp32 and bf16.
Run:  .venv/bin/python benchmarks/distill.py [--shape 2048 1024 32768] [--reps 3] [--beta 0.0] [--load loaded]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

import crossent
from crossent.bench.linear_memory import _reset_peak_rss, _rss_bytes
from crossent.bench import load
from crossent.bench.measure import format_bytes, interleaved_medians
from crossent.bench.report import cpu_paths


def make(shape, dtype, seed=0):
    n, d, v = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) * 1.0).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype)
    x_t = (torch.randn(n, d, generator=g) * 1.0).to(dtype)
    w_t = (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype)
    return x, w, x_t, w_t


def recipe_loss(x, w, x_t, w_t, beta):
    """The materializing recipe: both logits, both log-softmaxes, the divergence, the mean over positions."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32  # the loss in fp32 (fp64 for the oracle)
    with torch.no_grad():
        log_p = F.log_softmax(F.linear(x_t, w_t).to(cdt), -1)
    log_q = F.log_softmax(F.linear(x, w).to(cdt), -1)
    if beta == 0.0:
        return F.kl_div(log_q, log_p, reduction="sum", log_target=True) / log_q.shape[0]
    if beta == 1.0:
        return F.kl_div(log_p, log_q, reduction="sum", log_target=True) / log_q.shape[0]
    b = torch.tensor(beta, dtype=cdt)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - b), log_p + torch.log(b)]), 0)
    jsd = b * F.kl_div(log_m, log_p, reduction="sum", log_target=True)
    return (jsd + (1 - b) * F.kl_div(log_m, log_q, reduction="sum", log_target=True)) / log_q.shape[0]


def methods(x, w, x_t, w_t, beta):
    """name → a callable running one forward+backward (gradients for x and W)."""
    n, v = x.shape[0], w.shape[0]
    block = torch.empty(n, v, dtype=x.dtype)

    def fused():
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        crossent.linear_distill_loss(xs, ws, x_t, w_t, beta=beta).backward()

    def recipe():
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        recipe_loss(xs, ws, x_t, w_t, beta).backward()

    def floor():
        torch.mm(x_t, w_t.T, out=block)
        torch.mm(x, w.T, out=block)
        torch.mm(block, w)
        torch.mm(block.T, x)

    return {"fused": fused, "recipe": recipe, "floor": floor}


def peak_memory(method, shape, beta) -> int:
    """Peak extra RSS of one forward+backward of ``method``, in a fresh process."""
    cmd = [sys.executable, __file__, "--memory", method, "--shape", *map(str, shape), "--beta", str(beta)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def errors(shape, beta):
    """{dtype: {method: (|loss error|, max |dX error|)}} against the recipe in float64 on the dtype's inputs."""
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make(shape, dtype, seed=1)
        x64 = inputs[0].double().requires_grad_()
        exact = recipe_loss(x64, *(t.double() for t in inputs[1:]), beta)
        exact.backward()
        result[str(dtype)] = {}
        for name, fn in (("fused", crossent.linear_distill_loss), ("recipe", recipe_loss)):
            xs = inputs[0].detach().requires_grad_()
            loss = fn(xs, *inputs[1:], beta=beta) if name == "fused" else fn(xs, *inputs[1:], beta)
            loss.backward()
            result[str(dtype)][name] = (abs(loss.double().item() - exact.item()),
                                        (xs.grad.double() - x64.grad).abs().max().item())  # fmt: skip
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[2048, 1024, 32768], metavar=("N", "D", "V"))
    parser.add_argument("--error-shape", type=int, nargs=3, default=[256, 1024, 32768], metavar=("N", "D", "V"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--memory", choices=["fused", "recipe", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--load", default="quiet", choices=["quiet", "loaded"], help="loaded: one busy process beside")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.memory:  # child process: warm up, then the peak of one measured call
        fn = methods(*make(shape, torch.float32), args.beta)[args.memory]
        fn()
        base = _rss_bytes("VmRSS")
        _reset_peak_rss()
        fn()
        print(_rss_bytes("VmHWM") - base)
        return 0
    fns = methods(*make(shape, torch.float32), args.beta)
    for fn in fns.values():
        fn()  # warm-up
    with load.condition(args.load):
        times = interleaved_medians(fns, args.reps)
    peaks = {name: peak_memory(name, shape, args.beta) for name in fns}
    errs = errors(tuple(args.error_shape), args.beta)
    report = dict(shape=shape, beta=args.beta, load=args.load, reps=args.reps, threads=torch.get_num_threads(),
                  torch=torch.__version__, seconds=times, peak_bytes=peaks, errors=errs,
                  fused_over_floor=times["fused"] / times["floor"], recipe_over_fused=times["recipe"] / times["fused"],
                  memory_recipe_over_fused=peaks["recipe"] / max(peaks["fused"], 1))  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return 0
    n, d, v = shape
    print(f"distillation forward+backward, fp32, (N, D, V) = ({n}, {d}, {v}), beta={args.beta}, CPU, {args.load}, "
          f"torch {torch.__version__}, {report['threads']} threads, median of {args.reps} (interleaved); "
          f"{cpu_paths()}")  # fmt: skip
    print(f"{'method':8} {'time (s)':>9} {'× floor':>8} {'TF/s':>6} {'peak extra':>11}")
    for name in fns:
        tflops = 8 * n * d * v / times[name] / 1e12  # the four products: 8·N·D·V FLOPs
        print(f"{name:8} {times[name]:9.3f} {times[name] / times['floor']:8.3f} {tflops:6.3f} "
              f"{format_bytes(peaks[name]):>11}")  # fmt: skip
    print(f"peak memory recipe / fused: {report['memory_recipe_over_fused']:.1f}×")
    print(f"error vs float64 at {tuple(args.error_shape)} (|loss error|, max |dX error|):")
    for dtype, by_method in errs.items():
        print("  " + dtype + ": " + ", ".join(f"{m} {e[0]:.2e} / {e[1]:.2e}" for m, e in by_method.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
