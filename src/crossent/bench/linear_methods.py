"""The methods ``crossent bench --op linear`` compares, and the inputs they all get.

  floor           the products crossent's block plan runs (logits, dX, dW per block) and nothing else
  torch           F.cross_entropy(x @ W.T, t): the (N, V) logits, their softmax and gradient in memory (the baseline)
  torch_chunked   F.linear_cross_entropy (torch >= 2.13), PyTorch's own chunked fused loss
  cce             cut_cross_entropy.linear_cross_entropy(..., impl="torch_compile"), when installed
  crossent        crossent.linear_cross_entropy(x, W, t)
Every loss is ``reduction="mean"`` with ``ignore_index=-100``; each call is one forward+backward.
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

import crossent
from crossent.bench.measure import DTYPES

METHODS = ("floor", "torch", "torch_chunked", "cce", "crossent")
BASELINE = "torch"
IGNORE_INDEX = -100


def available(method: str) -> bool:
    """Whether ``method`` can run here (``cce`` needs cut_cross_entropy, ``torch_chunked`` torch >= 2.13).

    >>> available("crossent"), available("no such method")
    (True, False)
    """
    if method == "cce":
        return importlib.util.find_spec("cut_cross_entropy") is not None
    if method == "torch_chunked":
        return hasattr(torch.nn, "LinearCrossEntropyOptions")
    return method in METHODS


def make_inputs(shape: Tuple[int, int, int], dtype: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded hidden states x (N, D) and weight W (V, D) (scaled so logits are O(1)), both requiring grad."""
    n, d, v = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(DTYPES[dtype]).requires_grad_(True)
    w = (torch.randn(v, d, generator=gen) / d**0.5).to(DTYPES[dtype]).requires_grad_(True)
    return x, w


def make_target(n: int, v: int, ignored: float) -> torch.Tensor:
    """Seeded class indices in [0, V), exactly ``round(ignored · N)`` of them set to -100.

    >>> (make_target(10, 7, 0.5) == -100).sum().item()
    5
    """
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.randperm(n, generator=gen)[: round(ignored * n)]] = IGNORE_INDEX
    return t


def run_step(method: str, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> Optional[torch.Tensor]:
    """One forward+backward of ``method`` (gradients in ``x.grad``, ``w.grad``); the loss, None for the floor."""
    x.grad = w.grad = None
    if method == "floor":
        _floor(x.detach(), w.detach())
        return None
    if method == "torch":
        loss = F.cross_entropy(x @ w.T, t, ignore_index=IGNORE_INDEX)
    elif method == "torch_chunked":
        loss = F.linear_cross_entropy(x, w, t, ignore_index=IGNORE_INDEX, options=torch.nn.LinearCrossEntropyOptions())
    elif method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        loss = linear_cross_entropy(x, w, t, ignore_index=IGNORE_INDEX, impl="torch_compile")
    elif method == "crossent":
        loss = crossent.linear_cross_entropy(x, w, t, ignore_index=IGNORE_INDEX)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    loss.backward()
    return loss


def _floor(x: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The products of crossent's plan: per block of rows, logits, dX rows and the dW sum; no loss at all.
    The plan is crossent's own (an internal, ``crossent.kernels.linear_plan``)."""
    from crossent.kernels.linear_plan import plan_chunks

    n, d = x.shape
    plan = plan_chunks(n, d, w.shape[0], x.dtype, x.device)
    buf = torch.empty(plan.rows, w.shape[0], dtype=x.dtype)
    dx = torch.empty_like(x)
    dw = torch.empty_like(w)
    for r0 in range(0, n, plan.rows):
        r1 = min(r0 + plan.rows, n)
        z = buf[: r1 - r0]
        torch.mm(x[r0:r1], w.T, out=z)
        torch.mm(z, w, out=dx[r0:r1])
        if r0 == 0:  # the first block writes dW, as crossent does (no zero fill)
            torch.mm(z.T, x[r0:r1], out=dw)
        else:
            dw.addmm_(z.T, x[r0:r1])
    return dx, dw
