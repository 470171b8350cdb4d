"""Fused linear + cross-entropy over one rank's vocabulary rows, in token chunks (torch GEMMs + shard kernels).

Fused: a token chunk's logits ``x_c W_rᵀ + b_r``, their shard stats (forward); their gradient, written
over the same buffer, and the products dX_c, dW, db (backward).
Never materialized: the N × V_local logits or their gradient; one chunk of rows × V_local at a time.
Written in place: the chunk buffer (logits, then their gradient) and the dW / db accumulators.

The per-row math is :mod:`crossent.kernels.torch_rows`'s (``shard_stats``, ``shard_backward``); this
file only slices tokens, runs the matrix products and accumulates. The cross-rank combine of the
stats and the all-reduce of dX are the caller's (:mod:`crossent.distributed`), once per step.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from crossent.kernels import torch_rows
from crossent.kernels.torch_rows import RowStats, compute_dtype

# Token rows × V_local elements per chunk: small chunks make thin GEMMs that run far below peak. Measured
# on a shared 2-core x86 VM, fp32 forward + backward at (N, D, V_local) = (1024, 1024, 32768), against
# 2.88 s for the same 4 products unchunked: 2^18 → 23.6 s, 2^20 → 8.2 s, 2^22 → 4.1 s, 2^24 → 3.5 s
# (/tmp probe, not kept; the machine was loaded by other jobs). 2^24 fp32 elements are a 64 MiB
# buffer, a quarter of W_local at D = 1024, V_local = 65536. On CUDA, launch overhead wants bigger chunks.
CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}


def chunk_rows(num_rows: int, vocab_size: int, device: torch.device, chunk_size: Optional[int]) -> int:
    """Token rows per chunk: ``chunk_size`` if given, else ``CHUNK_ELEMENTS // V_local`` (at least 1)."""
    if chunk_size is not None:
        return chunk_size
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, min(max(num_rows, 1), budget // max(vocab_size, 1)))


def stats(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
          vocab_start: int, need_dot: bool, softcap: Optional[float], rows: int) -> RowStats:  # fmt: skip
    """This rank's per-row stats (max, sum-exp, target logit, dot) for ``x`` (N, D) and ``w`` (V_local, D)."""
    n = x.shape[0]
    cdt = compute_dtype(x.dtype)
    out = [torch.empty(n, dtype=cdt, device=x.device) for _ in range(4 if need_dot else 3)]
    for i in range(0, n, rows):
        j = min(i + rows, n)
        part = torch_rows.shard_stats(F.linear(x[i:j], w, b), target[i:j], weight, vocab_start, need_dot, softcap)
        for buf, value in zip(out, part):
            buf[i:j] = value
    return RowStats(out[0], out[1], out[2], out[3] if need_dot else None)


def grads(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor], vocab_start: int,
          lse: Tensor, grad_loss: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
          softcap: Optional[float], num_classes: int, rows: int,
          need: Tuple[bool, bool, bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """This rank's (dX, dW, db) for the upstream per-row gradient ``grad_loss`` (N,), only those in ``need``.

    Per chunk: ``G = g · ∂loss/∂z`` (rows × V_local, the logits buffer overwritten), then
    ``dX_c = G W`` (this rank's share of the input gradient: the caller sums it over ranks),
    ``dW += Gᵀ x_c``, ``db += Σ_rows G``. dW/db accumulate in fp32 for 16-bit parameters (a sum over
    N rows rounded to 8 bits of mantissa per chunk would lose the small updates), in place otherwise.
    """
    n = x.shape[0]
    acc = _Accumulators(x, w, b, need)
    g = grad_loss.expand(lse.shape)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        z = F.linear(x[i:j], w, b)
        torch_rows.shard_backward(z, target[i:j], weight, vocab_start, lse[i:j], g[i:j], ignore_index,
                                  label_smoothing, z_loss, softcap, num_classes, z)  # fmt: skip
        acc.add(z, x, w, i, j)
    dx, dw, db = acc.grads
    return dx, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype)


def loss_and_grads(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
                   vocab_start: int, ignore_index: int, label_smoothing: float, z_loss: float,
                   softcap: Optional[float], num_classes: int, rows: int, combine,
                   need: Tuple[bool, bool, bool]):  # fmt: skip
    """Per-row loss and LSE, and (dX share, dW, db) for an upstream gradient of 1 on every row, in one pass.

    For ``"mean"``/``"sum"`` the upstream gradient is the same number g for every row, known only in
    backward; the gradient is linear in g, so it is formed here with g = 1 and scaled there: 3 matrix
    products per chunk (logits, dX, dW) instead of 4. Each chunk's stats are combined over the ranks
    (``combine``) before its gradient is formed, so every rank must use the same ``rows``.
    dW/db are returned in the accumulation dtype (fp32 for 16-bit weights), dX in the input's dtype.
    """
    n = x.shape[0]
    cdt = compute_dtype(x.dtype)
    loss, lse = torch.empty(n, dtype=cdt, device=x.device), torch.empty(n, dtype=cdt, device=x.device)
    acc = _Accumulators(x, w, b, need)
    one = torch.ones((), dtype=cdt, device=x.device)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        z = F.linear(x[i:j], w, b)
        t = target[i:j]
        st = combine(torch_rows.shard_stats(z, t, weight, vocab_start, label_smoothing != 0.0, softcap))
        lse[i:j] = st.lse()
        loss[i:j] = torch_rows.index_loss(lse[i:j], st.target_logit, st.dot, t, weight, ignore_index,
                                          label_smoothing, z_loss, num_classes)  # fmt: skip
        torch_rows.shard_backward(z, t, weight, vocab_start, lse[i:j], one, ignore_index, label_smoothing,
                                  z_loss, softcap, num_classes, z)  # fmt: skip
        acc.add(z, x, w, i, j)
    return loss, lse, acc.grads


class _Accumulators:
    """dX (input dtype, one block of rows per chunk), dW and db (summed over chunks, in ``acc`` dtype)."""

    def __init__(self, x, w, b, need):
        self.acc = compute_dtype(w.dtype)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need[0] else None
        dw = torch.zeros(w.shape, dtype=self.acc, device=w.device) if need[1] else None
        db = torch.zeros(b.shape, dtype=self.acc, device=b.device) if need[2] else None
        self.grads = (dx, dw, db)

    def add(self, grad_logits, x, w, i, j):
        """Add the chunk of rows [i, j), whose logits' gradient is ``grad_logits`` (rows × V_local)."""
        dx, dw, db = self.grads
        if dx is not None:
            torch.mm(grad_logits, w, out=dx[i:j])  # this rank's share of dX for these rows
        if dw is not None:
            dw.addmm_(grad_logits.t().to(self.acc), x[i:j].to(self.acc))
        if db is not None:
            db.add_(grad_logits.sum(0, dtype=self.acc))
