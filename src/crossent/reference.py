"""The seed's math in numpy: the float64 oracle every other path is tested against.

Readable first, fast never. Everything here materializes the full (N, C) log-probabilities.
Derivations are in ``docs/math.md``; the notation below follows it.

For logits ``z`` (one row, C classes), ``m = max_c z_c``::

    lse(z)          = m + log Σ_c exp(z_c − m)
    log_softmax(z)  = z − lse(z)
    softmax(z)      = exp(z − lse(z))

Every option of the cross-entropy (class weights ``w``, label smoothing ``ε``, class-index or
class-probability targets) is one *weighted target vector* ``u`` per row:

    class index t:      u_c = w_t (1 − ε) [c = t] + ε w_c / C
    probabilities y:    u_c = w_c ((1 − ε) y_c + ε / C)

and then, with ``U = Σ_c u_c``, ``p = softmax(z)`` and the z-loss coefficient ``s``::

    loss = −Σ_c u_c log p_c + s · ω · lse²        (ω = w_t, or Σ_c w_c y_c for probabilities)
    ∂loss/∂z = U p − u + 2 s ω lse p

With ``softcap = κ`` the logits are first replaced by ``κ tanh(z / κ)`` and the gradient is
multiplied by ``1 − tanh²(z / κ)``.

Per-token log-probabilities and entropy (the RL / preference-training faces of ``CE = H(y) + KL(y ‖ ŷ)``), on
``x = κ tanh(z / κ) / T`` (temperature ``T``), ``p = softmax(x)``, ids ``t_k``::

    lp_k = log p_{t_k} = x_{t_k} − lse(x)                ∂lp_k/∂z_c = ([c = t_k] − p_c) · chain_c / T
    H    = −Σ_c p_c log p_c = lse(x) − Σ_c p_c x_c       ∂H/∂z_c = −p_c (log p_c + H) · chain_c / T

and three statistics without gradient (TRL's fused head reports them): ``log Σ_c p_c² = lse(2x) − 2 lse(x)``, the mean
logit ``(1/C) Σ_c x_c`` (of ``x``, after softcap and temperature) and whether ``t_k`` is the first argmax of ``x``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "logsumexp",
    "log_softmax",
    "softmax",
    "cross_entropy",
    "cross_entropy_grad",
    "entropy",
    "kl_divergence",
    "token_log_probs",
    "token_entropy",
    "token_log_probs_grad",
    "token_log_sum_sq_probs",
    "token_mean_logits",
    "token_is_top1",
    "generalized_jsd",
    "generalized_jsd_grad",
    "sparse_distill",
    "sparse_distill_grad",
]


def logsumexp(z, axis=-1):
    """``m + log Σ exp(z − m)`` along ``axis`` with ``m`` the maximum (no overflow for huge ``z``).

    A slice that is all ``−inf`` gives ``−inf``.

    >>> float(logsumexp(np.array([0.0, np.log(3.0)])))  # log(1 + 3)
    1.3862943611198906
    >>> float(logsumexp(np.array([1000.0, 1000.0])))  # 1000 + log 2, no overflow
    1000.6931471805599
    """
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # an all −inf slice: exp(−inf − 0) = 0, log 0 = −inf
    with np.errstate(divide="ignore"):
        out = m + np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis)


def log_softmax(z, axis=-1):
    """``z − lse(z)`` along ``axis``, formed as ``(z − m) − log Σ exp(z − m)``.

    That order keeps every digit: ``z − m`` is exact near the max, while ``z − lse`` would first round
    ``lse = m + log Σ`` at |m| (at |z| ~ 1e38 the ``log Σ`` would vanish altogether).

    >>> log_softmax(np.zeros(4)).round(6).tolist()  # uniform: log(1/4)
    [-1.386294, -1.386294, -1.386294, -1.386294]
    >>> bool(log_softmax(np.array([1e38, -1e38, 1e38]))[0] == -np.log(2))
    True
    """
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    shifted = z - m
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(z, axis=-1):
    """``exp(z − lse(z))`` along ``axis``; each slice sums to one.

    >>> softmax(np.array([0.0, np.log(3.0)])).round(6).tolist()
    [0.25, 0.75]
    """
    return np.exp(log_softmax(z, axis=axis))


def entropy(y, axis=-1):
    """Shannon entropy ``H(y) = −Σ_c y_c log y_c`` in nats, with ``0 log 0 = 0``.

    >>> float(entropy(np.array([0.5, 0.5])))  # log 2
    0.6931471805599453
    """
    y = np.asarray(y, dtype=np.float64)
    return -np.sum(_xlogy(y, y), axis=axis)


def kl_divergence(y, logits, axis=-1):
    """``KL(y ‖ softmax(logits)) = Σ_c y_c (log y_c − log_softmax(logits)_c)``, ``0 log 0 = 0``.

    With it, cross-entropy splits as ``CE(y, logits) = H(y) + KL(y ‖ ŷ)``.

    >>> float(kl_divergence(np.array([1.0, 0.0]), np.array([0.0, 0.0])))  # log 2
    0.6931471805599453
    """
    y = np.asarray(y, dtype=np.float64)
    lp = log_softmax(logits, axis=axis)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(y > 0, _xlogy(y, y) - y * lp, 0.0), axis=axis)


def _xlogy(x, y):
    """``x log y`` with ``0 log y = 0`` (also for ``y = 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x == 0, 0.0, x * np.log(np.where(x == 0, 1.0, y)))


