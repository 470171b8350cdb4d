"""Fused linear + cross-entropy, forward+backward, fp32, on this CPU: ``crossent bench --op linear``.

Methods, each timed (median of --reps after one warm-up) in its own subprocess, and its peak memory
measured in another (peak RSS of one call above the RSS before it, after a warm-up call; the gradients
dX and dW count):
  floor           the same chunked products crossent runs (logits, dX, dW per block) and nothing else
  naive           F.cross_entropy(x @ W.T, t): the (N, V) logits, their softmax and gradient in memory
  torch_chunked   F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions()) (torch >= 2.13)
  cce             cut_cross_entropy.linear_cross_entropy(..., impl="torch_compile"), when installed
  crossent        crossent.linear_cross_entropy(x, W, t)
FLOPs: 6·N·D·V for the three products (2·N·D·V each); TF/s below are on that count.

Run:  crossent bench --op linear [--reps 3] [--out bench-out]     (or benchmarks/linear_ce.py, same flags)
      crossent bench --op linear --quick                         (tiny shapes: a smoke test)
Writes the table (linear_ce.md) and a plot of time and peak memory against V (linear_ce.png) to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = ((4096, 1024, 32768), (2048, 2048, 131072))  # (N, D, V): LLM heads with 32k and 128k vocabularies
QUICK_SHAPES = ((256, 64, 2048), (128, 64, 8192))
METHODS = ("floor", "naive", "torch_chunked", "cce", "crossent")


def available(method: str) -> bool:
    if method == "cce":
        return importlib.util.find_spec("cut_cross_entropy") is not None
    if method == "torch_chunked":
        import torch

        return hasattr(torch.nn, "LinearCrossEntropyOptions")
    return True


# --- worker: one method, one shape, in its own process ---------------------------------------------------


def _rss_bytes(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _step(method: str, x, w, t):
    """One forward+backward of ``method``; returns the loss."""
    import torch
    import torch.nn.functional as F

    import crossent

    if method == "naive":
        loss = F.cross_entropy(x @ w.T, t)
    elif method == "torch_chunked":
        loss = F.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions())
    elif method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        loss = linear_cross_entropy(x, w, t, impl="torch_compile")
    elif method == "crossent":
        loss = crossent.linear_cross_entropy(x, w, t)
    else:
        raise ValueError(method)
    loss.backward()
    return loss


def _floor(x, w):
    """The products crossent's plan runs: per block, logits, dX rows and the dW sum; no loss at all."""
    import torch

    from crossent.kernels.linear_plan import plan_chunks

    n, d = x.shape
    plan = plan_chunks(n, d, w.shape[0], x.dtype, x.device)
    buf = torch.empty(plan.rows, w.shape[0], dtype=x.dtype)
    dx = torch.empty_like(x)
    dw = torch.empty_like(w)
    for r0 in range(0, n, plan.rows):
        r1 = min(r0 + plan.rows, n)
        z = buf[: r1 - r0]
        torch.mm(x[r0:r1], w.T, out=z)
        torch.mm(z, w, out=dx[r0:r1])
        if r0 == 0:  # the first block writes dW, as crossent does (no zero fill)
            torch.mm(z.T, x[r0:r1], out=dw)
        else:
            dw.addmm_(z.T, x[r0:r1])
    return dx, dw


def worker(method: str, n: int, d: int, v: int, reps: int, what: str) -> dict:
    """``what="time"``: median seconds; ``"memory"``: peak RSS of one call above the RSS before it."""
    import torch

    from crossent.bench.measure import median_seconds

    torch.manual_seed(0)
    x = torch.randn(n, d).requires_grad_(method != "floor")
    w = (torch.randn(v, d) / d**0.5).requires_grad_(method != "floor")
    t = torch.randint(0, v, (n,))

    def run():
        if method == "floor":
            return _floor(x, w)
        x.grad = w.grad = None
        return _step(method, x, w, t)

    if what == "time":
        seconds = median_seconds(run, reps)
        loss = None if method == "floor" else float(run().detach())
        return {"seconds": seconds, "loss": loss}
    run()  # lazy imports, compilation (cce) and allocator set-up stay out of the peak
    x.grad = w.grad = None
    base = _rss_bytes("VmRSS")
    _reset_peak_rss()
    run()
    return {"peak_bytes": _rss_bytes("VmHWM") - base}


# --- driver -------------------------------------------------------------------------------------------------


