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

Fused per-token log-probs + entropy (``bench_log_probs``: ``crossent.linear_token_log_probs(entropy=True)``,
impl="triton") at the same (N, D, V), bf16, forward+backward with random upstream gradients on both outputs: time
vs the 4-GEMM floor (X Wᵀ twice, G W, Gᵀ X), TF/s on 8·N·D·V, peak memory, max |Δ| vs fp32; vs the materializing
recipe (F.linear → float → log_softmax → gather, −Σ p log p, autograd). The no-grad forward of each against one
X Wᵀ product.

Fused distillation (``bench_distill``: ``crossent.linear_distill_loss``, impl="triton", beta 0 and 0.5) at the
same (N, D, V) with D_t = D, bf16, forward+backward of the student: the loss value, time vs the 4-GEMM floor
(teacher logits, student logits, dX, dW), TF/s on 8·N·D·V, peak memory; vs the materializing recipe (both heads'
fp32 log-softmax, TRL's generalized JSD, mean over positions) and Liger's LigerFusedLinearJSDLoss when importable.

Run on a GPU (finishes in a few minutes on an H100; compiles dominate):
    python benchmarks/gpu.py                      # every section, bf16 and fp32
    python benchmarks/gpu.py --only ce --reps 50  # plain CE only (or lce, lp, distill, fsdp)
    python benchmarks/gpu.py --sweep              # time (BLOCK, num_warps) candidates for triton_rows.ROW_LAUNCH
Anywhere: the speed-of-light time of each section and shape on an H100 SXM (a measured row's %SOL is the same on its
own GPU over its time):
    python benchmarks/gpu.py --predict
Check on a CPU (tiny shapes, Triton's interpreter; the numbers mean nothing, the code paths all run):
    python benchmarks/gpu.py --smoke
Third-party methods are optional: pure-Python wheels (liger-kernel, cut-cross-entropy, trl — the log-probs section
times TRL's fused head, trl.kernels.ChunkedLogProbFunction) can be installed next to crossent on the GPU machine
(benchmarks/gpu_bundle.sh downloads them for a machine without a registry); a missing one is listed as skipped,
with the reason. A section is one entry in SECTIONS.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports Triton, which fixes interpreter vs compiler then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import crossent  # noqa: E402

PLAIN_SHAPES = ((8192, 131072), (16384, 32768))  # issue 4: 128k- and 32k-vocabulary loss heads
LINEAR_SHAPE = (8192, 4096, 128256)  # issue 4: N tokens, hidden D, Llama-3 vocabulary V
SMOKE_PLAIN_SHAPES = ((8, 1000),)
SMOKE_LINEAR_SHAPE = (16, 8, 515)
IGNORED_FRACTION = 0.05
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# HBM peak in GB/s by device-name substring, first match wins (vendors' spec sheets; used only for the %SOL
# column). Unknown devices print no percentage.
HBM_PEAK_GBS = (("H100 PCIe", 2000), ("H100", 3350), ("H200", 4800), ("H20", 4000), ("A100", 2039), ("B200", 8000))
# Dense bf16 tensor-core peak in TF/s, same matching, for the same column.
BF16_PEAK_TFS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("H20", 148), ("A100", 312), ("B200", 2250))

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


def _release(device: torch.device) -> None:
    """Hand the allocator's cached blocks back between methods: one method's cached N×V temporaries would crowd
    out the next's (fragmentation, or out of memory at V = 128256)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def lookup(table, name: str) -> Optional[float]:
    return next((value for key, value in table if key in name), None)


# --- speed of light -----------------------------------------------------------------------------------------------
# The least time a section's work can take on a device: max(FLOPs / dense bf16 tensor-core peak, bytes / HBM peak),
# from each section's FLOPs and bytes formula (plain_work, linear_work). ``--predict`` prints it for an H100 SXM;
# a measured row's %SOL is that time on the measuring GPU (its peaks from the tables above) over the row's time.


class Work(NamedTuple):
    flops: float
    bytes: float


class Peaks(NamedTuple):
    name: str
    hbm_gbs: float
    bf16_tfs: float


def peaks_of(name: str) -> Optional[Peaks]:
    """The peaks of the device called ``name`` from the two tables above; None where either is unknown."""
    hbm, tfs = lookup(HBM_PEAK_GBS, name), lookup(BF16_PEAK_TFS, name)
    return None if hbm is None or tfs is None else Peaks(name, hbm, tfs)


def device_peaks(device: torch.device) -> Optional[Peaks]:
    return peaks_of(device_name(device))


H100_SXM = peaks_of("H100 SXM")  # 3.35 TB/s HBM3, 989 TFLOP/s dense bf16


def bound_ms(work: Work, peaks: Peaks) -> Tuple[float, float]:
    """The least time of ``work``'s FLOPs at the dense bf16 peak and of its bytes at the HBM peak, ms each."""
    return 1e3 * work.flops / (peaks.bf16_tfs * 1e12), 1e3 * work.bytes / (peaks.hbm_gbs * 1e9)


def sol_ms(work: Work, peaks: Peaks) -> float:
    return max(bound_ms(work, peaks))


def sol_pct(work: Work, peaks: Optional[Peaks], ms: float) -> Optional[float]:
    """The speed-of-light time as a % of a measured ``ms`` (100: at the limit), where the device's peaks are known."""
    return None if peaks is None else 100.0 * sol_ms(work, peaks) / ms


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


def plain_work(n: int, c: int, dtype: torch.dtype) -> Work:
    """Plain CE moves ``plain_bytes``; its ~10 FLOPs per logit run on CUDA cores, far below the HBM time: 0 here."""
    return Work(0.0, plain_bytes(n, c, dtype))


def linear_work(n: int, d: int, v: int, dtype: torch.dtype, gemms: int, heads: int = 1, grads: bool = True) -> Work:
    """A fused LM-head section: ``gemms`` products of N·D·V multiply-adds (2·N·D·V FLOPs each); bytes: each head's
    X (N·D) and W (V·D) read once and, with ``grads``, the student's dX and dW written once, in the inputs' dtype
    (the per-token vectors, O(N), are left out: < 0.1% at the shapes here). No (N, V) tensor is counted: the fused
    methods never write one, so the floor assumes none."""
    operands = (n * d + v * d) * dtype.itemsize
    return Work(2.0 * gemms * n * d * v, operands * (heads + (1 if grads else 0)))


def _per_row(loss):
    """A competitor's loss where it returns (loss, extras)."""
    return loss[0] if isinstance(loss, tuple) else loss


def _mean_of(loss):
    """Competitors return a scalar, a per-row vector, or (loss, extra): the scalar mean loss."""
    loss = _per_row(loss)
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
    peak_pct: Optional[float] = None  # %SOL: the speed-of-light time on this device / the measured time, in %
    ratio: Optional[float] = None  # time / the baseline's time (F.cross_entropy, or the cuBLAS floor)
    mem: Optional[int] = None  # peak bytes beyond the inputs
    mem_floor: Optional[int] = None
    error: Optional[float] = None  # |loss − reference loss| (log-probs: max |Δ| over log_probs and entropy)
    value: Optional[float] = None  # the loss itself, where methods are compared by value (distillation)
    note: str = ""


def bench_plain(shapes, dtypes, reps, device, smoke, log) -> List[Row]:
    rows = []
    peaks = device_peaks(device)
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
                row.peak_pct = sol_pct(plain_work(n, c, dtype), peaks, row.ms)
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


def _time_into(row: Row, step: Callable[[], object], reps: int, device: torch.device, work: Work,
               peaks: Optional[Peaks], floor_ms: float) -> None:  # fmt: skip
    """``row`` gets ``step``'s median time, peak extra memory, TF/s on ``work``, its %SOL and ratio to the floor."""
    row.ms = median_ms(step, reps, device)
    row.mem = peak_extra_bytes(step, device)
    row.rate = work.flops / (row.ms * 1e-3) / 1e12
    row.peak_pct = sol_pct(work, peaks, row.ms)
    row.ratio = row.ms / floor_ms


def _floor_row(section: str, shape, dtype_name: str, method: str, gemms: Callable[[], object], work: Work, reps: int,
               device: torch.device, peaks: Optional[Peaks], mem_floor: Optional[int]) -> Row:  # fmt: skip
    """The row of a GEMM floor: ``gemms``' median time, TF/s on ``work``, its %SOL, ratio 1."""
    ms = median_ms(gemms, reps, device)
    return Row(section, shape, dtype_name, method, ms=ms, rate=work.flops / (ms * 1e-3) / 1e12, ratio=1.0,
               mem_floor=mem_floor, peak_pct=sol_pct(work, peaks, ms))  # fmt: skip


def _failure(err: Exception) -> str:
    """The note of a method that raised (reported in its row, not fatal)."""
    return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"


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
    peaks = device_peaks(device) if dtype == torch.bfloat16 else None  # the bf16 tensor-core peak
    work = linear_work(n, d, v, dtype, gemms=3)
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
    rows = [_floor_row("lce", shape, dtype_name, "GEMM floor", gemms, work, reps, device, peaks, mem_floor)]
    floor_ms = rows[0].ms
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

            _time_into(row, step, reps, device, work, peaks, floor_ms)
        except Exception as err:
            row.note = _failure(err)
    return rows


# --- fused per-token log-probs + entropy --------------------------------------------------------------------------
# crossent.linear_token_log_probs(entropy=True) forward+backward, both outputs given a random upstream gradient
# (the RL / policy-gradient case). The floor is the four GEMMs every method must run: logits = X Wᵀ in forward,
# again in backward (or kept: then N×V of memory), dX = G W, dW = Gᵀ X (8·N·D·V FLOPs), on preallocated buffers;
# the memory floor is dX + dW. Under torch.no_grad() only the first product is needed: the no-grad rows are
# timed against that one GEMM, their TF/s on 2·N·D·V.


def materialized_log_probs(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The usual recipe, (N, V) tensors and all: fp32 log-softmax of the head's logits, the ids' entries, and
    the entropy −Σ_c p_c log p_c; autograd for the gradients."""
    log_p = F.linear(x, w).float().log_softmax(-1)
    return log_p.gather(-1, ids[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


TRL_CHUNK_SIZE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE (trl 1.16.0): the vocabulary tile its trainers pass


def log_prob_methods(smoke: bool) -> Dict[str, Union[Callable, str]]:
    """name -> (log_probs, entropy) of (x, w, ids), (N,) each, or the reason the method is unavailable. Methods
    named "... lp" return (log_probs, None) and are timed with the log-probs' upstream gradient alone: CCE and
    Liger give the per-token loss −log p (reduction "none") but no entropy. TRL's fused head
    (``trl.kernels.ChunkedLogProbFunction``, what its trainers call) gives both, on the CPU in torch ops."""
    methods: Dict[str, Union[Callable, str]] = {
        "materialized": materialized_log_probs,
        "crossent": lambda x, w, ids: tuple(crossent.linear_token_log_probs(x, w, ids, entropy=True, impl="triton")),
        "crossent lp": lambda x, w, ids: (crossent.linear_token_log_probs(x, w, ids, impl="triton")[0], None),
    }
    try:
        from trl.kernels import ChunkedLogProbFunction as trl_head

        # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs) -> 5 outputs
        methods["TRL"] = lambda x, w, ids: trl_head.apply(x, w, None, ids, 1.0, TRL_CHUNK_SIZE, None,
                                                                         1.0, ("entropy",))[:2]  # fmt: skip
    except Exception as err:  # not installed (the crossent[trl] extra), or an import that fails on this machine
        methods["TRL"] = f"skipped: {type(err).__name__}: {err}"
    if smoke:
        return methods
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        methods["CCE lp"] = lambda x, w, ids: (-cce(x, w, ids, reduction="none"), None)
    except ImportError as err:
        methods["CCE lp"] = f"skipped: {err}"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        methods["liger lp"] = lambda x, w, ids: (-_per_row(liger_fused_linear_cross_entropy(
            x, w, ids, reduction="none")), None)  # fmt: skip
    except ImportError as err:
        methods["liger lp"] = f"skipped: {err}"
    return methods


@torch.no_grad()
def _chunked_reference(rows_fn: Callable, n: int, rows: int = 1024) -> List[torch.Tensor]:
    """``rows_fn(r0, r1)`` (a tuple of per-row tensors) over blocks of rows, each output concatenated: an fp32
    reference whose (rows, V) temporaries stay small at V = 128256."""
    parts = [rows_fn(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]
    return [torch.cat(column) for column in zip(*parts)]


def bench_log_probs(shape, dtype_name, reps, device, smoke, log) -> List[Row]:
    """Forward+backward of the fused per-token log-probs and entropy (grads for X and W) against the GEMM floor,
    and the no-grad forward against one GEMM. ``error``: max |Δ| over log_probs and entropy vs an fp32 reference
    computed from the same (rounded) inputs."""
    n, d, v = shape
    dtype = DTYPES[dtype_name]
    peaks = device_peaks(device) if dtype == torch.bfloat16 else None
    work, fwd_work = linear_work(n, d, v, dtype, gemms=4), linear_work(n, d, v, dtype, gemms=1, grads=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(v, d, generator=gen) / math.sqrt(d)).to(device=device, dtype=dtype)
    ids = torch.randint(0, v, (n,), generator=gen).to(device)
    grads = (torch.randn(n, generator=gen).to(device), torch.randn(n, generator=gen).to(device))  # fp32 upstream
    mem_floor = (n * d + v * d) * dtype.itemsize  # dX + dW in the inputs' dtype

    logits = torch.empty(n, v, device=device, dtype=dtype)
    dx, dw = torch.empty_like(x), torch.empty_like(w)

    def gemms():
        torch.mm(x, w.T, out=logits)  # forward
        torch.mm(x, w.T, out=logits)  # backward's recompute
        torch.mm(logits, w, out=dx)
        torch.mm(logits.T, x, out=dw)

    def one_gemm():
        torch.mm(x, w.T, out=logits)

    floors = []
    for method, fn, each in (("4-GEMM floor", gemms, work), ("1-GEMM floor (no grad)", one_gemm, fwd_work)):
        log(f"lp {n}x{d}x{v} {dtype_name} {method}")
        floors.append(_floor_row("lp", shape, dtype_name, method, fn, each, reps, device, peaks,
                                 mem_floor if each == work else None))  # fmt: skip
    rows, fwd_rows = [floors[0]], [floors[1]]  # printed as two blocks: forward+backward, then the no-grad forward
    floor_ms, fwd_floor_ms = floors[0].ms, floors[1].ms
    logits = dx = dw = None  # free the N×V floor buffer before the methods run
    w32 = w.float()
    ref_lp, ref_ent = _chunked_reference(lambda r0, r1: materialized_log_probs(x[r0:r1].float(), w32, ids[r0:r1]), n)
    w32 = None
    timed = []
    for method, fn in log_prob_methods(smoke).items():
        row = Row("lp", shape, dtype_name, method, mem_floor=mem_floor)
        rows.append(row)
        if isinstance(fn, str):
            row.note = fn
            continue
        log(f"lp {n}x{d}x{v} {dtype_name} {method}")
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        try:
            outputs = [out for out in fn(xg, wg, ids) if out is not None]  # (lp only): no entropy
            refs = (ref_lp, ref_ent)
            row.error = max((out.detach().float() - ref).abs().max().item() for out, ref in zip(outputs, refs))
            count, outputs = len(outputs), None

            def step(fn=fn, count=count):
                return torch.autograd.grad(fn(xg, wg, ids)[:count], (xg, wg), grads[:count])

            _time_into(row, step, reps, device, work, peaks, floor_ms)
            timed.append((method, fn))
        except Exception as err:  # a method that fails here (e.g. out of memory) is reported, not fatal
            row.note = _failure(err)
        finally:
            xg = wg = None
            _release(device)
    for method, fn in timed:  # the forward alone, as for sampling or the reference policy's log-probs
        row = Row("lp", shape, dtype_name, f"{method} (no grad)")
        fwd_rows.append(row)
        log(f"lp {n}x{d}x{v} {dtype_name} {row.method}")

        def forward(fn=fn):
            with torch.no_grad():
                return fn(x, w, ids)

        try:
            _time_into(row, forward, reps, device, fwd_work, peaks, fwd_floor_ms)
        except Exception as err:
            row.note = _failure(err)
        finally:
            _release(device)
    return rows + fwd_rows


# --- fused distillation (generalized JSD between two LM heads) ----------------------------------------------------
# crossent.linear_distill_loss, forward+backward of the student (grads for X and W; the teacher's head gets
# none). The floor is the four GEMMs every method must run: the teacher's logits X_t W_tᵀ, the student's X Wᵀ,
# dX = G W, dW = Gᵀ X (8·N·D·V FLOPs with D_t = D), on preallocated buffers; the memory floor is dX + dW.
# ``beta`` convention, everywhere in this section: crossent's, which is TRL's generalized_jsd_loss's — with the
# teacher's p and the student's q, beta = 0 is KL(p ‖ q), beta = 1 is KL(q ‖ p), and in between
# β KL(p ‖ m) + (1 − β) KL(q ‖ m) with m = β p + (1 − β) q. Liger's LigerFusedLinearJSDLoss uses the same
# convention since its JSD fixes of March 2025 (liger-kernel #609), so it gets the same beta. Older Liger
# releases mixed m = β q + (1 − β) p with the same KL weights and had no endpoint cases: equal at β = 0.5, the two
# KL directions swapped at β = 0 and 1. The value column shows which one an installed version computes.
DISTILL_BETAS = (0.0, 0.5)


def generalized_jsd_rows(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD of student log-probs ``log_q`` and teacher log-probs ``log_p`` (N, V), the way TRL's
    ``generalized_jsd_loss`` forms it: ``F.kl_div`` (log targets) for the KL terms, and for 0 < β < 1 the mixture's
    log as a logsumexp over the stacked, weighted log-probs. Sums over the vocabulary; (N,)."""
    if beta == 0.0:
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # KL(p ‖ q)
    if beta == 1.0:
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)  # KL(q ‖ p)
    log_m = torch.logsumexp(torch.stack((log_p + math.log(beta), log_q + math.log1p(-beta))), dim=0)
    kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    return beta * kl_p + (1.0 - beta) * kl_q


def materialized_distill_rows(x, w, x_t, w_t, beta: float) -> torch.Tensor:
    """The usual recipe's per-position divergence: both heads' (N, V) logits, fp32 log-softmax of each."""
    log_q = F.linear(x, w).float().log_softmax(-1)
    log_p = F.linear(x_t, w_t).float().log_softmax(-1)
    return generalized_jsd_rows(log_q, log_p, beta)


def distill_methods(beta: float, smoke: bool) -> Dict[str, Union[Callable, str]]:
    """name -> loss(x, w, x_t, w_t, labels) (the mean over positions; no label is ignored), or the reason the
    method is unavailable."""
    methods: Dict[str, Union[Callable, str]] = {
        "materialized": lambda x, w, x_t, w_t, labels: materialized_distill_rows(x, w, x_t, w_t, beta).mean(),
    }
    if hasattr(crossent, "linear_distill_loss"):
        methods["crossent"] = lambda x, w, x_t, w_t, labels: crossent.linear_distill_loss(x, w, x_t, w_t, beta=beta,
                                                                                          impl="triton")  # fmt: skip
    else:
        methods["crossent"] = "skipped: crossent.linear_distill_loss does not exist in this crossent"
    if smoke:
        return methods
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # soft loss only (its default adds 0.5 × hard CE; the CE on the labels is still computed, weighted 0); it
        # divides the summed divergence by the number of labels != ignore_index, all N here. Biases passed as None:
        # older releases have no defaults for them.
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta)
        methods["liger JSDLoss"] = lambda x, w, x_t, w_t, labels: _mean_of(liger(x, w, x_t, w_t, labels, None, None))
    except (ImportError, TypeError) as err:  # not installed, or a release whose constructor differs
        methods["liger JSDLoss"] = f"skipped: {err}"
    return methods


def bench_distill(shape, dtype_name, reps, device, smoke, log) -> List[Row]:
    """Forward+backward of the student's fused distillation loss, per beta in DISTILL_BETAS, against the GEMM
    floor. ``value``: each method's loss; ``error``: |loss − an fp32 reference from the same (rounded) inputs|."""
    n, d, v = shape
    dtype = DTYPES[dtype_name]
    peaks = device_peaks(device) if dtype == torch.bfloat16 else None
    work = linear_work(n, d, v, dtype, gemms=4, heads=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(v, d, generator=gen) / math.sqrt(d)).to(device=device, dtype=dtype)
    # the teacher: a perturbed copy of the student (hidden states and head), which agrees with it in part
    x_t = (x.float() + 0.5 * torch.randn(n, d, generator=gen).to(device)).to(dtype)
    w_t = (w.float() + 0.5 * torch.randn(v, d, generator=gen).to(device) / math.sqrt(d)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    mem_floor = (n * d + v * d) * dtype.itemsize  # dX + dW in the inputs' dtype

    logits = torch.empty(n, v, device=device, dtype=dtype)
    dx, dw = torch.empty_like(x), torch.empty_like(w)

    def gemms():
        torch.mm(x_t, w_t.T, out=logits)  # the teacher's logits
        torch.mm(x, w.T, out=logits)  # the student's
        torch.mm(logits, w, out=dx)
        torch.mm(logits.T, x, out=dw)

    log(f"distill {n}x{d}x{v} {dtype_name} GEMM floor")
    rows = [_floor_row("distill", shape, dtype_name, "4-GEMM floor", gemms, work, reps, device, peaks, mem_floor)]
    floor_ms = rows[0].ms
    logits = dx = dw = None
    w32, w_t32 = w.float(), w_t.float()
    refs = {}
    for beta in DISTILL_BETAS:
        (ref_rows,) = _chunked_reference(
            lambda r0, r1: (materialized_distill_rows(x[r0:r1].float(), w32, x_t[r0:r1].float(), w_t32, beta),), n
        )
        refs[beta] = ref_rows.double().mean().item()
    w32 = w_t32 = None  # the fp32 weights (2 GiB each at full size) are not held while the methods run
    for beta, ref in refs.items():
        for method, fn in distill_methods(beta, smoke).items():
            row = Row("distill", shape, dtype_name, f"{method} β={beta:g}", mem_floor=mem_floor)
            rows.append(row)
            if isinstance(fn, str):
                row.note = fn
                continue
            log(f"distill {n}x{d}x{v} {dtype_name} {row.method}")
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            try:
                row.value = _mean_of(fn(xg, wg, x_t, w_t, labels)).item()
                row.error = abs(row.value - ref)

                def step(fn=fn):
                    return torch.autograd.grad(_mean_of(fn(xg, wg, x_t, w_t, labels)), (xg, wg))

                _time_into(row, step, reps, device, work, peaks, floor_ms)
            except Exception as err:  # a method that fails here (e.g. out of memory) is reported, not fatal
                row.note = _failure(err)
            finally:
                xg = wg = None
                _release(device)
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
    """One table; times in ms, rate in ``unit``, memory in MiB; a ``value`` column (the loss, next to the time)
    when any row carries one."""
    with_value = any(r.value is not None for r in rows)
    value_head = f" {'value':>10}" if with_value else ""
    head = (f"{'shape':>20} {'dtype':>5} {'method':<22}{value_head} {'ms':>9} {unit:>7} {'%SOL':>6} {'ratio':>6} "
            f"{'peak MiB':>9} {'floor MiB':>9} {'|Δloss|':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]

    def f(value, spec, scale=1.0):
        width = int(spec.split(".")[0])
        return format(value / scale, spec) if value is not None else "–".rjust(width)

    for r in rows:
        shape = "x".join(str(s) for s in r.shape)
        if r.note and r.ms is None:
            lines.append(f"{shape:>20} {r.dtype:>5} {r.method:<22} {r.note}")
            continue
        value = f" {f(r.value, '10.6f')}" if with_value else ""
        lines.append(
            f"{shape:>20} {r.dtype:>5} {r.method:<22}{value} {f(r.ms, '9.3f')} {f(r.rate, '7.1f')} "
            f"{f(r.peak_pct, '6.1f')} {f(r.ratio, '6.2f')} {f(r.mem, '9.0f', 2**20)} {f(r.mem_floor, '9.0f', 2**20)} "
            f"{f(r.error, '8.1e')}"
        )
    return "\n".join(lines)


# --- sections ---------------------------------------------------------------------------------------------------
# One entry per section: its heading, what it prints, and (for --predict) the work of each shape it measures. A new
# section is one more entry in SECTIONS; --only takes its key.


class Run(NamedTuple):
    """What a section gets: the shapes, dtypes, repetitions, device (None for --predict), the smoke flag, a logger."""

    plain_shapes: Tuple[Tuple[int, int], ...]
    linear_shape: Tuple[int, int, int]
    dtypes: List[str]
    reps: int
    device: Optional[torch.device]
    smoke: bool
    log: Callable[[str], None]

    @property
    def linear_dtype(self) -> str:
        """The fused sections' dtype: bf16 on a GPU; fp32 in the CPU smoke run (bf16 products are emulated there)."""
        return "fp32" if self.smoke else "bf16"


class Section(NamedTuple):
    title: str
    run: Callable[[Run], str]  # measures, returns the table
    work: Callable[[Run], List[Tuple[tuple, str, str, Work]]] = lambda run: []  # (shape, dtype, what, work)
    in_smoke: bool = True


def _linear_work(run: Run, gemms: int, heads: int = 1, grads: bool = True) -> Work:
    n, d, v = run.linear_shape
    return linear_work(n, d, v, DTYPES[run.linear_dtype], gemms, heads, grads)


def _fsdp(run: Run) -> str:
    if run.device is None or run.device.type != "cuda":
        return "skipped: needs CUDA GPUs (benchmarks/fsdp_memory.py alone runs the comparison on CPU ranks)"
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_memory.py"),
               "--accelerate", "--nproc", str(torch.cuda.device_count())]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # a partial table is not a result: say so, with the error's end
        return f"fsdp_memory.py failed (exit {done.returncode}):\n{done.stdout}{done.stderr[-3000:]}"
    return done.stdout


SECTIONS: Dict[str, Section] = {
    "ce": Section(
        "plain cross-entropy, forward+backward; GB/s = plain_bytes / time; ratio = time / F.cross_entropy's",
        lambda r: format_rows(bench_plain(r.plain_shapes, r.dtypes, r.reps, r.device, r.smoke, r.log), "GB/s"),
        lambda r: [(s, d, "fwd+bwd", plain_work(*s, DTYPES[d])) for s in r.plain_shapes for d in r.dtypes],
    ),
    "lce": Section(
        "fused linear cross-entropy, forward+backward; TF/s on 6·N·D·V; ratio = time / the GEMM floor's",
        lambda r: format_rows(bench_linear_ce(r.linear_shape, r.linear_dtype, r.reps, r.device, r.smoke, r.log),
                              "TF/s"),  # fmt: skip
        lambda r: [(r.linear_shape, r.linear_dtype, "fwd+bwd", _linear_work(r, 3))],
    ),
    "lp": Section(
        "fused per-token log-probs + entropy, forward+backward (random upstream gradients on both; \"… lp\" methods: "
        "log-probs only); TF/s on 8·N·D·V, ratio = time / the 4-GEMM floor's; no-grad rows: forward only, TF/s on "
        "2·N·D·V, ratio = time / one GEMM's; |Δloss| = max |Δ| of log_probs and entropy vs fp32",
        lambda r: format_rows(bench_log_probs(r.linear_shape, r.linear_dtype, r.reps, r.device, r.smoke, r.log),
                              "TF/s"),  # fmt: skip
        lambda r: [(r.linear_shape, r.linear_dtype, "fwd+bwd", _linear_work(r, 4)),
                   (r.linear_shape, r.linear_dtype, "fwd", _linear_work(r, 1, grads=False))],  # fmt: skip
    ),
    "distill": Section(
        "fused distillation (generalized JSD, student fwd+bwd), per beta; value = the mean loss; TF/s on 8·N·D·V; "
        "ratio = time / the 4-GEMM floor's; |Δloss| vs fp32",
        lambda r: format_rows(bench_distill(r.linear_shape, r.linear_dtype, r.reps, r.device, r.smoke, r.log),
                              "TF/s"),  # fmt: skip
        lambda r: [(r.linear_shape, r.linear_dtype, "fwd+bwd", _linear_work(r, 4, heads=2))],
    ),
    "fsdp": Section(
        "crossent.transformers.patch under accelerate's FSDP2 plugin (vocabulary 128256), every GPU a rank: per-rank "
        "step peak memory and time, stock vs patched (benchmarks/fsdp_memory.py --accelerate)",
        _fsdp,
        in_smoke=False,
    ),
}


def predict(run: Run, keys: List[str], peaks: Peaks = H100_SXM) -> str:
    """The speed-of-light table: per section and shape, FLOPs and bytes from the sections' formulas and the least
    time they take at ``peaks`` (compute-bound or HBM-bound, whichever is longer)."""
    head = (f"{'section':<8} {'shape':>18} {'dtype':>5} {'work':<8} {'GFLOP':>9} {'GB':>7} {'compute ms':>10} "
            f"{'HBM ms':>8} {'SOL ms':>8}")  # fmt: skip
    lines = [f"speed of light on an {peaks.name} ({peaks.hbm_gbs / 1e3:g} TB/s HBM, {peaks.bf16_tfs:g} TFLOP/s dense "
             f"bf16): max(FLOPs / peak, bytes / bandwidth)", head, "-" * len(head)]  # fmt: skip
    for key in keys:
        for shape, dtype_name, what, work in SECTIONS[key].work(run):
            compute, memory = bound_ms(work, peaks)
            shape_text = "x".join(str(s) for s in shape)
            lines.append(f"{key:<8} {shape_text:>18} {dtype_name:>5} {what:<8} {work.flops / 1e9:9.1f} "
                         f"{work.bytes / 1e9:7.3f} {compute:10.3f} {memory:8.3f} {max(compute, memory):8.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    parser.add_argument("--only", choices=tuple(SECTIONS), help="run one section")
    parser.add_argument("--dtype", choices=tuple(DTYPES), action="append", help="repeatable; default both")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; smoke 1)")
    parser.add_argument("--sweep", action="store_true", help="time launch-table candidates instead")
    parser.add_argument("--predict", action="store_true", help="print the speed-of-light times on an H100 SXM and exit")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.smoke else 20)
    dtypes = args.dtype or list(DTYPES)
    shapes = (SMOKE_PLAIN_SHAPES, SMOKE_LINEAR_SHAPE) if args.smoke else (PLAIN_SHAPES, LINEAR_SHAPE)
    keys = [args.only] if args.only else [key for key, section in SECTIONS.items() if section.in_smoke or not args.smoke]
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    if args.predict:
        print(predict(Run(*shapes, dtypes, reps, None, args.smoke, log), keys))
        return 0
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: run with --smoke for the CPU check, or --predict for the speed-of-light table",
              file=sys.stderr)  # fmt: skip
        return 2
    run = Run(*shapes, dtypes, reps, device, args.smoke, log)
    print(f"device: {device_name(device)}; torch {torch.__version__}; median of {reps}; %SOL = speed-of-light time "
          f"on this device / measured time (--predict)")  # fmt: skip
    if args.sweep:
        print(format_rows(sweep(run.plain_shapes, dtypes, reps, device, args.smoke, log), "GB/s"))
        return 0
    for key in keys:
        print(f"\n{SECTIONS[key].title}")
        print(SECTIONS[key].run(run), flush=True)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