def cross_entropy(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
):
    """Softmax cross-entropy with the options and semantics of ``torch.nn.functional.cross_entropy``.

    ``loss_i = −Σ_c u_ic log softmax(z_i)_c + s ω_i lse(z_i)²`` with ``u`` the weighted target
    vector of the module docstring. Reductions: ``"none"`` (per-position losses), ``"sum"``,
    ``"mean"`` (divided by ``Σ_i w_{t_i}`` over non-ignored positions for class indices — PyTorch's
    weighted mean — or by the number of positions for probabilities). A mean over zero total
    weight is 0 (PyTorch gives NaN).

    Args:
        logits: (C,), (N, C) or (N, C, d1, ..., dK); the class dimension is 1 (0 when unbatched).
        target: class indices (), (N) or (N, d1, ..., dK), integers in [0, C) or ``ignore_index``;
            or class probabilities with the shape of ``logits``.
        weight: optional (C,) class weights.
        ignore_index: class-index value whose positions contribute nothing.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        label_smoothing: ε in [0, 1]; mixes the target with the uniform distribution.
        z_loss: s ≥ 0; adds ``s · lse²`` per position, weighted like the log-likelihood term.
        softcap: κ > 0 or None; logits become ``κ tanh(z / κ)`` first.

    Returns:
        float64 array: () for ``"mean"``/``"sum"``, the target's batch shape for ``"none"``.

    >>> float(cross_entropy(np.array([[0.0, 0.0, 0.0, 0.0]]), np.array([2])))  # uniform: log 4
    1.3862943611198906
    """
    rows = _Rows(logits, target, weight, ignore_index, label_smoothing, softcap)
    lse = logsumexp(rows.z)
    with np.errstate(invalid="ignore"):  # u_c = 0 where z_c = −inf: the term is 0, not nan
        nll = -np.sum(np.where(rows.u != 0, rows.u * log_softmax(rows.z), 0.0), axis=1)
    loss = np.where(rows.valid, nll + z_loss * rows.omega * lse**2, 0.0)
    if reduction == "none":
        return loss.reshape(rows.batch_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / rows.denom if rows.denom != 0 else np.float64(0.0)


def cross_entropy_grad(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                       z_loss=0.0, softcap=None, grad_output=1.0):  # fmt: skip
    """∂J/∂logits of :func:`cross_entropy` times ``grad_output``; ``Ŷ − Y`` in the plain case.

    Per row, on the (soft-capped) logits ``z`` with ``p = softmax(z)``, ``U = Σ_c u_c``::

        ∂loss/∂z = (U + 2 s ω lse) p − u

    then times ``1 − tanh²(z_raw / κ)`` with a softcap, times ``grad_output`` (a scalar for
    ``"mean"``/``"sum"``, an array of the target's batch shape for ``"none"``), and divided by the
    mean's denominator. Ignored positions get a zero gradient.

    Returns:
        float64 array with the shape of ``logits``.

    >>> cross_entropy_grad(np.array([[0.0, 0.0]]), np.array([1])).tolist()  # p − onehot
    [[0.5, -0.5]]
    """
    rows = _Rows(logits, target, weight, ignore_index, label_smoothing, softcap)
    lse = logsumexp(rows.z)
    p = np.exp(log_softmax(rows.z))
    grad = (rows.u.sum(axis=1) + 2 * z_loss * rows.omega * lse)[:, None] * p - rows.u
    grad = np.where(rows.valid[:, None], grad, 0.0) * rows.chain
    scale = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), rows.batch_shape).reshape(-1)
    if reduction == "mean":
        scale = scale / rows.denom if rows.denom != 0 else np.zeros_like(scale)
    return rows.to_logits_layout(grad * scale[:, None])


