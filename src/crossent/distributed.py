r"""Vocab-parallel cross-entropy over ``torch.distributed``: pure shard math plus thin communication.

Each rank of a process group holds a contiguous slice ``[v_r, v_r + V_r)`` of the ``C`` classes (the
slices may be unequal). Per position, rank ``r`` computes from its slice alone (the shard kernels of
:mod:`crossent.kernels.torch_rows`) ::

    m_r = max_c z_c,   s_r = Σ_c exp(z_c − m_r),   t_r = z_t if t ∈ slice else 0,   d_r = Σ_c w_c z_c

and the ranks combine them exactly as the single-process chunk combine does::

    M = max_r m_r                                  (all-reduce MAX)
    S, z_t, d = Σ_r (s_r exp(m_r − M), t_r, d_r)    (ONE all-reduce SUM of the packed rows)
    lse = M + log S

after which every rank holds the full per-position loss and LSE. The backward is local: each rank's
gradient columns are ``g · ∂loss/∂z_c`` from the global LSE (``shard_backward``), no communication.

Communication per step (N positions, b bytes per element of the compute dtype: 4 for 16/32-bit
logits, 8 for float64; P ranks):

    metadata   one all-gather of 10 int64 (checks + shard offsets): 80 bytes sent, 80·P received
    forward    N·b (max) + k·N·b (sum), k = 2, or 3 with label smoothing: 12·N to 16·N bytes in fp32
    backward   nothing (logits version); the fused linear version adds one all-reduce SUM of the
               input gradient, N·D elements in the input's dtype

versus N·V elements if the logits were gathered. These are the payloads each rank contributes; a ring
all-reduce sends and receives about 2(P − 1)/P times the payload per rank.

Bad input raises on *every* rank, never hangs: each rank checks its own arguments without
communicating, then all ranks exchange the metadata in one small all-gather (which every call makes
anyway to learn the shard offsets and C); a rank's own error and every global inconsistency (shards that
don't tile [0, C), ranks disagreeing on shapes, dtypes or options, a target outside [0, C)) are then
raised on all ranks with the same message, before any row collective. This all-gather is one host
sync per call on CUDA (the offsets and C are needed on the host).
"""

from __future__ import annotations

import zlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from crossent._checks import check_linear, check_logits, class_indices
from crossent._options import AccumulateDtype, CrossEntropyOptions, LinearCrossEntropyOptions, Reduction
from crossent._vocab_parallel_autograd import (
    Combine,
    Shard,
    VocabParallelLinearFused,
    VocabParallelLinearRecompute,
    VocabParallelRows,
)
from crossent._reduction import reduce_rows, reduction_row_scale
from crossent.kernels import linear_chunks
from crossent.kernels.linear_chunks import plan_chunks
from crossent.kernels.torch_rows import RowStats, compute_dtype

__all__ = [
    "vocab_ranges",
    "check_vocab_layout",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "all_reduce_stats",
    "all_reduce_sum",
]


# --- pure shard math ----------------------------------------------------------------------------------


def vocab_ranges(local_sizes: Sequence[int]) -> List[Tuple[int, int]]:
    """The contiguous ``[start, stop)`` column range of each rank, in rank order.

    ``start_r = Σ_{k<r} V_k``, ``stop_r = start_r + V_r``; the ranges tile ``[0, Σ_k V_k)``.

    Args:
        local_sizes: ``V_r`` per rank, each an int ≥ 1.

    Returns:
        One ``(start, stop)`` tuple per rank.

    Example:
        >>> vocab_ranges([3, 5, 2])
        [(0, 3), (3, 8), (8, 10)]
    """
    ranges, start = [], 0
    for rank, size in enumerate(local_sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"vocabulary shard of rank {rank} must have an int size >= 1, got {size!r}")
        ranges.append((start, start + size))
        start += size
    return ranges


