"""The only communication of vocab-parallel losses: the cross-rank combine of per-row stats, and a sum.

Both take the process group by name (``VocabShard.group_name``; custom ops take strings, not objects) and
are no-ops for ``None`` (a single process). Per row, with this rank's shard stats ``(m_r, s_r, t_r, d_r)``::

    M = max_r m_r                                   one all-reduce MAX
    S, z_t, d = Σ_r (s_r exp(m_r − M), t_r, d_r)    one all-reduce SUM of the packed rows

``S`` is exact for any split: an all −inf shard row has ``m_r`` clamped to the lowest finite value and
``s_r = 0``, so it adds nothing. Volumes per call are in docs/distributed.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossent.kernels.distill_loop import DistillHooks
from crossent.kernels.logprob_rows import LogProbStats, LogProbStatsHook
from crossent.kernels.torch_rows import RowStats, StatsHook


def _group(group_name: str):
    import torch.distributed as dist  # imported only for vocab-parallel calls

    return dist, dist.distributed_c10d._resolve_process_group(group_name)


def _max_over_ranks(local_max: Tensor, dist, group) -> Tensor:
    """The row maxima over every rank (a new tensor: the local ones stay for the rescaling)."""
    row_max = local_max.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    return row_max


def _sum_over_ranks(tensor: Tensor, dist, group) -> Tensor:
    """``tensor`` summed over every rank, in place (one collective for all the packed sums)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def stats_hook(group_name: Optional[str]) -> Optional[StatsHook]:
    """The cross-rank combine of :class:`RowStats` over the named group, or None for one process."""
    if group_name is None:
        return None
    dist, group = _group(group_name)

    def combine(local: RowStats) -> RowStats:
        row_max = _max_over_ranks(local.max, dist, group)
        parts = [local.sumexp * torch.exp(local.max - row_max), local.target_logit]
        if local.dot is not None:
            parts.append(local.dot)
        packed = _sum_over_ranks(torch.stack(parts), dist, group)  # (2 or 3, ...)
        return RowStats(row_max, packed[0], packed[1], None if local.dot is None else packed[2])

    return combine


def logprob_stats_hook(group_name: Optional[str]) -> Optional[LogProbStatsHook]:
    """The cross-rank combine of :class:`LogProbStats` over the named group (None for one process): one
    all-reduce MAX of the row max (with ``is_top1``: packed with ``top`` and the K ``top_at``, ``top_before``), then
    one all-reduce SUM of ``[a s, a (d + (m − M) s), a² q, Σ x, x_t (K)]`` per row with ``a = exp(m − M)`` (the
    optional sums only when asked; ``logprob_rows.combine_stats``): O(N·(K + 2)) numbers, N·(3K + 6) with every
    statistic."""
    if group_name is None:
        return None
    dist, group = _group(group_name)

    def combine(local: LogProbStats) -> LogProbStats:
        k = local.target_logits.shape[-1]
        maxima = [local.max.unsqueeze(-1)]
        if local.top is not None:
            maxima += [local.top.unsqueeze(-1), local.top_at, local.top_before]
        maxima = _max_over_ranks(torch.cat(maxima, -1), dist, group)
        row_max = maxima[..., 0]
        scale = torch.exp(local.max - row_max)
        sums = {"sumexp": scale * local.sumexp}
        if local.plogp is not None:
            sums["plogp"] = scale * (local.plogp + (local.max - row_max) * local.sumexp)
        if local.sumsq is not None:
            sums["sumsq"] = scale * scale * local.sumsq
        if local.logit_sum is not None:
            sums["logit_sum"] = local.logit_sum
        packed = _sum_over_ranks(torch.cat([torch.stack(list(sums.values()), -1),
                                            local.target_logits.to(row_max.dtype)], -1), dist, group)  # fmt: skip
        totals = {name: packed[..., i] for i, name in enumerate(sums)}
        top = {}
        if local.top is not None:
            top = {"top": maxima[..., 1], "top_at": maxima[..., 2:2 + k], "top_before": maxima[..., 2 + k:]}
        return LogProbStats(row_max, target_logits=packed[..., len(sums):], plogp=totals.pop("plogp", None), **totals,
                            **top)  # fmt: skip

    return combine


def sum_over_ranks_(tensor: Optional[Tensor], group_name: Optional[str]) -> Optional[Tensor]:
    """Sum ``tensor`` over the named group's ranks, in place (each rank's share of dX); identity for None."""
    if tensor is None or group_name is None:
        return tensor
    return _sum_over_ranks(tensor, *_group(group_name))


def distill_hooks(group_name: Optional[str]):
    """Distillation's cross-rank combines over the named group (:class:`distill_loop.DistillHooks`; empty for
    one process): per block of rows, one all-reduce MAX of the k row maxima and one all-reduce SUM of the
    rescaled sums of exponentials with the hard loss's target logit — (2k + 1)·rows numbers — then one
    all-reduce SUM of the divergence's 1 or 2 row sums."""
    if group_name is None:
        return DistillHooks()
    dist, group = _group(group_name)

    def stats(local: RowStats) -> RowStats:
        row_max = _max_over_ranks(local.max, dist, group)
        packed = torch.cat([local.sumexp * torch.exp(local.max - row_max), local.target_logit.unsqueeze(0)])
        packed = _sum_over_ranks(packed, dist, group)
        return RowStats(row_max, packed[:-1], packed[-1], None)

    def sums(local: Tensor) -> Tensor:
        return _sum_over_ranks(local.contiguous(), dist, group)

    return DistillHooks(stats, sums)
