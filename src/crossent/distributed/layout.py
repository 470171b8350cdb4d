"""Vocab-parallel layout math, pure: which columns each rank holds. Needs no process group."""

from __future__ import annotations

from typing import List, Sequence, Tuple


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
