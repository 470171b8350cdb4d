"""Fused linear + cross-entropy, forward+backward: ``crossent bench --op linear``.

Per case (shape N×D×V, dtype, fraction of targets ignored, load) every method runs in this process on the
same inputs, timed in turns (:func:`~crossent.bench.measure.interleaved_medians`), so each ratio to the
PyTorch baseline (``F.cross_entropy(x @ W.T, t)``) comes from one stretch of machine load. Peak memory is
measured per method in a fresh process (:mod:`crossent.bench.linear_memory`). Errors are against a float64
computation of the loss, dX and dW on the upcast inputs (:func:`oracle`). The methods are listed in
:mod:`crossent.bench.linear_methods`; TF/s in the table count 6·N·D·V FLOPs (logits, dX, dW: 2·N·D·V each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from crossent.bench.linear_memory import peak_rss
from crossent.bench.linear_methods import BASELINE, IGNORE_INDEX, available, make_inputs, make_target, run_step
from crossent.bench.load import condition
from crossent.bench.measure import interleaved_medians, max_abs_diff
from crossent.bench.progress import step
from crossent.bench.report import Row

QUICK_SHAPES: Tuple[Tuple[int, int, int], ...] = ((256, 64, 2048),)
DEFAULT_SHAPES: Tuple[Tuple[int, int, int], ...] = ((2048, 256, 32768),)  # 256 MiB of fp32 logits: > crossent's 128 MiB blocks
FULL_SHAPES: Tuple[Tuple[int, int, int], ...] = ((4096, 1024, 32768), (2048, 2048, 131072))  # LLM heads, 32k/128k
FRACTIONS: Tuple[float, ...] = (0.0, 0.5, 0.9)  # targets equal to ignore_index: none, padded, mostly prompt
ORACLE_BLOCK_BYTES = 256 * 2**20  # float64 logits per block of the oracle


@dataclass(frozen=True)
class Case:
    """One measured configuration of every method."""

    shape: Tuple[int, int, int]
    dtype: str
    ignored: float
    load: str

    @property
    def label(self) -> str:
        """``'2048x256x32768 float32 50% ignored quiet'``."""
        return f"{'x'.join(map(str, self.shape))} {self.dtype} {self.ignored:.0%} ignored {self.load}"


@dataclass(frozen=True)
class Timed:
    """One method's figures in one case, before its memory is known."""

    seconds: Optional[float]
    loss_error: Optional[float]
    grad_error: Optional[float]
    note: str = ""


def run(cases: Sequence[Case], methods: Sequence[str], reps: int, min_sample: float = 0.0,
        bar: Optional[tqdm] = None) -> List[Row]:  # fmt: skip
    """Time every case, then measure each method's peak memory once per (shape, dtype) for all its fractions;
    a method that cannot run here gets a row saying so. ``bar`` advances by :func:`steps` in all."""
    runnable = [m for m in methods if available(m)]
    timed = {}
    for case in cases:
        with step(bar, case.label):
            timed[case] = time_case(case, runnable, reps, min_sample)
    fractions: Dict[Tuple, set] = {}
    for case in cases:
        fractions.setdefault((case.shape, case.dtype), set()).add(case.ignored)
    peaks: Dict[Tuple, Union[Dict[float, int], str]] = {}
    for (shape, dtype), group in fractions.items():
        for method in runnable:
            with step(bar, f"{'x'.join(map(str, shape))} {dtype} {method} peak memory"):
                try:
                    peaks[shape, dtype, method] = peak_rss(method, shape, dtype, sorted(group))
                except RuntimeError as err:
                    peaks[shape, dtype, method] = f"memory run failed: {err}"
    rows = []
    for case in cases:
        base = timed[case].get(BASELINE)
        for method in methods:
            got = timed[case].get(method, Timed(None, None, None, "not installed"))
            peak = peaks.get((case.shape, case.dtype, method))
            ratio = got.seconds / base.seconds if got.seconds is not None and base and base.seconds else None
            memory = peak[case.ignored] if isinstance(peak, dict) else None
            note = got.note or (peak if isinstance(peak, str) else "")
            rows.append(Row("linear", case.shape, case.dtype, case.load, case.ignored, method, got.seconds, ratio,
                            memory, got.loss_error, got.grad_error, note))  # fmt: skip
    return rows


