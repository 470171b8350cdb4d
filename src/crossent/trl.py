"""crossent for TRL: every TRL trainer's fused LM head on crossent's per-token log-probabilities.

TRL (≥ 1.14) gives every trainer a fused LM head: ``trl.trainer.utils.add_fused_lm_head(model, outputs=...)``
makes ``model(..., labels=..., fused_lm_head=True)`` run the backbone and then, per call,
``trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
final_logit_softcapping, logit_scale, outputs)`` (a module global, looked up on each call; the public class is
``trl.kernels.ChunkedLogProbFunction``). :func:`patch` replaces that global with :class:`CrossentLogProbFunction`:
the same signature and outputs, computed by :func:`crossent.linear_token_log_probs` (or, on CPU where TRL itself
forms the whole logits, :func:`crossent.token_log_probs` on them). What stays TRL's: the model's backbone, the label shift and
mask, the FSDP2 head gather (``weight.full_tensor()``), the ZeRO-3 gather around the call, the loss.

Per token ``i`` with target ``t_i``, ``x = κ tanh(s (h_i Wᵀ + b) / κ) / T`` (``s = logit_scale``, the cap only
when ``final_logit_softcapping`` κ is given, ``T = temperature``) and ``p = softmax(x)`` over the V columns::

    log_probs = x_t − log Σ_v exp(x_v)        entropy = −Σ_v p_v log p_v        log_sum_sq_probs = log Σ_v p_v²
    mean_logits = Σ_v x_v / V                 is_top1 = (t is the first argmax of x)

each computed only when named in ``outputs`` (``log_probs`` always); gradients flow from ``log_probs`` and
``entropy``, the other three carry none — TRL's contract.

Verified, not assumed: :func:`patch` first runs TRL's own function and crossent's on a small random probe (every
output, options on: bias, temperature, softcap, logit scale, both gradients) and refuses, leaving TRL untouched,
when they differ beyond fp32 rounding, or when the installed TRL lacks the hook. See ``docs/trl.md``.

Importing :mod:`crossent` never imports TRL; this module needs it (``pip install "crossent[trl]"``).
"""

from __future__ import annotations

import importlib.metadata
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from trl.trainer import utils as _trl_utils
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError('crossent.trl needs the trl package: pip install "crossent[trl]"') from error

from crossent.functional import logit_scaled
from crossent.functional_log_probs import linear_token_log_probs, token_log_probs

__all__ = ["patch", "unpatch", "is_patched", "CrossentLogProbFunction", "UnsupportedTRLError", "OUTPUTS"]

# the per-token outputs, in the order TRL's function returns them; the last four are optional
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_EXTRAS = OUTPUTS[2:]  # crossent.linear_token_log_probs' flags of the same names; no gradient
_HOOK = "_ChunkedLogProbFunction"  # the name trl.trainer.utils.add_fused_lm_head's forward looks up on each call
_IGNORE_INDEX = -100  # TRL's "no label"; its callers clamp or drop such positions before the call

# TRL's token tile (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE in 1.14-1.16): with N <= this and V <= chunk_size,
# TRL's function forms the whole (N, V) logits in one tile
_TRL_TOKEN_TILE = 4096

# the probe: (tokens, hidden, vocab); TRL's vocabulary chunk below V (its fold crosses tiles; crossent's fused
# route) and above it (one tile; crossent's kept-logits route on CPU)
_PROBE_SHAPE = (24, 16, 50)
_PROBE_CHUNKS = (16, 64)
_PROBE_OPTIONS = {"temperature": 0.7, "final_logit_softcapping": 4.0, "logit_scale": 1.25}
# fp32 rounding: each value is a sum over V (or D) terms of size ~1, so a few hundred ulps of 1
_PROBE_TOLERANCE = 256 * torch.finfo(torch.float32).eps


class UnsupportedTRLError(RuntimeError):
    """The installed TRL cannot be patched: its fused head lacks the hook, or crossent's function does not
    reproduce TRL's on the probe (the message says which, and the TRL version). TRL is left untouched."""