class _Rows:
    """The inputs as rows: logits (R, C) after the softcap, u (R, C), ω (R,), the mean's denominator.

    Positions are flattened in the order of the target's batch shape (class axis moved last).
    """

    def __init__(self, logits, target, weight, ignore_index, label_smoothing, softcap):
        logits = np.asarray(logits, dtype=np.float64)
        target = np.asarray(target)
        self.unbatched = logits.ndim == 1
        if self.unbatched:
            logits, target = logits[None], target[None]
        self.logits_shape = logits.shape
        num_classes = logits.shape[1]
        z = np.moveaxis(logits, 1, -1).reshape(-1, num_classes)
        w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
        eps = float(label_smoothing)
        self.chain = np.ones_like(z)
        if softcap is not None:
            th = np.tanh(z / softcap)
            z, self.chain = softcap * th, 1.0 - th**2
        self.z = z
        if np.issubdtype(target.dtype, np.floating):  # class probabilities, shaped like logits
            self.batch_shape = target.shape[:1] + target.shape[2:]
            y = np.moveaxis(target.astype(np.float64), 1, -1).reshape(-1, num_classes)
            self.u = w * ((1 - eps) * y + eps / num_classes)
            self.omega = y @ w
            self.valid = np.ones(len(z), dtype=bool)
            self.denom = float(len(z))
        else:  # class indices
            self.batch_shape = target.shape
            t = target.reshape(-1).astype(np.int64)
            self.valid = t != ignore_index
            t_safe = np.where(self.valid, t, 0)
            onehot = np.zeros_like(z)
            onehot[np.arange(len(t_safe)), t_safe] = 1.0
            self.omega = np.where(self.valid, w[t_safe], 0.0)
            self.u = (1 - eps) * self.omega[:, None] * onehot + eps * w / num_classes
            self.denom = float(self.omega.sum())
        if self.unbatched:
            self.batch_shape = ()

    def to_logits_layout(self, rows):
        """(R, C) rows back to the caller's logits shape (class axis where it was)."""
        n, c, *rest = self.logits_shape
        out = np.moveaxis(rows.reshape(n, *rest, c), -1, 1)
        return out[0] if self.unbatched else out


def _scaled_logits(logits, temperature, softcap):
    """``(x, dx/dz)``: ``κ tanh(z / κ) / T`` (softcap first, then the temperature) and its elementwise derivative."""
    z = np.asarray(logits, dtype=np.float64)
    if softcap is None:
        return z / temperature, np.full_like(z, 1.0 / temperature)
    th = np.tanh(z / softcap)
    return softcap * th / temperature, (1.0 - th**2) / temperature


def _token_ids(logits, index, ignore_index):
    """(ids (..., K), valid (..., K), whether ``index`` had the K dim): ``index`` is ``logits.shape[:-1]`` or
    ``logits.shape[:-1] + (K,)``."""
    index = np.asarray(index, dtype=np.int64)
    single = index.shape == np.shape(logits)[:-1]
    ids = index[..., None] if single else index
    return ids, ids != ignore_index, single