def measure(shapes, methods, reps: int, on_result=None) -> list:
    """Every (shape, method) in a fresh subprocess; a method that is not installed is reported as such."""
    results = []
    for n, d, v in shapes:
        for method in methods:
            if not available(method):
                results.append({"method": method, "shape": [n, d, v], "missing": True})
                continue
            result = {"method": method, "shape": [n, d, v]}
            for what in ("time", "memory"):
                cmd = [sys.executable, "-m", "crossent.bench.linear_ce", "--worker", method, str(n), str(d), str(v),
                       what, "--reps", str(reps)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(what))
                if proc.returncode != 0:
                    result["error"] = (proc.stderr.strip().splitlines()[-1:] or ["(no output)"])[0]
                    break
                result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            results.append(result)
            if on_result:
                on_result(results[-1])
    return results


def _env(what: str) -> dict:
    """The memory run pins glibc's mmap threshold (1 MiB): large blocks are then unmapped when freed, so RSS
    follows the live tensors instead of keeping the warm-up's freed blocks; the timing run keeps the default."""
    env = dict(os.environ)
    if what == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    return env


def format_table(results) -> str:
    from crossent.bench.measure import format_bytes

    lines = [
        "| N × D × V | method | median s | × floor | crossent speed-up | TF/s | peak extra memory | loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_shape = {}
    for r in results:
        by_shape.setdefault(tuple(r["shape"]), {})[r["method"]] = r
    for shape, rows in by_shape.items():
        n, d, v = shape
        floor = rows.get("floor", {}).get("seconds")
        ours = rows.get("crossent", {}).get("seconds")
        for method, r in rows.items():
            name = "×".join(str(s) for s in shape)
            if "seconds" not in r or "peak_bytes" not in r:
                why = "not installed" if r.get("missing") else f"failed: {r.get('error')}"
                lines.append(f"| {name} | {method} | {why} | | | | | |")
                continue
            s = r["seconds"]
            ratio = f"{s / floor:.3f}" if floor else ""
            speedup = f"{s / ours:.2f}×" if ours and method not in ("crossent", "floor") else ""
            tflops = 6 * n * d * v / s / 1e12
            loss = "" if r["loss"] is None else f"{r['loss']:.6f}"
            lines.append(f"| {name} | {method} | {s:.3f} | {ratio} | {speedup} | {tflops:.3f} | "
                         f"{format_bytes(r['peak_bytes'])} | {loss} |")  # fmt: skip
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    """Time and peak memory against V, one line per method (the shapes differ in N and D too: see table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        pts = sorted((r["shape"][2], r["seconds"], r["peak_bytes"]) for r in results
                     if r["method"] == method and "peak_bytes" in r)  # fmt: skip
        if not pts:
            continue
        vs = [p[0] for p in pts]
        style = dict(marker="o", label=method, linestyle="--" if method == "floor" else "-")
        ax_t.plot(vs, [p[1] for p in pts], **style)
        ax_m.plot(vs, [p[2] / 2**20 for p in pts], **style)
    labels = [f"{r['shape'][2]}\n(N={r['shape'][0]}, D={r['shape'][1]})" for r in results if r["method"] == "floor"]
    for ax, title in ((ax_t, "forward+backward time (s)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("V")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_xticks([r["shape"][2] for r in results if r["method"] == "floor"], labels)
    ax_t.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps: a smoke test")
    parser.add_argument("--out", default="bench-out", help="folder for linear_ce.md and linear_ce.png")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "D", "V"),
                        help="instead of the default shapes (repeatable)")  # fmt: skip
    parser.add_argument("--worker", nargs=5, metavar=("METHOD", "N", "D", "V", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, n, d, v, what = args.worker
        print(json.dumps(worker(method, int(n), int(d), int(v), args.reps, what)))
        return 0
    import torch

    shapes, reps = (QUICK_SHAPES, 2) if args.quick else (SHAPES, args.reps)
    shapes = [tuple(s) for s in args.shape] if args.shape else shapes
    header = (f"linear CE forward+backward, float32, CPU, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, median of {reps}")  # fmt: skip
    print(header, flush=True)
    results = measure(shapes, args.methods, reps, on_result=lambda r: print(json.dumps(r), file=sys.stderr))
    table = format_table(results)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_ce.md").write_text(header + "\n\n" + table + "\n")
    plot(results, out / "linear_ce.png")
    print(f"wrote {out / 'linear_ce.md'} and {out / 'linear_ce.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