def check_vocab_layout(starts: Sequence[int], sizes: Sequence[int]) -> int:
    """Check that the ranks' shards ``[starts[r], starts[r] + sizes[r])`` tile ``[0, C)``; return C.

    The shards need not be in rank order, but they must not overlap or leave a gap.

    Example:
        >>> check_vocab_layout([4, 0], [6, 4])
        10
        >>> check_vocab_layout([0, 5], [4, 6])
        Traceback (most recent call last):
        ...
        ValueError: vocabulary shards must tile [0, C) without gaps or overlaps: rank 0 covers [0, 4) and rank 1 starts at 5 (gap)
    """
    if len(starts) != len(sizes):
        raise ValueError(f"got {len(starts)} shard starts for {len(sizes)} shard sizes")
    vocab_ranges(sizes)  # sizes are ints >= 1
    order = sorted(range(len(starts)), key=lambda r: starts[r])
    expected, prev = 0, None
    for r in order:
        if starts[r] != expected:
            where = "starts at" if prev is not None else "is the lowest shard and starts at"
            covered = f"rank {prev} covers [{starts[prev]}, {expected}) and " if prev is not None else ""
            kind = "gap" if starts[r] > expected else "overlap"
            raise ValueError(
                f"vocabulary shards must tile [0, C) without gaps or overlaps: {covered}rank {r} {where} "
                f"{starts[r]} ({kind})"
            )
        expected, prev = starts[r] + sizes[r], r
    return expected


# --- metadata exchange and checks -------------------------------------------------------------------
# One int64 row per rank; every rank checks the same table, so every rank raises the same error.
_ERROR, _VSIZE, _VSTART, _ROWS, _SHAPES, _DTYPES, _OPTIONS, _WSIZE, _TMIN, _TMAX = range(10)
_META_LEN = 10


def _fingerprint(value) -> int:
    """A hash that is equal across processes (``hash(str)`` is salted per process; crc32 is not)."""
    return zlib.crc32(repr(value).encode())


def _local_meta(vocab_size, vocab_start, rows, shapes, dtypes, options, weight, target, ignore_index, device):
    """This rank's metadata row; the target's min/max over non-ignored positions stay on the device."""
    head = [0, vocab_size, -1 if vocab_start is None else vocab_start, rows, _fingerprint(shapes),
            _fingerprint(dtypes), _fingerprint(options), -1 if weight is None else weight.numel()]  # fmt: skip
    valid = target != ignore_index
    t = torch.where(valid, target.to(torch.int64), 0)  # 0 is always a valid class: it can't raise
    extremes = torch.stack([t.min(), t.max()]) if t.numel() else torch.zeros(2, dtype=torch.int64, device=device)
    return torch.cat([torch.tensor(head, dtype=torch.int64, device=device), extremes.to(device)])


def _error_row(device) -> Tensor:
    row = torch.zeros(_META_LEN, dtype=torch.int64, device=device)
    row[_ERROR] = 1
    return row


def _exchange(row: Tensor, group) -> List[List[int]]:
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows).tolist()


def _raise_everywhere(fn: str, local_error: Optional[Exception], table, group):
    """Every rank raises the same exception when any rank's own checks failed (a second, rare collective).

    The type is the failing ranks' common type (TypeError, ValueError, RuntimeError), else ValueError.
    """
    if not any(r[_ERROR] for r in table):
        return
    mine = None if local_error is None else (type(local_error).__name__, str(local_error))
    errors = [None] * len(table)
    dist.all_gather_object(errors, mine, group=group)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    kinds = {kind for _, (kind, _msg) in bad}
    cls = {"TypeError": TypeError, "RuntimeError": RuntimeError}.get(kinds.pop(), ValueError) if len(kinds) == 1 else ValueError
    raise cls(f"{fn}: " + "; ".join(f"bad input on rank {r}: {msg}" for r, (_kind, msg) in bad)) from local_error


def _global_error(table, ignore_index: int) -> Tuple[Optional[str], Optional[List[int]], int]:
    """(message or None, shard starts, C) from the gathered table. Pure: the same on every rank."""
    for col, what in ((_OPTIONS, "options (reduction, ignore_index, label_smoothing, z_loss, softcap; whether "
                                 "weight or linear_bias is given; which of input, linear_weight, linear_bias "
                                 "require grad; chunk_size, memory_budget, accumulate_dtype)"),
                      (_DTYPES, "dtypes"), (_SHAPES, "shapes (other than the vocabulary dim)"),
                      (_ROWS, "number of positions")):  # fmt: skip
        if len({r[col] for r in table}) > 1:
            return f"all ranks must pass the same {what}; ranks differ", None, 0
    sizes = [r[_VSIZE] for r in table]
    given = [r[_VSTART] >= 0 for r in table]
    if any(given) and not all(given):
        none_ranks = [i for i, g in enumerate(given) if not g]
        return f"vocab_start must be given on every rank or on none; it is None on rank(s) {none_ranks}", None, 0
    try:
        starts = [r[_VSTART] for r in table] if all(given) else [a for a, _ in vocab_ranges(sizes)]
        num_classes = check_vocab_layout(starts, sizes)
    except ValueError as e:
        return f"{e} (shard sizes {sizes})", None, 0
    for rank, r in enumerate(table):
        if r[_WSIZE] >= 0 and r[_WSIZE] != num_classes:
            return (f"weight must be the full ({num_classes},) class-weight vector on every rank; rank {rank} "
                    f"has {r[_WSIZE]} elements"), None, 0  # fmt: skip
    for rank, r in enumerate(table):
        for value in (r[_TMIN], r[_TMAX]):
            if not 0 <= value < num_classes:
                return (f"target contains class index {value} (rank {rank}), outside the global vocabulary "
                        f"[0, {num_classes}) and not ignore_index={ignore_index}"), None, 0  # fmt: skip
    return None, starts, num_classes