class CrossentLogProbFunction(torch.autograd.Function):
    """TRL's ``ChunkedLogProbFunction`` computed by crossent's per-token family: same arguments, same
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` (None where not in ``outputs``).

    ``hidden (N, D)``, ``weight (V, D)``, ``bias (V,)`` or None, ``targets (N,)`` in [0, V) (−100: log-prob 0, no
    gradient — crossent's ignore; TRL's callers never pass it). The product runs in the autocast dtype under
    autocast, else in ``hidden``'s dtype (TRL's compute dtype); outputs float32 (``is_top1`` bool); gradients for
    ``hidden``, ``weight`` and ``bias`` in their own dtypes, from ``log_probs`` and ``entropy`` only.

    Two routes, one contract: where TRL's own function forms the whole (N, V) logits in one tile (N ≤ 4096 and
    V ≤ ``chunk_size``) on CPU, crossent keeps them for the backward — :func:`crossent.token_log_probs` on
    ``X Wᵀ``, 3 products; otherwise :func:`crossent.linear_token_log_probs` recomputes them block by block, 4
    products, its own blocks under its memory budget (``chunk_size`` only picks the route).

    The forward records crossent's graph on detached aliases of the operands; where that graph saves the head, it
    saves the parameter itself (a saved-tensor hook), and the aliases drop their data, so nothing holds a
    ZeRO-3-gathered head between forward and backward. The backward runs the graph inside TRL's
    ``maybe_gather_lm_head_ctx(weight, bias)``, which gathers the head again, as TRL's own backward does.

    Example:
        >>> import torch
        >>> from crossent.trl import CrossentLogProbFunction
        >>> h, w = torch.zeros(3, 4, requires_grad=True), torch.randn(5, 4)
        >>> lp, ent, _, mean, top1 = CrossentLogProbFunction.apply(h, w, None, torch.tensor([0, 1, 2]), 1.0, 4096,
        ...                                                        None, 1.0, ("entropy", "mean_logits", "is_top1"))
        >>> lp, ent  # zero hidden: uniform over 5 tokens, log ⅕ and log 5
        (tensor([-1.6094, -1.6094, -1.6094], grad_fn=<CrossentLogProbFunctionBackward>), tensor([1.6094, 1.6094, 1.6094], grad_fn=<CrossentLogProbFunctionBackward>))
        >>> mean, top1  # every logit 0; a tie with an earlier token is not top-1 (TRL's argmax rule)
        (tensor([0., 0., 0.]), tensor([ True, False, False]))
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                chunk_size: int, final_logit_softcapping: Optional[float] = None, logit_scale: float = 1.0,
                outputs: tuple = OUTPUTS):  # fmt: skip
        unknown = sorted(set(outputs) - set(OUTPUTS))
        if unknown:
            raise ValueError(f"outputs must name per-token outputs among {OUTPUTS}, got {unknown}")
        ctx.set_materialize_grads(False)
        # crossent's graph on aliases of the operands, run again by backward (see the class docstring)
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in
                  zip((hidden, weight, bias), ctx.needs_input_grad[:3])]  # fmt: skip
        heads = {id(t): p for t, p in zip(leaves[1:], (weight, bias)) if t is not None}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: heads.get(id(t), t), _same):
            result = _crossent_call(*leaves, targets, temperature, chunk_size, final_logit_softcapping, logit_scale,
                                    outputs)  # fmt: skip
        for leaf in leaves[1:]:  # the head's aliases: only gradient targets now (their saved uses unpack the head)
            if leaf is not None:
                leaf.data = leaf.new_empty(0)
        ctx.graph = (leaves, result.log_probs, result.entropy)
        ctx.save_for_backward(weight, bias)
        values = [getattr(result, name, None) for name in OUTPUTS]
        values = [None if v is None else v.detach() if v.dtype == torch.bool else v.detach().float() for v in values]
        ctx.mark_non_differentiable(*(v for v in values[2:] if v is not None))
        return tuple(values)

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_no_gradient):
        leaves, log_probs, entropy = ctx.graph
        weight, bias = ctx.saved_tensors
        pairs = [(v, g) for v, g in ((log_probs, grad_log_probs), (entropy, grad_entropy)) if g is not None]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = {}
        if pairs and wanted:
            with _trl_utils.maybe_gather_lm_head_ctx(weight, bias):
                found = torch.autograd.grad([v for v, _ in pairs], wanted, [g.to(v.dtype) for v, g in pairs],
                                            allow_unused=True)  # fmt: skip
            grads = {id(t): g for t, g in zip(wanted, found)}
        ctx.graph = None
        return (*(None if t is None else grads.get(id(t)) for t in leaves), None, None, None, None, None, None)


def _same(t):
    return t


def _crossent_call(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale,
                   outputs):  # fmt: skip
    """TRL's call in crossent's terms: the product in TRL's compute dtype, the logit scale folded into the operands,
    TRL's reading of ``final_logit_softcapping`` (None: no cap; 0: a cap of 1, as its kernels read ``κ or 1``)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        hidden, bias = logit_scaled(hidden, bias, None if logit_scale == 1.0 else float(logit_scale))
        options = dict(temperature=float(temperature), ignore_index=_IGNORE_INDEX, entropy="entropy" in outputs,
                       softcap=None if final_logit_softcapping is None else float(final_logit_softcapping or 1.0),
                       **{name: True for name in _EXTRAS if name in outputs})  # fmt: skip
        if _keeps_logits(hidden, weight, chunk_size):
            return token_log_probs(F.linear(hidden, weight, bias), targets, **options)
        return linear_token_log_probs(hidden, weight, targets, linear_bias=bias, **options)


def _keeps_logits(hidden: Tensor, weight: Tensor, chunk_size: int) -> bool:
    """Whether to keep the (N, V) logits for the backward (crossent's plain per-token family on ``X Wᵀ``: 3 products,
    the logits and their gradient in memory) rather than recompute them (the fused family: 4 products, blocks).

    Kept on CPU when TRL's own function forms the whole logits in one tile (N ≤ its token tile, V ≤ ``chunk_size``):
    there its torch fold makes several temporaries of that size in the backward, so crossent's two stay below
    TRL's peak. On GPUs TRL's Triton fold works in place on one tile; there crossent stays fused."""
    return hidden.device.type == "cpu" and hidden.shape[0] <= _TRL_TOKEN_TILE and weight.shape[0] <= chunk_size


