"""Distillation against a sparse (top-K) teacher, in differentiable torch ops over one chunk of rows.

Fused: nothing beyond torch's own ops; the public function runs this per chunk of rows under activation
checkpointing, so one chunk's (rows, V) logits exist at a time (forward, and again in backward).
Never materialized: the (N, V) logits or probabilities of the whole batch.
Written in place: nothing (autograd differentiates every step).

Per row, with ``s = z / T`` (``z`` first capped to ``κ tanh(z / κ)`` with a softcap, as distill_rows does),
``q = softmax(s)`` over all V and the teacher's ``log p_k`` at its K ids (docs/math.md, "Sparse teacher"):
``tail=True`` takes K + 1 outcomes — the ids and one bucket with ``q_tail = Σ_{c ∉ ids} q_c =
exp(lse(s off the ids) − lse(s))`` (no cancellation in ``1 − Σ q_k``) and ``p_tail = −expm1(lse(log p_k))`` — and
``tail=False`` the two renormalized over the ids (a K-way softmax of ``s_k``); then the generalized JSD of
``distill_rows`` over those outcomes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from crossent._options import DistillRowOptions

# Default bytes of one checkpointed chunk's (rows, V) temporaries (``memory_budget=None``): a chunk of a few tens
# of MiB; not tuned (the dense teacher's fused loop is the fast path).
SPARSE_CHUNK_BYTES = 64 << 20
# (rows, V) buffers of the compute dtype a chunk holds at its peak (backward, after the recompute), and one more
# for the softcap's tanh. Measured on the CPU, float32 and bf16, tail=True, (64 rows, D=8, V=32768) as one chunk,
# with a dispatch mode that adds each new storage's bytes and subtracts them when it is freed: 41 MiB (5 × 8 MiB),
# 49 MiB with a softcap.
ROW_BUFFERS = 5
SOFTCAP_ROW_BUFFERS = 1


def chunk_rows(num_rows: int, vocab: int, dtype: torch.dtype, opts: DistillRowOptions, chunk_size,
               memory_budget) -> int:  # fmt: skip
    """Rows per checkpointed chunk: ``chunk_size``, else as many rows as ``memory_budget`` bytes of (rows, V)
    temporaries in ``dtype`` hold (default :data:`SPARSE_CHUNK_BYTES`). Pure arithmetic; the public function calls
    it before any work.

    Raises:
        ValueError: a ``memory_budget`` that cannot hold one row, or with ``chunk_size`` a chunk of that many rows.
    """
    row = row_bytes(vocab, dtype, opts)
    rows = min(chunk_size, max(num_rows, 1)) if chunk_size is not None else 1
    if memory_budget is not None and memory_budget < rows * row:
        what = f"a chunk of {rows} rows (chunk_size)" if chunk_size is not None else "even one row"
        raise ValueError(f"memory_budget={memory_budget} bytes is too small for {what}: one row of V={vocab} "
                         f"classes needs {row} bytes of ({dtype}) temporaries")  # fmt: skip
    if chunk_size is not None:
        return chunk_size
    return max(1, (SPARSE_CHUNK_BYTES if memory_budget is None else memory_budget) // row)


def row_bytes(vocab: int, dtype: torch.dtype, opts: DistillRowOptions) -> int:
    """Bytes of (1, V) temporaries in ``dtype`` that one row of a chunk holds at its peak."""
    return vocab * dtype.itemsize * (ROW_BUFFERS + (SOFTCAP_ROW_BUFFERS if opts.softcap is not None else 0))


def sparse_divergence(logits: Tensor, ids: Tensor, teacher_log_probs: Tensor, opts: DistillRowOptions) -> Tensor:
    """Per-row divergence (rows,) of student ``logits`` (rows, V) against the teacher's ``ids`` (rows, K) and
    ``teacher_log_probs`` (rows, K), in the logits' dtype; differentiable in the logits."""
    s = _capped(logits, opts.softcap) / opts.temperature
    s_k = s.gather(-1, ids)
    lp = teacher_log_probs.to(s.dtype)
    if opts.tail:
        lse = torch.logsumexp(s, -1, keepdim=True)
        rest = torch.logsumexp(s.scatter(-1, ids, -math.inf), -1, keepdim=True)  # lse off the ids
        lq = torch.cat([s_k - lse, rest - lse], -1)
        p_tail = (-torch.expm1(torch.logsumexp(lp, -1, keepdim=True))).clamp_min(0.0)
        lp = torch.cat([lp, p_tail.log()], -1)
    else:
        lq, lp = torch.log_softmax(s_k, -1), torch.log_softmax(lp, -1)
    return _generalized_jsd(lq, lp, opts.beta)


def _capped(z: Tensor, softcap) -> Tensor:
    """``κ tanh(z / κ)`` (``softcap = κ``), or ``z`` without a softcap: before the temperature, as distill_rows."""
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def _generalized_jsd(lq: Tensor, lp: Tensor, beta: float) -> Tensor:
    """Σ over the last dim of the generalized JSD between ``exp(lp)`` (teacher) and ``exp(lq)`` (student), with
    ``0 · log 0 = 0``; the mixture's ``log m`` as in distill_rows (softplus form)."""
    lowest = torch.finfo(lq.dtype).min
    lq, lp = lq.clamp_min(lowest), lp.clamp_min(lowest)
    if beta == 0.0:
        return (lp.exp() * (lp - lq)).sum(-1)
    if beta == 1.0:
        return (lq.exp() * (lq - lp)).sum(-1)
    c_q, c_p = math.log1p(-beta), math.log(beta)
    d = lp - lq + (c_p - c_q)
    sp = torch.nn.functional.softplus(d)
    r_q, r_p = -c_q - sp, d - sp - c_p
    return beta * (lp.exp() * r_p).sum(-1) + (1.0 - beta) * (lq.exp() * r_q).sum(-1)