def _agree(fn: str, group, device, ignore_index, check_and_describe) -> Tuple[int, int, int]:
    """Run this rank's checks, exchange metadata, raise on every rank if anything is wrong.

    ``check_and_describe()`` raises TypeError/ValueError for a bad local argument, else returns the
    keyword arguments of :func:`_local_meta`. Returns this rank's ``vocab_start``, ``C`` and the
    largest shard size (for a chunking that is the same on every rank).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn} needs an initialized torch.distributed process group (init_process_group)")
    error = None
    try:
        row = _local_meta(**check_and_describe(), ignore_index=ignore_index, device=device)
    except Exception as e:  # noqa: BLE001 - any local failure must reach the other ranks, or they would hang
        error, row = e, _error_row(device)
    table = _exchange(row, group)
    _raise_everywhere(fn, error, table, group)
    message, starts, num_classes = _global_error(table, ignore_index)
    if message is not None:
        raise ValueError(f"{fn}: {message}")
    return starts[dist.get_rank(group)], num_classes, max(r[_VSIZE] for r in table)


def _check_index_target(target, batch_shape, device) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer global class indices, got dtype {target.dtype}")
    if target.shape != batch_shape:
        raise ValueError(
            f"target of shape {tuple(target.shape)} must have the logits' shape without the vocabulary dim, "
            f"{tuple(batch_shape)}"
        )
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits are on {device}")


def _check_vocab_start(vocab_start) -> None:
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0):
        raise ValueError(f"vocab_start must be None or an int >= 0, got {vocab_start!r}")


def _check_full_weight(weight, device) -> None:
    """Floating 1-D on the logits' device; its length (C) is checked against the gathered shard sizes."""
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
    if weight.dim() != 1:
        raise ValueError(f"weight must be a (C,) class-weight vector, got shape {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but the logits are on {device}")


def _device_of(x) -> torch.device:
    """Where this rank's metadata lives (a CUDA tensor for nccl): the main argument's device."""
    return x.device if isinstance(x, Tensor) else torch.device("cpu")


def _option_key(opts: CrossEntropyOptions, weight) -> tuple:
    return (opts.reduction, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap, weight is None)


# --- communication ---------------------------------------------------------------------------------


def all_reduce_stats(group=None) -> Combine:
    """The cross-rank combine of per-row shard stats: max all-reduce, then one packed sum all-reduce.

    ``S = Σ_r s_r exp(m_r − M)`` is exact for any split; an all −inf shard row has ``m_r`` clamped to the
    lowest finite value and ``s_r = 0``, so it adds nothing. The returned callable takes and returns
    :class:`~crossent.kernels.torch_rows.RowStats` (this rank's, then the global ones).
    """

    def combine(local: RowStats) -> RowStats:
        row_max = local.max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        parts = [local.sumexp * torch.exp(local.max - row_max), local.target_logit]
        if local.dot is not None:
            parts.append(local.dot)
        packed = torch.stack(parts)  # (2 or 3, ...): one collective for all the sums
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        return RowStats(row_max, packed[0], packed[1], None if local.dot is None else packed[2])

    return combine