# ---------------------------------------------------------------------------------------------- patch


def patch() -> None:
    """Make every TRL trainer's fused LM head run on crossent (process-wide, until :func:`unpatch`).

    Replaces ``trl.trainer.utils._ChunkedLogProbFunction`` with :class:`CrossentLogProbFunction`, after checking
    on a probe that both give the same outputs and gradients (see the module docstring). Patching twice is a
    no-op. Models that already have a fused head need nothing more: the head looks the function up on each call.

    Raises:
        UnsupportedTRLError: the installed TRL has no ``trl.trainer.utils._ChunkedLogProbFunction`` or no
            ``add_fused_lm_head`` (the message names the TRL version and what is missing), or crossent's
            function differs from TRL's on the probe (the output, the worst difference, the tolerance).

    Example:
        >>> import crossent.trl
        >>> crossent.trl.patch(); crossent.trl.is_patched()
        True
        >>> crossent.trl.unpatch(); crossent.trl.is_patched()
        False
    """
    if is_patched():
        return
    original = _trl_hook()
    _verify(original)
    _trl_utils._crossent_original = original
    setattr(_trl_utils, _HOOK, CrossentLogProbFunction)


def unpatch() -> None:
    """Give TRL its own fused-head function back; a no-op when not patched."""
    if is_patched():
        setattr(_trl_utils, _HOOK, _trl_utils.__dict__.pop("_crossent_original"))


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return getattr(_trl_utils, _HOOK, None) is CrossentLogProbFunction


def _trl_hook():
    missing = [name for name in (_HOOK, "add_fused_lm_head", "maybe_gather_lm_head_ctx") if not hasattr(_trl_utils, name)]
    original = getattr(_trl_utils, _HOOK, None)
    if not missing and not callable(getattr(original, "apply", None)):
        missing = [f"{_HOOK}.apply"]
    if missing:
        raise UnsupportedTRLError(
            f"trl {_trl_version()} has no trl.trainer.utils.{', '.join(missing)}: crossent.trl replaces the function "
            f"TRL's fused LM head calls (trl.trainer.utils.{_HOOK}, TRL >= 1.14). TRL is left untouched."
        )  # fmt: skip
    return original


def _trl_version() -> str:
    try:
        return importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - an uninstalled source tree
        return "(unknown version)"


def _verify(original) -> None:
    """Run TRL's function and crossent's on the probe; raise :class:`UnsupportedTRLError` where they differ."""
    for chunk in _PROBE_CHUNKS:
        _compare(chunk, _probe_run(original, chunk), _probe_run(CrossentLogProbFunction, chunk))


def _compare(chunk: int, theirs: dict, ours: dict) -> None:
    for name in theirs:
        stock, mine = theirs[name], ours[name]
        if (stock is None) != (mine is None) or (stock is not None and stock.shape != mine.shape):
            _refuse(chunk, name, f"TRL gives {_describe(stock)}, crossent {_describe(mine)}")
        if stock is None:
            continue
        stock, mine = stock.double(), mine.double()
        diff = (stock - mine).abs()
        tolerance = _PROBE_TOLERANCE * (1.0 + stock.abs().max().item())
        worst = diff.max().item()
        if not worst <= tolerance:  # NaN fails too
            index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
            _refuse(chunk, name, f"max |difference| {worst:.3g} at {index} (TRL {stock[index].item():.6g}, crossent "
                          f"{mine[index].item():.6g}), tolerance {tolerance:.3g}")  # fmt: skip


def _refuse(chunk: int, name: str, detail: str):
    raise UnsupportedTRLError(
        f"crossent's fused-head function does not reproduce trl {_trl_version()}'s {_HOOK} on the probe "
        f"(N, D, V) = {_PROBE_SHAPE} with bias, chunk_size={chunk} and {_PROBE_OPTIONS}: {name}: {detail}. "
        f"TRL is left untouched."
    )  # fmt: skip


def _describe(t) -> str:
    return "None" if t is None else f"shape {tuple(t.shape)}"


def _probe_run(function, chunk: int) -> dict:
    """Every output and the gradients of ``Σ g₁ log_probs + Σ g₂ entropy`` for the hidden states, head and bias."""
    n, d, v = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(*shape, generator=gen).requires_grad_() for shape in ((n, d), (v, d), (v,)))
    targets = torch.randint(0, v, (n,), generator=gen)
    g_lp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    opts = _PROBE_OPTIONS
    with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False):
        out = function.apply(hidden, weight, bias, targets, opts["temperature"], chunk,
                             opts["final_logit_softcapping"], opts["logit_scale"], OUTPUTS)  # fmt: skip
        grads = torch.autograd.grad((out[0] * g_lp).sum() + (out[1] * g_ent).sum(), (hidden, weight, bias))
    found = {name: None if value is None else value.detach() for name, value in zip(OUTPUTS, out)}
    found.update(zip(("d hidden", "d weight", "d bias"), grads))
    return found