def token_log_probs(logits, index, temperature=1.0, ignore_index=-100, softcap=None):
    """``log softmax(x)`` at the ids ``index``, with ``x = κ tanh(z / κ) / T``; 0 where the id is ignored.

    Args:
        logits: (..., C), class dim last.
        index: (...) one id per position, or (..., K) K ids per position; ints in [0, C) or ``ignore_index``.

    Returns:
        float64 array of ``index``'s shape.

    >>> token_log_probs(np.zeros((1, 4)), np.array([2])).round(6).tolist()  # uniform: log(1/4)
    [-1.386294]
    >>> round(float(token_log_probs(np.array([0.0, np.log(9.0)]), np.array(1), temperature=2.0)), 12)  # log ¾
    -0.287682072452
    """
    x, _ = _scaled_logits(logits, temperature, softcap)
    ids, valid, single = _token_ids(x, index, ignore_index)
    lp = np.take_along_axis(log_softmax(x), np.where(valid, ids, 0), axis=-1)
    out = np.where(valid, lp, 0.0)
    return out[..., 0] if single else out


def token_entropy(logits, index=None, temperature=1.0, ignore_index=-100, softcap=None):
    """``H(softmax(x)) = −Σ_c p_c log p_c`` per position (:func:`entropy` of the softmax), ``x = κ tanh(z / κ) / T``;
    0 where every id of the position's ``index`` is ignored (no ``index``: no position is).

    >>> float(token_entropy(np.zeros(4)))  # uniform over 4: log 4
    1.3862943611198906
    >>> float(token_entropy(np.array([0.0, np.log(3.0)])))  # −(¼ log ¼ + ¾ log ¾)
    0.5623351446188083
    """
    x, _ = _scaled_logits(logits, temperature, softcap)
    h = entropy(softmax(x))
    if index is None:
        return h
    _, valid, _ = _token_ids(x, index, ignore_index)
    return np.where(valid.any(-1), h, 0.0)


def token_log_probs_grad(logits, index, grad_log_probs=None, grad_entropy=None, temperature=1.0, ignore_index=-100,
                         softcap=None):  # fmt: skip
    """``Σ_k g_k ∂lp_k/∂z + g_H ∂H/∂z`` for upstream gradients ``g`` (``index``'s shape) and ``g_H`` (positions).

    Per position, on ``x`` with ``p = softmax(x)``::

        ∂lp_k/∂x_c = [c = t_k] − p_c,        ∂H/∂x_c = −p_c (log p_c + H)

    times ``dx/dz = (1 − tanh²(z / κ)) / T``. Ignored ids (and positions whose ids are all ignored, for
    ``H``) contribute nothing.

    >>> token_log_probs_grad(np.zeros((1, 2)), np.array([1]), np.ones(1)).tolist()  # onehot − p
    [[-0.5, 0.5]]
    """
    x, chain = _scaled_logits(logits, temperature, softcap)
    ids, valid, single = _token_ids(x, index, ignore_index)
    lp = log_softmax(x)
    p = np.exp(lp)
    grad = np.zeros_like(x)
    if grad_log_probs is not None:
        g = np.asarray(grad_log_probs, dtype=np.float64)
        g = np.where(valid, g[..., None] if single else g, 0.0)
        onehot = np.zeros(ids.shape + x.shape[-1:])
        np.put_along_axis(onehot, np.where(valid, ids, 0)[..., None], 1.0, axis=-1)
        grad += np.sum(g[..., None] * onehot, axis=-2) - g.sum(-1, keepdims=True) * p
    if grad_entropy is not None:
        g_h = np.where(valid.any(-1), np.asarray(grad_entropy, dtype=np.float64), 0.0)
        h = entropy(p)
        with np.errstate(invalid="ignore"):
            plogp = np.where(p > 0, p * lp, 0.0)
        grad += -g_h[..., None] * (plogp + p * h[..., None])
    return grad * chain


def _per_position(values, logits, index, ignore_index, fill):
    """``values`` per position, ``fill`` where every id of the position's ``index`` is ignored (no ``index``: none)."""
    if index is None:
        return values
    _, valid, _ = _token_ids(logits, index, ignore_index)
    return np.where(valid.any(-1), values, fill)


