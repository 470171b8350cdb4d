"""The vocab-parallel agreement protocol: every rank checks its own call, then all ranks compare notes.

Bad input raises on *every* rank, never hangs: each rank checks its own arguments without communicating,
then all ranks exchange one int64 metadata row each in one small all-gather (which every call makes anyway
to learn the shard offsets and C); a rank's own error and every global inconsistency (shards that don't tile
[0, C), ranks disagreeing on shapes, dtypes or options, a target outside [0, C)) are then raised on all ranks
with the same message, before any row collective. The all-gather is one host sync per call on CUDA (the
offsets and C are needed on the host).
"""

from __future__ import annotations

import zlib
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from crossent.distributed.layout import check_vocab_layout, vocab_ranges

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
    for col, what in ((_OPTIONS, "options (every keyword option; whether weight or linear_bias is given; which "
                                 "of input, linear_weight, linear_bias require grad)"),
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


class Agreement(NamedTuple):
    """What the ranks agreed on: this rank's first column, the number of classes C, the widest shard."""

    vocab_start: int
    num_classes: int
    widest: int


def agree(fn: str, group, device, ignore_index, check_and_describe) -> Agreement:
    """Run this rank's checks, exchange metadata, raise on every rank if anything is wrong.

    ``check_and_describe()`` raises TypeError/ValueError for a bad local argument, else returns the
    keyword arguments of :func:`_local_meta`. Returns the :class:`Agreement` (the widest shard sizes a
    chunking that is the same on every rank).
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
    return Agreement(starts[dist.get_rank(group)], num_classes, max(r[_VSIZE] for r in table))


def check_vocab_start(vocab_start) -> None:
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0):
        raise ValueError(f"vocab_start must be None or an int >= 0, got {vocab_start!r}")


def device_of(x) -> torch.device:
    """Where this rank's metadata lives (a CUDA tensor for nccl): the main argument's device."""
    return x.device if isinstance(x, Tensor) else torch.device("cpu")