# --- public API ------------------------------------------------------------------------------------


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> Tensor:
    r"""Cross-entropy of logits whose vocabulary is split over the ranks of ``group``.

    Equals :func:`crossent.cross_entropy` of the concatenated logits (class dim last), class-index
    targets, with every option; every rank returns the full loss, and each rank's logits receive their
    own columns of the gradient. Per position with ``lse = log Σ_c exp(z_c)`` over all C classes::

        loss = w_t (1 − ε)(lse − z_t) + (ε / C) Σ_c w_c (lse − z_c) + s w_t lse²

    (``C`` the global vocabulary size; ``softcap = κ`` first maps ``z ← κ tanh(z / κ)``). ``"mean"``
    divides by ``Σ w_t`` over non-ignored positions; a mean over zero weight is 0.

    Communication: one all-gather of 10 int64 per rank (checks, offsets), one all-reduce MAX of N
    elements and one all-reduce SUM of 2N (3N with label smoothing) elements of the compute dtype
    (fp32, or fp64 for fp64 logits); none in backward. See ``docs/distributed.md``.

    Args:
        logits: this rank's slice ``(..., V_local)``, any floating dtype; ranks may have unequal V_local.
        target: ``(...)`` integer GLOBAL class ids in [0, C) or ``ignore_index``; the same on every rank.
        group: the process group over which the vocabulary is split (default: the world).
        vocab_start: this rank's first global class. None: the slices lie in rank order and the offsets
            come from all ranks' V_local. Given: on every rank, the slices must tile [0, C).
        weight: optional FULL ``(C,)`` class weights, the same on every rank (no gradient).
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in :func:`crossent.cross_entropy`.

    Returns:
        Tensor: ``()`` for ``"mean"``/``"sum"``, the target's shape for ``"none"``; fp32 (fp64 for
        fp64 logits); identical on every rank.

    Raises:
        ValueError/TypeError on every rank (never a hang) for: a bad argument on any rank, shards that
        don't tile [0, C), ranks disagreeing on shapes/dtype/options, a target outside [0, C).
        RuntimeError: torch.distributed is not initialized.

    Example (on each of two ranks, rank r holding classes [3r, 3r + 3) of 6)::

        >>> logits = full_logits[:, 3 * rank : 3 * rank + 3].requires_grad_()  # doctest: +SKIP
        >>> loss = vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1)  # doctest: +SKIP
        >>> loss.backward()  # logits.grad: this rank's columns of the full gradient  # doctest: +SKIP
    """
    fn = "vocab_parallel_cross_entropy"
    opts_box = []

    def check_and_describe():
        opts_box.append(CrossEntropyOptions(ignore_index=ignore_index, reduction=reduction,
                                            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap))  # fmt: skip
        check_logits("logits", logits)
        _check_index_target(target, logits.shape[:-1], logits.device)
        _check_vocab_start(vocab_start)
        _check_full_weight(weight, logits.device)
        return dict(vocab_size=logits.shape[-1], vocab_start=vocab_start, rows=target.numel(),
                    shapes=tuple(logits.shape[:-1]), dtypes=(str(logits.dtype), str(target.dtype)),
                    options=_option_key(opts_box[0], weight), weight=weight, target=target)  # fmt: skip

    start, num_classes, _ = _agree(fn, group, _device_of(logits), ignore_index, check_and_describe)
    opts = opts_box[0]
    shard = Shard(start, logits.shape[-1], num_classes)
    target = class_indices(target)
    loss = VocabParallelRows.apply(logits, target, weight, shard, opts, all_reduce_stats(group))
    return reduce_rows(loss, target, weight, "index", opts)


