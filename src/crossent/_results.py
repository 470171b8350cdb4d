"""What the loss functions return: the reduced loss, or with ``return_stats=True`` a :class:`CrossEntropyStats`;
and what the per-token log-probability functions return: :class:`TokenLogProbs`."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from crossent._options import LossOptions
from crossent._precision import compute_dtype
from crossent._reduction import index_row_weight, reduce_rows


class CrossEntropyStats(NamedTuple):
    """A loss with the statistics users log, from the same pass (``return_stats=True``).

    Attributes:
        loss: the loss exactly as without ``return_stats``.
        lse: the per-position log-sum-exp of the (soft-capped) logits, ignored positions included, with the
            batch shape (the input's shape without the class dim); float32 (float64 for float64 input); no
            gradient.
        z_loss: the z-loss part of ``loss``, ``z_loss · ω · lse²`` per position (``ω = w_t``, 0 where ignored;
            ``Σ_c w_c y_c`` for probabilities), reduced as ``loss`` is; zero when ``z_loss=0``; no gradient.
    """

    loss: Tensor
    lse: Tensor
    z_loss: Tensor


def loss_result(
    loss: Tensor,
    lse: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    kind: str,
    opts: LossOptions,
    input_dtype: torch.dtype,
):
    """``loss``, or :class:`CrossEntropyStats` of it when ``opts.return_stats``. ``lse`` is the float64 per-row
    log-sum-exp with the batch shape, ``target`` the class indices or probabilities (class dim last)."""
    if not opts.return_stats:
        return loss
    lse = lse.detach()
    if opts.row.z_loss == 0.0:
        z_part = torch.zeros_like(loss).detach()
    else:
        z_rows = (opts.row.z_loss * _z_loss_weight(target, class_weight, kind, opts, lse) * lse * lse).to(loss.dtype)
        z_part = reduce_rows(z_rows, target, class_weight, kind, opts)
    return CrossEntropyStats(loss, lse.to(compute_dtype(input_dtype)), z_part)


def _z_loss_weight(target, class_weight, kind, opts, like):
    """ω per position: ``w_t`` (0 where ignored) for class indices, ``Σ_c w_c y_c`` for probabilities."""
    if kind == "index":
        return index_row_weight(target, class_weight, opts.row.ignore_index, like.dtype)
    y = target.detach().to(like.dtype)
    return y.sum(-1) if class_weight is None else y @ class_weight.detach().to(like.dtype)


class TokenLogProbs(NamedTuple):
    """What :func:`crossent.token_log_probs` and its fused and vocab-parallel forms return.

    Attributes:
        log_probs: ``log softmax(x)`` at the given ids, ``x = κ tanh(z / κ) / T``: the index's shape (one id per
            position: ``input.shape[:-1]``; K ids: ``input.shape[:-1] + (K,)``); 0 where the id is ignored.
        entropy: ``H = −Σ_c p_c log p_c`` of ``p = softmax(x)`` per position (``input.shape[:-1]``), 0 where every
            id of the position is ignored; None unless ``entropy=True``.

    Both float32 for 16-bit and float32 input, float64 for float64, and both carry gradients.
    """

    log_probs: Tensor
    entropy: Optional[Tensor]


def token_result(log_probs: Tensor, entropy: Tensor, batch_shape, single: bool, with_entropy: bool) -> TokenLogProbs:
    """:class:`TokenLogProbs` from the Function's (…, K) log-probs and its entropy output (empty without entropy)."""
    shape = tuple(batch_shape) if single else tuple(batch_shape) + log_probs.shape[-1:]
    return TokenLogProbs(log_probs.reshape(shape), entropy.reshape(batch_shape) if with_entropy else None)