def token_log_sum_sq_probs(logits, index=None, temperature=1.0, ignore_index=-100, softcap=None):
    """``log Σ_c p_c²`` of ``p = softmax(x)`` per position, ``x = κ tanh(z / κ) / T``, formed as
    ``lse(2x) − 2 lse(x)`` (no underflow: ``Σ p² ≥ 1/C``); 0 where every id of the position is ignored.

    >>> round(float(token_log_sum_sq_probs(np.array([0.0, np.log(3.0)]))), 12)  # p = (¼, ¾): log ⅝
    -0.470003629246
    >>> round(float(token_log_sum_sq_probs(np.zeros(4))), 12)  # uniform over 4: log ¼
    -1.38629436112
    """
    x, _ = _scaled_logits(logits, temperature, softcap)
    return _per_position(logsumexp(2.0 * x) - 2.0 * logsumexp(x), x, index, ignore_index, 0.0)


def token_mean_logits(logits, index=None, temperature=1.0, ignore_index=-100, softcap=None):
    """``(1/C) Σ_c x_c`` per position, the mean of the logits the softmax sees, ``x = κ tanh(z / κ) / T`` (after the
    softcap and the temperature, as TRL's ``mean_logits``); 0 where every id of the position is ignored.

    >>> round(float(token_mean_logits(np.array([0.0, np.log(9.0)]), temperature=2.0)), 12)  # (0 + log 3) / 2
    0.549306144334
    """
    x, _ = _scaled_logits(logits, temperature, softcap)
    return _per_position(x.mean(-1), x, index, ignore_index, 0.0)


def token_is_top1(logits, index, temperature=1.0, ignore_index=-100, softcap=None):
    """Whether each id is the argmax of ``x = κ tanh(z / κ) / T``, ties going to the first (lowest) column, as
    ``argmax`` picks it (so an id tied with an earlier column is not top-1); False where the id is ignored.

    Returns:
        bool array of ``index``'s shape.

    >>> token_is_top1(np.array([[1.0, 3.0, 3.0]] * 3), np.array([1, 2, 0])).tolist()  # a tie: the first wins
    [True, False, False]
    """
    x, _ = _scaled_logits(logits, temperature, softcap)
    ids, valid, single = _token_ids(x, index, ignore_index)
    out = valid & (np.argmax(x, axis=-1)[..., None] == ids)
    return out[..., 0] if single else out


# --- distillation: the generalized Jensen-Shannon divergence between two softmaxes -------------------------


def _distill_rows(student_logits, teacher_logits, beta, temperature, teacher_is_log_probs):
    """Per position (class axis last): ``(log q, log p, divergence, ∂divergence/∂s)`` with ``s = z_s / T``."""
    lq = log_softmax(np.asarray(student_logits, dtype=np.float64) / temperature)
    t = np.asarray(teacher_logits, dtype=np.float64)
    lp = t if teacher_is_log_probs else log_softmax(t / temperature)
    q, p = np.exp(lq), np.exp(lp)
    with np.errstate(divide="ignore", invalid="ignore"):
        if beta == 0.0:  # KL(p ‖ q); ∂/∂s = q − p
            return lq, lp, np.sum(_xlogy(p, p) - np.where(p > 0, p * lq, 0.0), -1), q - p
        if beta == 1.0:  # KL(q ‖ p); ∂/∂s = q (log q − log p − KL)
            r = np.where(q > 0, lq - lp, 0.0)
            kl = np.sum(q * r, -1)
            return lq, lp, kl, q * (r - kl[..., None])
        lm = np.logaddexp(lq + np.log1p(-beta), lp + np.log(beta))  # log m, m = β p + (1 − β) q
        rq, rp = np.where(q > 0, lq - lm, 0.0), np.where(p > 0, lp - lm, 0.0)
        kq, kp = np.sum(q * rq, -1), np.sum(p * rp, -1)
        # ∂/∂s = (1 − β) q (log(q/m) − Σ q log(q/m)): the terms through ∂m/∂q cancel (docs/math.md)
        return lq, lp, beta * kp + (1.0 - beta) * kq, (1.0 - beta) * q * (rq - kq[..., None])


def _distill_mask_and_denominator(batch_shape, target, ignore_index):
    if target is None:
        return np.ones(batch_shape, dtype=bool), float(np.prod(batch_shape))
    valid = np.asarray(target) != ignore_index
    return valid, float(valid.sum())