def steps(cases: Sequence[Case], methods: Sequence[str]) -> int:
    """How many progress steps :func:`run` makes: one per case, one per (shape, dtype, runnable method)."""
    return len(cases) + len({(c.shape, c.dtype) for c in cases}) * sum(map(available, methods))


def time_case(case: Case, methods: Sequence[str], reps: int, min_sample: float = 0.0) -> Dict[str, Timed]:
    """One call of each method for its errors (also its warm-up; a method that raises there is noted as
    failed and not timed), then ``reps`` interleaved timed rounds under the case's load."""
    x, w = make_inputs(case.shape, case.dtype)
    t = make_target(case.shape[0], case.shape[2], case.ignored)
    loss64, dx64, dw64 = oracle(x, w, t)
    errors, failed = {}, {}
    for method in methods:
        try:
            loss = run_step(method, x, w, t)
        except Exception as err:  # a third-party method failing must not stop the benchmark
            failed[method] = Timed(None, None, None, f"failed: {type(err).__name__}: {err}")
            continue
        if loss is None:  # the floor: no loss, no gradients to compare
            errors[method] = (None, None)
        else:
            grad_error = max(max_abs_diff(x.grad, dx64), max_abs_diff(w.grad, dw64))
            errors[method] = (abs(loss.double().item() - loss64), grad_error)
    del dx64, dw64
    fns = {m: (lambda m=m: run_step(m, x, w, t)) for m in errors}
    with condition(case.load):
        seconds = interleaved_medians(fns, reps, min_sample)
    return {**{m: Timed(seconds[m], *errors[m]) for m in errors}, **failed}


def oracle(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> Tuple[float, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``x @ W.T`` against ``t`` and its gradients dX, dW, in float64, by blocks of rows.

    With ``z = x Wᵀ``, ``lse_i = log Σ_c exp z_ic`` and ``K`` the targets not ignored:
    ``loss = (1/K) Σ_{i kept} (lse_i − z_{i,t_i})``, ``G = (softmax(z) − onehot(t)) · kept / K``,
    ``dX = G W``, ``dW = Gᵀ x``. Hand value: one row of two zero logits, target 0 → log 2, G = (−½, ½).

    >>> loss, dx, dw = oracle(torch.ones(1, 1), torch.zeros(2, 1), torch.tensor([0]))
    >>> round(loss, 6), dw.flatten().tolist()
    (0.693147, [-0.5, 0.5])
    """
    x64, w64 = x.detach().double(), w.detach().double()
    n, v = x.shape[0], w.shape[0]
    kept = t != IGNORE_INDEX
    count = max(int(kept.sum()), 1)
    safe_t = torch.where(kept, t, 0)
    loss = torch.zeros((), dtype=torch.float64)
    dx = torch.empty_like(x64)
    dw = torch.zeros_like(w64)
    rows = max(1, ORACLE_BLOCK_BYTES // (8 * v))
    for r0 in range(0, n, rows):
        blk = slice(r0, min(r0 + rows, n))
        z = x64[blk] @ w64.T
        lse = torch.logsumexp(z, dim=1)
        picked = z.gather(1, safe_t[blk, None])[:, 0]
        loss += ((lse - picked) * kept[blk]).sum()
        g = z.sub_(lse[:, None]).exp_()  # softmax in place of the logits
        g[torch.arange(g.shape[0]), safe_t[blk]] -= 1.0
        g *= (kept[blk].double() / count)[:, None]  # float64: a bool / int would be float32
        dx[blk] = g @ w64
        dw.addmm_(g.T, x64[blk])
    return loss.item() / count, dx, dw