def all_reduce_sum(group=None):
    """The input-gradient hook of the fused linear version: sums each rank's share of dX, in place."""

    def reduce(grad: Tensor) -> Tensor:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
        return grad

    return reduce


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    accumulate_dtype: AccumulateDtype = "float32",
) -> Tensor:
    r"""Fused ``cross_entropy(input @ Wᵀ + b, target)`` with the vocabulary rows of W split over the ranks.

    Equals single-process :func:`crossent.linear_cross_entropy` with the full head (``W_full`` stacking
    every rank's ``linear_weight`` in vocabulary order), i.e. ``crossent.cross_entropy(F.linear(input,
    W_full, b_full), target, ...)``, class dim last. It runs the same chunk loops
    (:mod:`crossent.kernels.linear_chunks`) on each rank's rows, with the cross-rank all-reduces as their
    per-block stats hook: the N × V_local logits are never held. The token blocks are planned from the
    widest shard, so every rank makes the same number of combines. With ``"mean"``/``"sum"`` the
    gradients are formed during forward (3 products per block, 6·N·D·V_local FLOPs per rank) and scaled
    in backward; with ``"none"`` backward recomputes the logits (4 products).

    Gradients: ``input`` gets the FULL gradient on every rank (each rank's share ``G_r W_r`` summed by
    one all-reduce); ``linear_weight`` and ``linear_bias`` get this rank's rows, no communication.

    Communication per step: the metadata all-gather; per token block one all-reduce MAX and one SUM of
    the block's rows — N + 2N (3N with label smoothing) elements of the stats dtype (fp32; fp64 for fp64
    input) in all; in backward N·D elements of the input's dtype (when ``input`` requires grad) —
    against N·V for gathering the logits. See ``docs/distributed.md``.

    Args:
        input: ``(..., D)`` floating, the same on every rank (replicated hidden states).
        linear_weight: this rank's ``(V_local, D)`` rows of the output projection, input's dtype/device.
        target: ``(...)`` integer global class ids (``input.shape[:-1]``), the same on every rank.
        linear_bias: this rank's ``(V_local,)`` bias, or None (None on every rank, or on none).
        group, vocab_start, weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`vocab_parallel_cross_entropy`.
        chunk_size, memory_budget, accumulate_dtype: as in :func:`crossent.linear_cross_entropy`; the
            same on every rank (the budget is applied to the widest shard).

    Returns:
        Tensor: ``()`` for ``"mean"``/``"sum"``, ``input.shape[:-1]`` for ``"none"``; fp32 (fp64 for
        fp64 input); identical on every rank. Every rank must call backward (it holds a collective).

    Raises:
        ValueError/TypeError on every rank as :func:`vocab_parallel_cross_entropy`, also for a D that
        differs between input and linear_weight, a bias of the wrong size, bad chunk_size/memory_budget,
        ranks that disagree on which tensors require grad.

    Example (on each of two ranks, rank r holding rows [3r, 3r + 3) of a 6-row head)::

        >>> w_local = head.weight[3 * rank : 3 * rank + 3].detach().requires_grad_()  # doctest: +SKIP
        >>> loss = vocab_parallel_linear_cross_entropy(hidden, w_local, target)  # doctest: +SKIP
        >>> loss.backward()  # hidden.grad full on every rank; w_local.grad this rank's rows  # doctest: +SKIP
    """
    fn = "vocab_parallel_linear_cross_entropy"
    opts_box = []

    def check_and_describe():
        loss_opts = CrossEntropyOptions(ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)  # fmt: skip
        opts_box.append(LinearCrossEntropyOptions(loss=loss_opts, chunk_size=chunk_size, memory_budget=memory_budget,
                                                  accumulate_dtype=accumulate_dtype))  # fmt: skip
        check_logits("input", input)
        check_linear(input, linear_weight, target, linear_bias)  # the single-process checks, as they are
        _check_vocab_start(vocab_start)
        _check_full_weight(weight, input.device)
        # what needs a gradient decides the collectives (per-block combines, dX's all-reduce): all ranks alike
        needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad
                      for t in (input, linear_weight, linear_bias))  # fmt: skip
        opts_box.append(needs)
        return dict(vocab_size=linear_weight.shape[0], vocab_start=vocab_start, rows=target.numel(),
                    shapes=tuple(input.shape), dtypes=(str(input.dtype), str(target.dtype)),
                    options=(_option_key(loss_opts, weight), linear_bias is None, needs, chunk_size, memory_budget,
                             accumulate_dtype),
                    weight=weight, target=target)  # fmt: skip

    start, num_classes, widest = _agree(fn, group, _device_of(input), ignore_index, check_and_describe)
    opts, needs = opts_box
    o = opts.loss
    x = input.reshape(-1, input.shape[-1])
    t = class_indices(target.reshape(-1))
    shard = Shard(start, linear_weight.shape[0], num_classes)
    # planned from the widest shard and the shared N, D, dtype: the same token blocks on every rank
    plan = plan_chunks(x.shape[0], x.shape[1], widest, x.dtype, x.device, opts.chunk_size, opts.memory_budget)
    loss_opts = linear_chunks.LossOptions(o.ignore_index, o.label_smoothing, o.z_loss, o.softcap)
    combine, reduce_dx = all_reduce_stats(group), all_reduce_sum(group)
    if o.reduction == "none":
        loss = VocabParallelLinearRecompute.apply(
            x, linear_weight, linear_bias, t, weight, shard, loss_opts, plan, opts.accumulate_dtype, combine, reduce_dx
        )
        return loss.reshape(target.shape)
    row_scale = reduction_row_scale(t, weight, o, compute_dtype(x.dtype))
    return VocabParallelLinearFused.apply(
        x, linear_weight, linear_bias, t, weight, row_scale, shard, loss_opts, plan, opts.accumulate_dtype, needs,
        combine, reduce_dx,
    )