def generalized_jsd(
    student_logits, teacher_logits, beta=0.0, temperature=1.0, target=None, ignore_index=-100, reduction="mean",
    teacher_is_log_probs=False, hard_weight=0.0,
):  # fmt: skip
    """The generalized Jensen-Shannon divergence of TRL's ``generalized_jsd_loss`` (class axis last).

    With ``q = softmax(z_s / T)``, ``p = softmax(z_t / T)`` (``p = exp(z_t)`` for ``teacher_is_log_probs``)::

        β = 0:       KL(p ‖ q) = Σ p (log p − log q)
        β = 1:       KL(q ‖ p)
        0 < β < 1:   β KL(p ‖ m) + (1 − β) KL(q ‖ m),   m = β p + (1 − β) q

    ``hard_weight = α`` gives ``(1 − α) · divergence + α · cross_entropy(z_s, target)`` (untempered logits).
    Positions whose target is ``ignore_index`` give 0; ``"mean"`` divides by the number of the others (all
    positions without a target; 0 when there are none).

    >>> round(float(generalized_jsd(np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]]))), 10)  # .25 log .5 + .75 log 1.5
    0.1308120359
    """
    lq, lp, div, _ = _distill_rows(student_logits, teacher_logits, beta, temperature, teacher_is_log_probs)
    loss = div
    if hard_weight:
        z = np.asarray(student_logits, dtype=np.float64)
        t = np.where(np.asarray(target) == ignore_index, 0, np.asarray(target))
        ce = logsumexp(z) - np.take_along_axis(z, t[..., None], -1)[..., 0]
        loss = (1.0 - hard_weight) * div + hard_weight * ce
    valid, denom = _distill_mask_and_denominator(loss.shape, target, ignore_index)
    loss = np.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    return float(loss.sum()) if reduction == "sum" else (float(loss.sum()) / denom if denom else 0.0)


def generalized_jsd_grad(
    student_logits, teacher_logits, beta=0.0, temperature=1.0, target=None, ignore_index=-100, reduction="mean",
    teacher_is_log_probs=False, hard_weight=0.0, grad_output=1.0,
):  # fmt: skip
    """The gradient of :func:`generalized_jsd` w.r.t. the student logits (the divergence's ``∂/∂s`` over T).

    >>> generalized_jsd_grad(np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]])).round(12).tolist()  # (q − p) / N
    [[0.25, -0.25]]
    """
    z = np.asarray(student_logits, dtype=np.float64)
    _, _, div, grad = _distill_rows(z, teacher_logits, beta, temperature, teacher_is_log_probs)
    grad = grad / temperature
    if hard_weight:
        t = np.where(np.asarray(target) == ignore_index, 0, np.asarray(target))
        onehot = np.zeros_like(z)
        np.put_along_axis(onehot, t[..., None], 1.0, -1)
        grad = (1.0 - hard_weight) * grad + hard_weight * (softmax(z) - onehot)
    valid, denom = _distill_mask_and_denominator(div.shape, target, ignore_index)
    g = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), div.shape) if reduction == "none" else (
        np.full(div.shape, float(grad_output) / (denom if reduction == "mean" and denom else 1.0)))  # fmt: skip
    if reduction == "mean" and not denom:
        g = np.zeros(div.shape)
    return np.where(valid[..., None], grad * g[..., None], 0.0)


def _sparse_outcomes(student_logits, teacher_ids, teacher_log_probs, temperature, tail):
    """(log q̂, log p̂) over the K teacher ids (+ the tail bucket), and q = softmax(z / T) over all V."""
    lq_full = log_softmax(np.asarray(student_logits, dtype=np.float64) / temperature)
    ids = np.asarray(teacher_ids)
    lp = np.asarray(teacher_log_probs, dtype=np.float64)
    lq = np.take_along_axis(lq_full, ids, -1)
    if tail:
        with np.errstate(divide="ignore"):
            lq_tail = np.log(np.maximum(1.0 - np.exp(lq).sum(-1), 0.0))
            lp_tail = np.log(np.maximum(-np.expm1(logsumexp(lp)), 0.0))
        return np.concatenate([lq, lq_tail[..., None]], -1), np.concatenate([lp, lp_tail[..., None]], -1), lq_full
    return log_softmax(lq), log_softmax(lp), lq_full


