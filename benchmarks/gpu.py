"""Issue-4 GPU benchmark: crossent's Triton kernels against PyTorch and the fused-CE libraries, one run.

Plain cross-entropy, forward+backward (reduction "mean", 5% of targets ignored) at (N, C) = (8192, 131072)
and (16384, 32768), bfloat16 and float32: median time, effective GB/s from the bytes-moved formula
(``plain_bytes``), % of the GPU's HBM peak, peak memory beyond the inputs, |loss − fp32 F.cross_entropy|,
and the time ratio to F.cross_entropy. Methods: F.cross_entropy eager and torch.compile'd, crossent
(impl="triton", out of place and in place), and Liger / quack when importable.

Fused linear cross-entropy (``bench_linear_ce``: ``crossent.linear_cross_entropy``, impl="triton") at
(N, D, V) = (8192, 4096, 128256), bf16, forward+backward: time vs the cuBLAS floor (the same three GEMMs),
TF/s on 6·N·D·V, peak memory vs the dX + dW floor; vs PyTorch eager, F.linear_cross_entropy (if present),
Liger FLCE, CCE when importable.

Run on a GPU (finishes in a few minutes on an H100; compiles dominate):
    python benchmarks/gpu.py                      # both sections, bf16 and fp32
    python benchmarks/gpu.py --only ce --reps 50  # plain CE only
    python benchmarks/gpu.py --sweep              # time (BLOCK, num_warps) candidates for triton_rows.ROW_LAUNCH
Check on a CPU (tiny shapes, Triton's interpreter; the numbers mean nothing, the code paths all run):
    python benchmarks/gpu.py --smoke
Third-party methods are optional: pure-Python wheels (liger-kernel, cut-cross-entropy) can be installed
next to crossent on the GPU machine; a missing one is listed as skipped, with the reason.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports Triton, which fixes interpreter vs compiler then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple, Union  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import crossent  # noqa: E402

PLAIN_SHAPES = ((8192, 131072), (16384, 32768))  # issue 4: 128k- and 32k-vocabulary loss heads
LINEAR_SHAPE = (8192, 4096, 128256)  # issue 4: N tokens, hidden D, Llama-3 vocabulary V
SMOKE_PLAIN_SHAPES = ((8, 1000),)
SMOKE_LINEAR_SHAPE = (16, 8, 515)
IGNORED_FRACTION = 0.05
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# HBM peak in GB/s by device-name substring, first match wins (vendors' spec sheets; used only for the
# "% of peak" column). Unknown devices print no percentage.
HBM_PEAK_GBS = (("H100 PCIe", 2000), ("H100", 3350), ("H200", 4800), ("H20", 4000), ("A100", 2039), ("B200", 8000))
# Dense bf16 tensor-core peak in TF/s, same matching, for the linear-CE "% of peak" column.
BF16_PEAK_TFS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("B200", 2250))

LossFn = Callable[..., torch.Tensor]


# --- measurement -------------------------------------------------------------------------------------------------


def median_ms(step: Callable[[], object], reps: int, device: torch.device, warmup: int = 2) -> float:
    """Median milliseconds of ``step()`` over ``reps`` runs after ``warmup`` runs (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one ``step()`` beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def lookup(table, name: str) -> Optional[float]:
    return next((value for key, value in table if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# --- plain cross-entropy ------------------------------------------------------------------------------------------


def plain_bytes(n: int, c: int, dtype: torch.dtype) -> int:
    """Bytes a forward+backward has to move at least, the same for every method (so GB/s compares times):
    the forward reads the logits (N·C·b); the backward reads them again and writes the gradient (2·N·C·b);
    per row, the int64 target is read twice (16 B), the fp32 LSE written and read back (8 B), the fp32 loss
    written (4 B) and the upstream gradient read (4 B)."""
    b = dtype.itemsize
    return 3 * n * c * b + n * (16 + 8 + 4 + 4)


def _mean_of(loss):
    """Competitors return a scalar, a per-row vector, or (loss, extra): the scalar mean loss."""
    loss = loss[0] if isinstance(loss, tuple) else loss
    return loss.mean() if loss.dim() else loss


def plain_methods(smoke: bool) -> Dict[str, Union[LossFn, str]]:
    """name -> loss(x, target) (mean over non-ignored rows), or the reason the method is unavailable."""
    methods: Dict[str, Union[LossFn, str]] = {
        "F.cross_entropy": F.cross_entropy,
        # static shapes (dynamic=False): a recompile per shape, as a training step would have
        "torch.compile(F.ce)": _compiled_ce(smoke),
        "crossent": lambda x, t: crossent.cross_entropy(x, t, impl="triton"),
        "crossent in-place": lambda x, t: crossent.cross_entropy(x, t, impl="triton", inplace_backward=True),
    }
    if smoke:
        return methods
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        methods["liger"] = lambda x, t: _mean_of(liger_cross_entropy(x, t))
    except ImportError as err:
        methods["liger"] = f"skipped: {err}"
    try:
        from quack.cross_entropy import cross_entropy as quack_ce

        # quack's mean ignores nothing in older versions: its rows at ignore_index give 0, like ours
        methods["quack"] = lambda x, t: _mean_of(quack_ce(x, t))
    except ImportError as err:
        methods["quack"] = f"skipped: {err}"
    return methods


def _compiled_ce(smoke: bool) -> LossFn:
    # On a CPU smoke run the "eager" backend traces with Dynamo (the code path) without inductor's ~15 s.
    return torch.compile(F.cross_entropy, dynamic=False, backend="eager" if smoke else "inductor")


@dataclass
class Row:
    section: str
    shape: Tuple[int, ...]
    dtype: str
    method: str
    ms: Optional[float] = None
    rate: Optional[float] = None  # GB/s (plain CE) or TF/s (linear CE)
    peak_pct: Optional[float] = None  # rate as % of the device's peak
    ratio: Optional[float] = None  # time / the baseline's time (F.cross_entropy, or the cuBLAS floor)
    mem: Optional[int] = None  # peak bytes beyond the inputs
    mem_floor: Optional[int] = None
    error: Optional[float] = None  # |loss − reference loss|
    note: str = ""


def bench_plain(shapes, dtypes, reps, device, smoke, log) -> List[Row]:
    rows = []
    name = device_name(device)
    peak = lookup(HBM_PEAK_GBS, name)
    methods = plain_methods(smoke)
    for n, c in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            gen = torch.Generator().manual_seed(0)
            logits = (2.0 * torch.randn(n, c, generator=gen)).to(device=device, dtype=dtype)
            target = torch.randint(0, c, (n,), generator=gen)
            target[torch.rand(n, generator=gen) < IGNORED_FRACTION] = -100
            target = target.to(device)
            ref = F.cross_entropy(logits.float(), target).item()
            base_ms = None
            for method, fn in methods.items():
                row = Row("ce", (n, c), dname, method)
                rows.append(row)
                if isinstance(fn, str):
                    row.note = fn
                    continue
                log(f"ce {n}x{c} {dname} {method}")
                try:
                    x = logits.clone().requires_grad_()
                    row.error = abs(fn(x, target).item() - ref)  # before in-place methods overwrite x

                    def step(fn=fn, x=x):
                        return torch.autograd.grad(fn(x, target), x)

                    row.ms = median_ms(step, reps, device)
                    row.mem = peak_extra_bytes(step, device)
                except Exception as err:  # a competitor that fails here is reported, not fatal
                    row.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
                    continue
                finally:
                    del x
                row.rate = plain_bytes(n, c, dtype) / (row.ms * 1e-3) / 1e9
                row.peak_pct = None if peak is None else 100.0 * row.rate / peak
                base_ms = row.ms if method == "F.cross_entropy" else base_ms
                row.ratio = None if base_ms is None else row.ms / base_ms
            del logits
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# --- fused linear cross-entropy (issue 3's op) --------------------------------------------------------------------
# crossent.linear_cross_entropy with the Triton chunk step (a crossent without it prints one line saying so).
# The floor is the three GEMMs every method must run: logits = X Wᵀ,
# dX = G W, dW = Gᵀ X (6·N·D·V FLOPs), on preallocated buffers; the memory floor is dX + dW.


def linear_methods(smoke: bool) -> Dict[str, Union[Callable, str]]:
    """name -> loss(x, w, target), or the reason the method is unavailable."""
    methods: Dict[str, Union[Callable, str]] = {
        "eager F.ce(x @ Wᵀ)": lambda x, w, t: F.cross_entropy(x @ w.T, t),
    }
    if hasattr(F, "linear_cross_entropy"):
        methods["F.linear_cross_entropy"] = lambda x, w, t: F.linear_cross_entropy(x, w, t)
    else:
        methods["F.linear_cross_entropy"] = "skipped: not in this PyTorch"
    if hasattr(crossent, "linear_cross_entropy"):
        methods["crossent"] = lambda x, w, t: crossent.linear_cross_entropy(x, w, t, impl="triton")
    else:
        methods["crossent"] = "skipped: crossent.linear_cross_entropy does not exist yet"
    if smoke:
        return methods
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        methods["liger FLCE"] = lambda x, w, t: _mean_of(liger_fused_linear_cross_entropy(x, w, t))
    except ImportError as err:
        methods["liger FLCE"] = f"skipped: {err}"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        methods["CCE"] = lambda x, w, t: cce(x, w, t)
    except ImportError as err:
        methods["CCE"] = f"skipped: {err}"
    return methods


def bench_linear_ce(shape, dtype_name, reps, device, smoke, log) -> List[Row]:
    """Forward+backward of the fused linear CE (grads for X and W) against the GEMM floor."""
    n, d, v = shape
    dtype = DTYPES[dtype_name]
    peak = lookup(BF16_PEAK_TFS, device_name(device)) if dtype == torch.bfloat16 else None
    flops = 6.0 * n * d * v
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(v, d, generator=gen) / math.sqrt(d)).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < IGNORED_FRACTION] = -100
    target = target.to(device)
    element = dtype.itemsize
    mem_floor = (n * d + v * d) * element  # dX + dW in the inputs' dtype

    # the floor: the same three GEMMs on preallocated buffers
    logits = torch.empty(n, v, device=device, dtype=dtype)
    dx, dw = torch.empty_like(x), torch.empty_like(w)

    def gemms():
        torch.mm(x, w.T, out=logits)
        torch.mm(logits, w, out=dx)
        torch.mm(logits.T, x, out=dw)

    log(f"lce {n}x{d}x{v} {dtype_name} GEMM floor")
    floor_ms = median_ms(gemms, reps, device)
    rows = [Row("lce", shape, dtype_name, "GEMM floor", ms=floor_ms, rate=flops / (floor_ms * 1e-3) / 1e12,
                ratio=1.0, mem_floor=mem_floor)]  # fmt: skip
    rows[0].peak_pct = None if peak is None else 100.0 * rows[0].rate / peak
    logits = dx = dw = None  # free the N×V floor buffer before the methods run
    ref = F.cross_entropy((x.float() @ w.float().T), target).item() if n * v <= 2**31 else None
    for method, fn in linear_methods(smoke).items():
        row = Row("lce", shape, dtype_name, method, mem_floor=mem_floor)
        rows.append(row)
        if isinstance(fn, str):
            row.note = fn
            continue
        log(f"lce {n}x{d}x{v} {dtype_name} {method}")
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        try:
            loss = fn(xg, wg, target)
            row.error = None if ref is None else abs(_mean_of(loss).item() - ref)

            def step(fn=fn):
                return torch.autograd.grad(_mean_of(fn(xg, wg, target)), (xg, wg))

            row.ms = median_ms(step, reps, device)
            row.mem = peak_extra_bytes(step, device)
        except Exception as err:
            row.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            continue
        row.rate = flops / (row.ms * 1e-3) / 1e12
        row.peak_pct = None if peak is None else 100.0 * row.rate / peak
        row.ratio = row.ms / floor_ms
    return rows


# --- launch-table sweep -------------------------------------------------------------------------------------------


def sweep(shapes, dtypes, reps, device, smoke, log) -> List[Row]:
    """Time crossent's fwd+bwd for (largest BLOCK, num_warps) candidates of triton_rows.ROW_LAUNCH."""
    from crossent.kernels import triton_rows

    candidates = [(64, 1), (128, 1)] if smoke else [(b, w) for b in (2048, 4096, 8192, 16384) for w in (4, 8, 16, 32)]
    rows = []
    for n, c in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            key = dtype.itemsize
            saved = triton_rows.ROW_LAUNCH[key]
            logits = (2.0 * torch.randn(n, c)).to(device=device, dtype=dtype).requires_grad_()
            target = torch.randint(0, c, (n,), device=device)
            try:
                for block, warps in candidates:
                    triton_rows.ROW_LAUNCH[key] = (block, warps)
                    log(f"sweep {n}x{c} {dname} BLOCK={block} warps={warps}")

                    def step():
                        return torch.autograd.grad(crossent.cross_entropy(logits, target, impl="triton"), logits)

                    row = Row("sweep", (n, c), dname, f"BLOCK={block} warps={warps}")
                    try:
                        row.ms = median_ms(step, reps, device)
                        row.rate = plain_bytes(n, c, dtype) / (row.ms * 1e-3) / 1e9
                    except Exception as err:  # e.g. out of registers / shared memory for that config
                        row.note = f"failed: {type(err).__name__}"
                    rows.append(row)
            finally:
                triton_rows.ROW_LAUNCH[key] = saved
    return rows


# --- output -------------------------------------------------------------------------------------------------------


def format_rows(rows: List[Row], unit: str) -> str:
    """One table; times in ms, rate in ``unit``, memory in MiB."""
    head = f"{'shape':>20} {'dtype':>5} {'method':<22} {'ms':>9} {unit:>7} {'%peak':>6} {'ratio':>6} {'peak MiB':>9} {'floor MiB':>9} {'|Δloss|':>8}"
    lines = [head, "-" * len(head)]

    def f(value, spec, scale=1.0):
        width = int(spec.split(".")[0])
        return format(value / scale, spec) if value is not None else "–".rjust(width)

    for r in rows:
        shape = "x".join(str(s) for s in r.shape)
        if r.note and r.ms is None:
            lines.append(f"{shape:>20} {r.dtype:>5} {r.method:<22} {r.note}")
            continue
        lines.append(
            f"{shape:>20} {r.dtype:>5} {r.method:<22} {f(r.ms, '9.3f')} {f(r.rate, '7.1f')} {f(r.peak_pct, '6.1f')} "
            f"{f(r.ratio, '6.2f')} {f(r.mem, '9.0f', 2**20)} {f(r.mem_floor, '9.0f', 2**20)} {f(r.error, '8.1e')}"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    parser.add_argument("--only", choices=("ce", "lce"), help="run one section")
    parser.add_argument("--dtype", choices=tuple(DTYPES), action="append", help="repeatable; default both")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; smoke 1)")
    parser.add_argument("--sweep", action="store_true", help="time launch-table candidates instead")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.smoke else 20)
    dtypes = args.dtype or list(DTYPES)
    if args.smoke:
        device = torch.device("cpu")
        plain_shapes, linear_shape = SMOKE_PLAIN_SHAPES, SMOKE_LINEAR_SHAPE
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        plain_shapes, linear_shape = PLAIN_SHAPES, LINEAR_SHAPE
    else:
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    print(f"device: {device_name(device)}; torch {torch.__version__}; median of {reps}")
    if args.sweep:
        rows = sweep(plain_shapes, dtypes, reps, device, args.smoke, log)
        print(format_rows(rows, "GB/s"))
        return 0
    if args.only in (None, "ce"):
        print("\nplain cross-entropy, forward+backward; GB/s = plain_bytes / time; ratio = time / F.cross_entropy's")
        print(format_rows(bench_plain(plain_shapes, dtypes, reps, device, args.smoke, log), "GB/s"))
    if args.only in (None, "lce"):
        print("\nfused linear cross-entropy, forward+backward; TF/s on 6·N·D·V; ratio = time / the GEMM floor's")
        rows = bench_linear_ce(linear_shape, "bf16" if not args.smoke else "fp32", reps, device, args.smoke, log)
        print(format_rows(rows, "TF/s"))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
