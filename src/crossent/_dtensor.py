"""DTensor operands at the public boundary of the fused functions: a head sharded over the vocabulary runs as
one vocab-parallel shard, a replicated head runs locally, and nothing else reaches the kernels.

Tensor parallelism (``ColwiseParallel`` on an LM head) leaves the head's weight and bias as DTensors placed
``Shard(0)`` on one mesh dim: each rank of that dim's process group holds a contiguous block of vocabulary rows,
which is exactly :mod:`crossent.distributed`'s vocab-parallel layout. :func:`local_operands` turns such operands
into local tensors plus the :class:`~crossent.kernels.shard.VocabShard` that names the group — the same shard the
``crossent.distributed`` functions pass — so the fused loops combine O(N) row statistics across the group and
neither the head nor the logits are gathered. Pure layout arithmetic and ``to_local()``: no communication here.

DTensor's ``Shard(0)`` splits C rows as ``torch.chunk`` does: blocks of ``c = ⌈C / n⌉`` rows, rank ``k`` of the
mesh dim holding ``[k c, min((k + 1) c, C))``. The widest block, ``c``, plans every rank's token blocks alike.
``to_local()`` is differentiable: each local gradient returns to the DTensor with the DTensor's own placements
(a shard's rows, or a replicated whole). This module never imports ``torch.distributed.tensor``: a tensor can be
a DTensor only once that module is loaded, so plain calls pay one dictionary look-up.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch

from crossent._checks import check_target_range
from crossent.kernels.shard import VocabShard


class LocalOperands(NamedTuple):
    """Plain tensors for the kernels, and where the head's rows sit: ``shard`` None for a whole head (plain or
    replicated); else this rank's rows of the vocabulary and their group, ``plan_vocab`` the widest rank's rows."""

    input: object
    weight: object
    bias: object
    target: object
    shard: Optional[VocabShard]
    plan_vocab: Optional[int]


def local_operands(input, weight, bias, target, weight_name: str = "linear_weight") -> LocalOperands:
    """``(input, weight, bias, target)`` as local tensors; the head's vocabulary shard when ``weight`` is a
    DTensor sharded over its rows. ``input`` and ``target`` may be DTensors placed ``Replicate()`` (the same
    on every rank); a plain ``input`` must be too when the head is sharded (tensor parallelism's contract).

    Raises:
        ValueError: a DTensor placed otherwise (named, with its placements): an input not replicated, a weight
            sharded other than over its rows on one mesh dim, a bias placed differently from its weight, a
            vocabulary too small to give every rank of the mesh dim a row.
    """
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not any(isinstance(t, module.DTensor) for t in (input, weight, bias, target)):
        return LocalOperands(input, weight, bias, target, None, None)
    input, target = _replicated(module, "input", input), _replicated(module, "target", target)
    if not isinstance(weight, module.DTensor):
        if isinstance(bias, module.DTensor):
            raise ValueError(f"linear_bias is a DTensor ({_describe(bias)}) but {weight_name} is not; shard both "
                             f"alike or neither")  # fmt: skip
        return LocalOperands(input, weight, bias, target, None, None)
    dims = [i for i, p in enumerate(weight.placements) if not p.is_replicate()]
    if bias is not None and (not isinstance(bias, module.DTensor) or bias.device_mesh != weight.device_mesh
                             or _row_placements(bias) != _row_placements(weight)):  # fmt: skip
        raise ValueError(f"linear_bias must be placed as {weight_name} is ({_describe(weight)}), got "
                         f"{_describe(bias) if isinstance(bias, module.DTensor) else 'a plain tensor'}")  # fmt: skip
    local_bias = None if bias is None else bias.to_local()
    if not dims:  # replicated: every rank holds the whole head
        return LocalOperands(input, weight.to_local(), local_bias, target, None, None)
    placement = weight.placements[dims[0]]
    if len(dims) > 1 or type(placement) is not module.Shard or placement.dim % weight.dim() != 0:
        raise ValueError(
            f"{weight_name} is a DTensor placed {_describe(weight)}: crossent takes a head replicated (Replicate()) "
            f"or sharded over its vocabulary rows on one mesh dim (Shard(0), as ColwiseParallel leaves it); "
            f"{', '.join(repr(weight.placements[i]) for i in dims)} is not such a placement"
        )  # fmt: skip
    mesh, dim = weight.device_mesh, dims[0]
    ranks, rank, vocab = mesh.size(dim), mesh.get_local_rank(dim), weight.shape[0]
    widest = -(-vocab // ranks)
    if (ranks - 1) * widest >= vocab:
        raise ValueError(f"{weight_name}'s {vocab} vocabulary rows sharded over {ranks} ranks leave a rank without "
                         f"rows (DTensor's Shard(0) takes blocks of {widest}); use fewer ranks or pad the vocabulary")  # fmt: skip
    local = weight.to_local()
    start = rank * widest
    if local.shape[0] != min(widest, vocab - start):  # a layout other than DTensor's even chunks
        raise ValueError(f"{weight_name}'s local shard has {local.shape[0]} rows on mesh rank {rank}, not DTensor's "
                         f"Shard(0) block of {min(widest, vocab - start)} rows of {vocab}")  # fmt: skip
    shard = VocabShard(start, vocab, mesh.get_group(dim).group_name)
    return LocalOperands(input, local, local_bias, target, shard, widest)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (loaded wherever one exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def check_shard_target(target, shard: VocabShard, ignore_index: int) -> None:
    """The class-range check the single-process CPU ops make, for a sharded head (whose ops leave it to the
    caller): the target is replicated, so every rank raises alike, before any collective."""
    if shard.group_name is not None and isinstance(target, torch.Tensor) and target.device.type == "cpu":
        check_target_range(target, shard.num_classes, ignore_index)


def _replicated(module, name: str, t):
    if not isinstance(t, module.DTensor):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"{name} is a DTensor placed {_describe(t)}; crossent needs it the same on every rank "
                         f"(Replicate()): redistribute it first (e.g. {name}.redistribute(placements=[Replicate()]))")  # fmt: skip
    return t.to_local()


def _row_placements(t):
    """A bias (V,) placed as its (V, D) weight: the same placement per mesh dim (Shard(0) for the rows)."""
    return tuple(p if p.is_replicate() else ("rows" if p.is_shard() and p.dim % t.dim() == 0 else p) for p in t.placements)


def _describe(t) -> str:
    names = t.device_mesh.mesh_dim_names
    where = f"mesh dims {names}" if names else f"a {t.device_mesh.ndim}-d mesh"
    return f"{tuple(t.placements)} on {where}"