def sparse_distill(
    student_logits, teacher_ids, teacher_log_probs, beta=0.0, temperature=1.0, target=None, ignore_index=-100,
    reduction="mean", tail=True,
):  # fmt: skip
    """The divergence of :func:`generalized_jsd` against a top-K teacher, per position.

    ``q = softmax(z / T)`` over all V classes, ``p_k = exp(teacher_log_probs_k)`` at the K ``teacher_ids``.
    ``tail=True``: K + 1 outcomes, the K ids and one bucket ``p_tail = 1 − Σ p_k``, ``q_tail = 1 − Σ q_k``;
    ``tail=False``: both renormalized over the K ids. Reduction as :func:`generalized_jsd`.

    >>> z = np.log([[0.5, 0.25, 0.25]])  # q = (½, ¼, ¼); the teacher gives id 0 probability ¾
    >>> round(float(sparse_distill(z, [[0]], np.log([[0.75]]))), 10)  # ¾ log(¾ / ½) + ¼ log(¼ / ½)
    0.1308120359
    """
    lq, lp, _ = _sparse_outcomes(student_logits, teacher_ids, teacher_log_probs, temperature, tail)
    return generalized_jsd(lq, lp, beta=beta, target=target, ignore_index=ignore_index, reduction=reduction,
                           teacher_is_log_probs=True)  # fmt: skip


def sparse_distill_grad(
    student_logits, teacher_ids, teacher_log_probs, beta=0.0, temperature=1.0, target=None, ignore_index=-100,
    reduction="mean", tail=True, grad_output=1.0,
):  # fmt: skip
    """The gradient of :func:`sparse_distill` w.r.t. the student logits (V per position), by the chain rule of
    docs/math.md, "Sparse teacher": ``∂D/∂s_c = q_c (a_c − Σ_j q_j a_j)`` with ``a_c = ∂D/∂q̂_c − ∂D/∂q̂_tail``
    on the K ids and 0 elsewhere (``tail=False``: the K-way softmax's gradient, 0 off the ids).

    >>> z = np.log([[0.5, 0.25, 0.25]])
    >>> sparse_distill_grad(z, [[0]], np.log([[0.75]])).round(12).tolist()  # (q̂ − p̂) spread by q: (−¼, ⅛, ⅛)
    [[-0.25, 0.125, 0.125]]
    """
    lq, lp, lq_full = _sparse_outcomes(student_logits, teacher_ids, teacher_log_probs, temperature, tail)
    ids = np.asarray(teacher_ids)
    # ∂D/∂(log q̂) of the divergence over the outcomes: generalized_jsd_grad w.r.t. logits whose log-softmax is lq̂
    d_outcomes = generalized_jsd_grad(lq, lp, beta=beta, teacher_is_log_probs=True, reduction="sum")
    q_full, q_hat = np.exp(lq_full), np.exp(lq)
    with np.errstate(divide="ignore", invalid="ignore"):
        g_hat = np.where(q_hat > 0, d_outcomes / q_hat, 0.0)  # ∂D/∂q̂ up to a per-row constant
    if tail:
        a_k = g_hat[..., :-1] - g_hat[..., -1:]
        a = np.zeros_like(q_full)
        np.put_along_axis(a, ids, a_k, -1)
        grad = q_full * (a - np.sum(q_full * a, -1, keepdims=True))
    else:
        grad = np.zeros_like(q_full)
        np.put_along_axis(grad, ids, d_outcomes, -1)
    _, denom = _distill_mask_and_denominator(grad.shape[:-1], target, ignore_index)
    valid, _ = _distill_mask_and_denominator(grad.shape[:-1], target, ignore_index)
    scale = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), grad.shape[:-1]) if reduction == "none" else (
        np.full(grad.shape[:-1], float(grad_output) / (denom if reduction == "mean" and denom else 1.0)))  # fmt: skip
    return np.where(valid[..., None], grad * scale[..., None] / temperature, 0.0)
