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
import subprocess  # noqa: E402
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


def _release(device: torch.device) -> None:
    """Hand the allocator's cached blocks back between methods: one method's cached N×V temporaries would crowd
    out the next's (fragmentation, or out of memory at V = 128256)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    error: Optional[float] = None  # |loss − reference loss| (log-probs: max |Δ| over log_probs and entropy)
    value: Optional[float] = None  # the loss itself, where methods are compared by value (distillation)
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


def _time_into(row: Row, step: Callable[[], object], reps: int, device: torch.device, flops: float,
               peak: Optional[float], floor_ms: float) -> None:  # fmt: skip
    """``row`` gets ``step``'s median time, peak extra memory, TF/s on ``flops``, % of the peak and ratio to the floor."""
    row.ms = median_ms(step, reps, device)
    row.mem = peak_extra_bytes(step, device)
    row.rate = flops / (row.ms * 1e-3) / 1e12
    row.peak_pct = None if peak is None else 100.0 * row.rate / peak
    row.ratio = row.ms / floor_ms


def _floor_row(section: str, shape, dtype_name: str, method: str, gemms: Callable[[], object], flops: float, reps: int,
               device: torch.device, peak: Optional[float], mem_floor: Optional[int]) -> Row:  # fmt: skip
    """The row of a GEMM floor: ``gemms``' median time, TF/s on ``flops``, % of the peak, ratio 1."""
    ms = median_ms(gemms, reps, device)
    rate = flops / (ms * 1e-3) / 1e12
    return Row(section, shape, dtype_name, method, ms=ms, rate=rate, ratio=1.0, mem_floor=mem_floor,
               peak_pct=None if peak is None else 100.0 * rate / peak)  # fmt: skip


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
    rows = [_floor_row("lce", shape, dtype_name, "GEMM floor", gemms, flops, reps, device, peak, mem_floor)]
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

            _time_into(row, step, reps, device, flops, peak, floor_ms)
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


def log_prob_methods(smoke: bool) -> Dict[str, Union[Callable, str]]:
    """name -> (log_probs, entropy) of (x, w, ids), both (N,) fp32, or the reason the method is unavailable.
    No third-party fused op returns both per-token outputs with gradients, so there is none to list here."""
    methods: Dict[str, Union[Callable, str]] = {"materialized": materialized_log_probs}
    if hasattr(crossent, "linear_token_log_probs"):
        methods["crossent"] = lambda x, w, ids: tuple(crossent.linear_token_log_probs(x, w, ids, entropy=True,
                                                                                      impl="triton"))  # fmt: skip
    else:
        methods["crossent"] = "skipped: crossent.linear_token_log_probs does not exist in this crossent"
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
    peak = lookup(BF16_PEAK_TFS, device_name(device)) if dtype == torch.bfloat16 else None
    flops, fwd_flops = 8.0 * n * d * v, 2.0 * n * d * v
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
    for method, fn, work in (("4-GEMM floor", gemms, flops), ("1-GEMM floor (no grad)", one_gemm, fwd_flops)):
        log(f"lp {n}x{d}x{v} {dtype_name} {method}")
        floors.append(_floor_row("lp", shape, dtype_name, method, fn, work, reps, device, peak,
                                 mem_floor if work == flops else None))  # fmt: skip
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
            lp, ent = fn(xg, wg, ids)
            row.error = max((lp.detach().float() - ref_lp).abs().max().item(),
                            (ent.detach().float() - ref_ent).abs().max().item())  # fmt: skip
            lp = ent = None

            def step(fn=fn):
                return torch.autograd.grad(fn(xg, wg, ids), (xg, wg), grads)

            _time_into(row, step, reps, device, flops, peak, floor_ms)
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
            _time_into(row, forward, reps, device, fwd_flops, peak, fwd_floor_ms)
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
    peak = lookup(BF16_PEAK_TFS, device_name(device)) if dtype == torch.bfloat16 else None
    flops = 8.0 * n * d * v
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
    rows = [_floor_row("distill", shape, dtype_name, "4-GEMM floor", gemms, flops, reps, device, peak, mem_floor)]
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

                _time_into(row, step, reps, device, flops, peak, floor_ms)
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
    head = (f"{'shape':>20} {'dtype':>5} {'method':<22}{value_head} {'ms':>9} {unit:>7} {'%peak':>6} {'ratio':>6} "
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    parser.add_argument("--only", choices=("ce", "lce", "lp", "distill", "fsdp"), help="run one section")
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
    if args.only in (None, "lp"):
        print("\nfused per-token log-probs + entropy, forward+backward (random upstream gradients on both); TF/s on "
              "8·N·D·V, ratio = time / the 4-GEMM floor's; no-grad rows: forward only, TF/s on 2·N·D·V, ratio = time / "
              "one GEMM's; |Δloss| = max |Δ| of log_probs and entropy vs fp32")  # fmt: skip
        rows = bench_log_probs(linear_shape, "bf16" if not args.smoke else "fp32", reps, device, args.smoke, log)
        print(format_rows(rows, "TF/s"))
    if args.only in (None, "distill"):
        print("\nfused distillation (generalized JSD, student fwd+bwd), per beta; value = the mean loss; TF/s on "
              "8·N·D·V; ratio = time / the 4-GEMM floor's; |Δloss| vs fp32")  # fmt: skip
        rows = bench_distill(linear_shape, "bf16" if not args.smoke else "fp32", reps, device, args.smoke, log)
        print(format_rows(rows, "TF/s"))
    if args.only in (None, "fsdp") and not args.smoke:
        print("\ncrossent.transformers.patch under accelerate's FSDP2 plugin (vocabulary 128256), every GPU a rank: "
              "per-rank step peak memory and time, stock vs patched (benchmarks/fsdp_memory.py --accelerate)")  # fmt: skip
        command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_memory.py"),
                   "--accelerate", "--nproc", str(torch.cuda.device_count())]  # fmt: skip
        print(subprocess.run(command, capture_output=True, text=True).stdout or "fsdp_memory.py failed", flush=True)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
