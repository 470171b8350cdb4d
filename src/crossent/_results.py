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
        log_sum_sq_probs: ``log Σ_c p_c²`` per position (``input.shape[:-1]``), formed as ``lse(2x) − 2 lse(x)``; 0
            where every id of the position is ignored; None unless ``log_sum_sq_probs=True``.
        mean_logits: ``(1/C) Σ_c x_c`` per position, the mean of the logits after softcap and temperature (as TRL's
            ``mean_logits``); 0 where every id of the position is ignored; None unless ``mean_logits=True``.
        is_top1: bool, the index's shape: whether the id is the argmax of ``x`` — on ties the first (lowest) column,
            as ``torch.argmax``, so an id tied with an earlier column is not top-1; False where the id is ignored;
            None unless ``is_top1=True``.

    The floating fields are float32 for 16-bit and float32 input, float64 for float64. ``log_probs`` and
    ``entropy`` carry gradients; the other three never do.
    """

    log_probs: Tensor
    entropy: Optional[Tensor]
    log_sum_sq_probs: Optional[Tensor] = None
    mean_logits: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None


def token_result(outputs, batch_shape, single: bool, opts) -> TokenLogProbs:
    """:class:`TokenLogProbs` from the Function's six outputs ``(log_probs (…, K), entropy, lse, log_sum_sq_probs,
    mean_logits, is_top1 (…, K))`` (empty placeholders where ``opts``, the row options, did not ask)."""
    log_probs, entropy, _, sq, mean, top1 = outputs
    shape = tuple(batch_shape) if single else tuple(batch_shape) + log_probs.shape[-1:]

    def per_position(t, wanted):
        return t.reshape(batch_shape) if wanted else None

    return TokenLogProbs(log_probs.reshape(shape), per_position(entropy, opts.entropy),
                         per_position(sq, opts.log_sum_sq_probs), per_position(mean, opts.mean_logits),
                         top1.reshape(shape) if opts.is_top1 else None)  # fmt: skip
