"""Row kernels in Triton: the GPU path, and the same kernels on CPU tensors under ``TRITON_INTERPRET=1``.

Fused: softcap, online max/sum-exp, target gather, class weights, smoothing, z-loss; and for linear CE loss + grad.
Never materialized: log-probabilities, softmax, or any fp32 copy of the logits; a row streams through registers.
Written in place: ``out`` of ``backward`` (may alias the logits), the linear-CE block (each block read, then written).

Three kernels share two row loops (``_row_loss``, ``_row_grad``): the forward, the backward, and
linear_cross_entropy's chunk step (both loops on one row, in place). ``forward`` and ``backward`` have
exactly the signatures and semantics of :mod:`crossent.kernels.torch_rows` (the oracle for this file):
per-position fp32 loss and fp64 LSE; :func:`chunk_loss_and_grad_` is the step behind
:mod:`crossent.kernels.triton_linear`. Formulas, with ``x`` the
(soft-capped) logits of one row, ``lse = m + log Σ_c exp(x_c − m)``, ``p_c = exp(x_c − lse)``, ``g`` the
upstream gradient of the row (derivations: docs/math.md, "Every option as one weighted target vector")::

    class index t (ω = w_t, 0 when t = ignore_index):
        loss = ω ((1 − ε)(lse − x_t) + s lse²) + (ε / C)(W lse − Σ_c w_c x_c),   W = Σ_c w_c
        ∂loss/∂x_c = (ω (1 − ε + 2 s lse) + ε W / C) p_c − ω (1 − ε) [c = t] − ε w_c / C
    probabilities y (u_c = w_c ((1 − ε) y_c + ε / C), U = Σ_c u_c, ω = Σ_c w_c y_c):
        loss = U lse − Σ_c u_c x_c + s ω lse²
        ∂loss/∂x_c = (U + 2 s ω lse) p_c − u_c

With a softcap κ the gradient is further multiplied by ``1 − tanh²(z / κ)``. Ignored rows give loss 0 and
gradient 0; a class index outside [0, C) (possible only on CUDA, where the public layer does not sync the
host to check) is clamped for the memory access and gives a NaN loss and NaN gradient row.

What runs where:
- class-index and probability targets: both kernels (a ``PROBS`` constexpr picks the target branch);
- float64 logits: :mod:`torch_rows` (the kernels compute in fp32; fp64 is the oracle's precision and is
  not a GPU training dtype worth a kernel variant);
- the forward of a vocabulary shard (vocab-parallel CE, whose row statistics need the other ranks):
  :mod:`torch_rows`; a shard's backward runs here (it needs only the full rows' LSE);
- the gradient w.r.t. probability targets (``ce_target_grad``): :mod:`torch_rows`, via the custom op.

Whether the kernels are compiled (CUDA tensors) or interpreted (CPU tensors, ``TRITON_INTERPRET=1``) is
Triton's choice, made once per process when ``triton.language`` is imported: set the variable before that.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from crossent._options import RowOptions
from crossent.kernels import torch_rows
from crossent.kernels.shard import VocabShard

try:  # Triton is optional (GPU extra); without it this module imports but cannot launch.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None


# --- launch table ------------------------------------------------------------------------------------
# All three kernels run one program per row and stream the row in BLOCK-column steps through the same
# two loops, so one table serves them (the chunk step's blocks are float32: the 4-byte entry).
# bytes per logit -> (largest BLOCK, num_warps at that BLOCK). BLOCK = min(next_pow2(C), largest). At the
# largest BLOCK the table's warps are used as they are; below it (short rows) warps shrink so that each
# thread keeps 16 logits (num_warps = BLOCK / (32 · 16), at least 1).
# Where the numbers come from: no GPU was lent while this file was written, so these are starting values
# from the sizing rule for memory-bound row kernels, not measurements: 16 KiB of logits in flight per
# program per step (fp32: 4096 × 4 B; 16-bit: 8192 × 2 B), i.e. 16 logits per thread = 4 (fp32) or 2
# (16-bit) 16-byte loads and ~16 fp32 registers of row data per thread. Compiled (tests/test_triton_compile.py,
# every launch for sm_80/90/100; docs/benchmarks.md has the table), plain rows take 32 (forward) / 30–46 (backward)
# registers per thread, several programs per SM; the heaviest, the fp32 forward with probability targets, 140 on
# sm_90/100: one 8-warp program per SM (the first to time with --sweep); none spill.
# Re-measure with `python benchmarks/gpu.py --sweep` on the target GPU and record the device here.
ROW_LAUNCH = {
    2: (8192, 16),  # bfloat16 / float16
    4: (4096, 8),  # float32
}
_LOGITS_PER_THREAD = 16
# Compile options shared by both kernels: FMA contraction on (fewer roundings in a·p + b; also Triton's
# default, stated so that Triton 3.9's "default will change" warning does not apply).
_COMPILE = {"enable_fp_fusion": True}
# float32's lowest finite value, where running maxima start and log-probabilities are clamped. A constexpr: a kernel
# may read a module global only if it is one (a plain float compiles to "NameError: Cannot access global variable",
# though the interpreter accepts it; tests/test_triton_compile.py compiles every launch to catch such differences).
_FLT_LOWEST = tl.constexpr(-3.4028234663852886e38) if tl is not None else None


class Launch(NamedTuple):
    block: int
    num_warps: int


def row_launch(dtype: torch.dtype, num_classes: int) -> Launch:
    """The (BLOCK, num_warps) of the row kernels for logits of ``dtype`` with ``num_classes`` columns."""
    largest, warps = ROW_LAUNCH[dtype.itemsize]
    block = min(_next_pow2(num_classes), largest)
    if block < largest:
        warps = max(1, min(warps, block // (32 * _LOGITS_PER_THREAD)))
    return Launch(block, warps)


# --- public entry points (same contract as torch_rows) -------------------------------------------------


def forward(logits: Tensor, target: Tensor, class_weight, opts: RowOptions, shard=None, combine=None):
    """Per-position loss (fp32) and log-sum-exp (fp64), both ``logits.shape[:-1]`` (contract of
    :func:`torch_rows.forward`; fp64 logits and vocabulary shards run there)."""
    if _use_torch(logits, shard) or combine is not None:
        return torch_rows.forward(logits, target, class_weight, opts, shard, combine)
    weight, ignore_index, label_smoothing, z_loss, softcap = class_weight, *_row_args(opts)
    shape, num_classes = logits.shape[:-1], logits.shape[-1]
    z, t, probs = _rows(logits, target)
    rows = z.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=z.device)
    lse = torch.empty(rows, dtype=torch.float64, device=z.device)  # see _store_lse
    if rows:
        w, _ = _class_weights(weight, z, 0.0)
        block, warps = row_launch(z.dtype, num_classes)
        _row_forward_kernel[(rows,)](
            z, z.stride(0), t, t.stride(0), w, loss, lse,
            num_classes, ignore_index, label_smoothing, z_loss, softcap or 1.0,
            PROBS=probs, HAS_WEIGHT=weight is not None, SMOOTH=label_smoothing > 0, SOFTCAP=softcap is not None,
            BLOCK=block, num_warps=warps, **_COMPILE,
        )  # fmt: skip
    return loss.reshape(shape), lse.reshape(shape)


def backward(logits: Tensor, target: Tensor, class_weight, lse, grad_loss, opts: RowOptions, out: Tensor, shard=None):
    """Write ``grad_loss[i] · ∂loss_i/∂logits_i`` into ``out`` (contract of :func:`torch_rows.backward`; a
    vocabulary shard runs here too: its gradient columns need only the full rows' ``lse``)."""
    if _use_torch(logits):
        torch_rows.backward(logits, target, class_weight, lse, grad_loss, opts, out, shard)
        return
    shard = VocabShard.whole(logits.shape[-1]) if shard is None else shard
    weight, ignore_index, label_smoothing, z_loss, softcap = class_weight, *_row_args(opts)
    num_classes = logits.shape[-1]
    z, t, probs = _rows(logits, target)
    rows = z.shape[0]
    if not rows:
        return
    dst = _unit_stride_view(out, rows, num_classes)
    direct = dst is not None
    if not direct:  # ``out`` has strides that don't flatten to rows: write a buffer, copy once
        dst = torch.empty((rows, num_classes), dtype=out.dtype, device=out.device)
    lse = lse.to(torch.float64).reshape(rows)  # fp32 LSEs (a caller's own) are upcast exactly
    g = grad_loss.to(torch.float32).expand(logits.shape[:-1]).reshape(rows)  # stride 0 for a scalar
    w, wsum = _class_weights(weight, z, label_smoothing)
    block, warps = row_launch(z.dtype, num_classes)
    _row_backward_kernel[(rows,)](
        z, z.stride(0), t, t.stride(0), w, wsum, lse, lse.stride(0), g, g.stride(0), dst, dst.stride(0),
        num_classes, ignore_index, label_smoothing, z_loss, softcap or 1.0, shard.vocab_start, shard.num_classes,
        PROBS=probs, HAS_WEIGHT=weight is not None, SMOOTH=label_smoothing > 0, SOFTCAP=softcap is not None,
        BLOCK=block, num_warps=warps, **_COMPILE,
    )  # fmt: skip
    if not direct:
        out.copy_(dst.view(out.shape))


def chunk_loss_and_grad_(logits: Tensor, target: Tensor, class_weight, grad_scale, opts: RowOptions):
    """linear_cross_entropy's fused chunk step on a block of whole rows of the head: one kernel per block.

    Per row, one pass computes the loss and LSE (as :func:`forward`); with ``grad_scale`` a second pass,
    in the same program, writes the finished gradient ``grad_scale_i · ∂loss_i/∂z_i`` (the formula of
    :func:`backward`) over the row, from the unrounded running max and log-sum. The logits are read
    once for the LSE and once more for the gradient; nothing else is written.

    Args:
        logits: (rows, C) float32 block with unit column stride, the caller's own scratch: overwritten with
            the gradient when ``grad_scale`` is given, left as it is otherwise.
        target: (rows,) class indices in [0, C) or ``ignore_index`` (others give NaN rows, as in forward).
        class_weight: None or (C,) class weights.
        grad_scale: None (loss only), or the upstream gradient per row, (rows,) (stride 0 allowed).

    Returns:
        (loss, lse): (rows,) float32 and float64.
    """
    weight, ignore_index, label_smoothing, z_loss, softcap = class_weight, *_row_args(opts)
    rows, num_classes = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float64, device=logits.device)
    if rows == 0:
        return loss, lse
    g = logits if grad_scale is None else grad_scale.to(torch.float32).expand(rows)
    w, wsum = _class_weights(weight, logits, label_smoothing)
    block, warps = row_launch(logits.dtype, num_classes)
    _chunk_step_kernel[(rows,)](
        logits, logits.stride(0), target, w, wsum, loss, lse, g, 0 if grad_scale is None else g.stride(0),
        num_classes, ignore_index, label_smoothing, z_loss, softcap or 1.0,
        HAS_WEIGHT=weight is not None, SMOOTH=label_smoothing > 0, SOFTCAP=softcap is not None,
        HAS_GRAD=grad_scale is not None, BLOCK=block, num_warps=warps, **_COMPILE,
    )  # fmt: skip
    return loss, lse


# --- host-side layout ------------------------------------------------------------------------------------


def _use_torch(logits: Tensor, shard: Optional[VocabShard] = None) -> bool:
    """fp64 logits, rows without classes and vocabulary shards go to torch_rows (see the module docstring)."""
    whole = shard is None or shard.is_whole(logits.shape[-1])
    return logits.dtype == torch.float64 or logits.shape[-1] == 0 or not whole


def _row_args(opts: RowOptions):
    """The row options as the kernels take them: scalars, in the kernels' argument order."""
    return opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap


def _rows(logits: Tensor, target: Tensor):
    """Logits as (R, C) with unit column stride (a view when one exists, else one copy); the target as
    (R,) class indices or (R, C) probabilities, the same way; and whether the targets are probabilities."""
    num_classes = logits.shape[-1]
    z = _unit_columns(logits.reshape(-1, num_classes))
    probs = target.is_floating_point()
    t = _unit_columns(target.reshape(-1, num_classes)) if probs else target.reshape(-1)
    return z, t, probs


def _unit_columns(x: Tensor) -> Tensor:
    """``x`` (R, C) itself when its columns are adjacent in memory, else a contiguous copy (coalesced loads
    on the GPU are worth one copy; a strided class dim comes from (N, C, d1, ...) inputs)."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _unit_stride_view(out: Tensor, rows: int, num_classes: int) -> Optional[Tensor]:
    """``out`` viewed as (R, C) with unit column stride, or None where no such view exists."""
    try:
        view = out.view(rows, num_classes)
    except RuntimeError:
        return None
    return view if num_classes <= 1 or view.stride(1) == 1 else None


def _class_weights(weight: Optional[Tensor], like: Tensor, label_smoothing: float):
    """(w, W): the weights in fp32, contiguous, and (when smoothing needs it in backward) their sum W as a
    1-element device tensor (no host sync); ``like`` stands in as an unread pointer where absent."""
    if weight is None:
        return like, like
    w = weight.to(torch.float32).contiguous()
    return w, (w.sum().reshape(1) if label_smoothing > 0 else w)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --- kernels ------------------------------------------------------------------------------------------------
# Every value is computed in fp32; logits are upcast as they are loaded; index math is int64.
# ``triton.jit`` here only wraps the functions (nothing is compiled or probed at import); without Triton
# they stay plain functions, never launched: resolve_impl refuses impl="triton" then.
_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def _softcapped(x, softcap):
    """``(κ tanh(x / κ), 1 − tanh²(x / κ))`` in fp32, for κ = ``softcap``.

    tanh is not a Triton builtin (libdevice's is not available to the interpreter), so it is written out:
    for a = |x / κ| < 1/4 the odd Taylor series through a⁹ (truncation < 1e-8 relative), above it
    (1 − e^{−2a}) / (1 + e^{−2a}) (no cancellation once e^{−2a} ≤ 0.61). The chain factor 1 − tanh² is
    1 − th² on the series branch and 4 e^{−2a} / (1 + e^{−2a})² above it, which stays accurate where th
    rounds to 1 (torch's 1 − tanh² gives 0 there). The forward kernel drops the unused chain factor.
    """
    y = x / softcap
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    small = a < 0.25
    th = tl.where(small, series, (1.0 - e) / (1.0 + e))
    chain = tl.where(small, 1.0 - th * th, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    return softcap * tl.where(y < 0, -th, th), chain


@_jit
def _store_lse(lse_ptr, m, log_s):
    """Store ``lse = m + log s``, added in fp64 (exact for the two fp32 parts) and cast to the buffer's dtype:
    fp64 for the row kernels, so that the backward recovers both parts; fp32 where a caller asks for it."""
    tl.store(lse_ptr, (m.to(tl.float64) + log_s.to(tl.float64)).to(lse_ptr.dtype.element_ty))


@_jit
def _row_loss(
    z_row, t_row, w_ptr,  # one row of logits; its class index, or its row of probabilities; class weights
    C, ignore_index, eps, z_loss, softcap,
    PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """``(loss, m, log s)`` of one row: one pass over its logits; ``lse = m + log s``."""
    cols = tl.arange(0, BLOCK)
    # Online log-sum-exp: running max m and s = Σ exp(x − m), rescaled by exp(m_old − m_new) when the max
    # grows. m starts at −FLT_MAX, not −inf: an all −inf row then sums exp(−inf) = 0 terms (not exp(nan))
    # and ends at lse = −FLT_MAX + log 0 = −inf, as torch_rows does.
    m = tl.full([], _FLT_LOWEST, tl.float32)
    s = tl.zeros([], tl.float32)
    # The loss is assembled from m and log s, never from the rounded lse = m + log s: at |m| ~ 1e4 fp32
    # rounds lse to ~1e-3, and lse − x_t would carry that error. So the weighted sums are kept relative
    # to the running max, as Σ_c v_c (x_c − m) with v = u (probabilities) or w (smoothing), re-referenced
    # by −(m_new − m) Σ v whenever m grows; then W lse − Σ_c w_c x_c = W log s − Σ_c w_c (x_c − m), etc.
    dot = tl.zeros([BLOCK], tl.float32)  # Σ_c v_c (x_c − m), per lane
    v_sum = tl.zeros([BLOCK], tl.float32)  # Σ_c v_c: U (probabilities) or W (smoothing), per lane
    wy_sum = tl.zeros([BLOCK], tl.float32)  # ω = Σ_c w_c y_c (probabilities), per lane
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < C
        x = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            x = tl.where(mask, _softcapped(x, softcap)[0], float("-inf"))  # padding stays −inf
        m_new = tl.maximum(m, tl.max(x, 0))
        if PROBS or SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            else:
                w = tl.where(mask, 1.0, 0.0)
            if PROBS:
                yv = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
                v = w * ((1.0 - eps) * yv + eps / C)  # u_c
                wy_sum += w * yv
            else:
                v = w
            dot -= tl.where(v_sum != 0.0, v_sum * (m_new - m), 0.0)
            dot += v * tl.where(v != 0.0, x - m_new, 0.0)  # v_c = 0 drops the term, also at x_c = −inf
            v_sum += v
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    log_s = tl.log(s)  # a NaN logit reaches s through exp(NaN − m), so NaN propagates
    lse = m + log_s
    if PROBS:
        # loss = U lse − Σ_c u_c x_c + s ω lse² = U log s − Σ_c u_c (x_c − m) + s ω lse²
        loss = tl.sum(v_sum, 0) * log_s - tl.sum(dot, 0) + z_loss * tl.sum(wy_sum, 0) * lse * lse
    else:
        t = tl.load(t_row).to(tl.int64)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= C))
        t_safe = tl.minimum(tl.maximum(tl.where(valid, t, 0), 0), C - 1)  # never read outside the row
        # The target logit is re-read (one element, cached) rather than picked out of a block.
        x_t = tl.load(z_row + t_safe).to(tl.float32)
        if SOFTCAP:
            x_t = _softcapped(x_t, softcap)[0]
        if HAS_WEIGHT:
            omega = tl.where(valid, tl.load(w_ptr + t_safe), 0.0)
        else:
            omega = tl.where(valid, 1.0, 0.0)
        # loss = ω ((1 − ε)(lse − x_t) + s lse²) + (ε / C)(W lse − Σ_c w_c x_c),
        # with lse − x_t = (m − x_t) + log s and W lse − Σ_c w_c x_c = W log s − Σ_c w_c (x_c − m)
        loss = omega * ((1.0 - eps) * ((m - x_t) + log_s) + z_loss * lse * lse)
        if SMOOTH:
            loss += (eps / C) * (tl.sum(v_sum, 0) * log_s - tl.sum(dot, 0))
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
    return loss, m, log_s


@_jit
def _row_grad(
    z_row, t_row, w_ptr, wsum_ptr, out_row,  # as in _row_loss; W = Σ_c w_c (1,); the gradient row (may be z_row)
    m, log_s, g,  # lse = m + log s in two fp32 parts (the backward kernel: hi and lo of its fp64 lse); g
    C, ignore_index, eps, z_loss, softcap,
    v0, C_all,  # the row holds columns [v0, v0 + C) of C_all classes (a vocabulary shard; 0 and C: whole)
    PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Write ``g · ∂loss/∂z`` of one row into ``out_row``: one pass over the logits, each block read before
    it is written (so ``out_row`` may be ``z_row``), with p_c = exp((x_c − m) − log s) and ``lse`` the full
    row's. A shard's columns need nothing else from the other columns: the target term lands where the
    target's global id is in the shard, the class weights ``w_ptr`` are global (``w_ptr + v0`` per column),
    and ε / C, W are the full row's. Probability targets come as whole rows only (v0 = 0, C_all = C)."""
    cols = tl.arange(0, BLOCK)
    lse = m + log_s
    if PROBS:
        # ∂loss/∂x_c = (U + 2 s ω lse) p_c − u_c needs U and ω before the first gradient element, so the
        # targets (not the logits) are read once more up front.
        u_sum = tl.zeros([BLOCK], tl.float32)
        wy_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < C
            yv = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            else:
                w = tl.where(mask, 1.0, 0.0)
            u_sum += w * ((1.0 - eps) * yv + eps / C)
            wy_sum += w * yv
        p_scale = g * (tl.sum(u_sum, 0) + 2.0 * z_loss * tl.sum(wy_sum, 0) * lse)  # g (U + 2 s ω lse)
    else:
        t = tl.load(t_row).to(tl.int64)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= C_all))
        t_safe = tl.minimum(tl.maximum(tl.where(valid, t, 0), 0), C_all - 1)  # global id, safe to index w
        t_col = t_safe - v0  # its column in this row's shard (outside [0, C) when the target lies elsewhere)
        if HAS_WEIGHT:
            omega = tl.where(valid, tl.load(w_ptr + t_safe), 0.0)
        else:
            omega = tl.where(valid, 1.0, 0.0)
        g = tl.where(valid, g, 0.0)
        # the p_c coefficient: g (ω (1 − ε + 2 s lse) + ε W / C)
        p_scale = g * omega * (1.0 - eps + 2.0 * z_loss * lse)
        if SMOOTH:
            if HAS_WEIGHT:
                big_w = tl.load(wsum_ptr)
            else:
                big_w = C_all * 1.0
            p_scale += g * eps * big_w / C_all
        at_target = -g * omega * (1.0 - eps)  # the −ω (1 − ε) [c = t] term, times g
        smooth = g * eps / C_all  # the −ε w_c / C term is −smooth · w_c
        poison = tl.where(bad, float("nan"), 0.0)  # out-of-range target: a NaN row, as in torch_rows
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < C
        x = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            x, chain = _softcapped(x, softcap)  # chain = d(κ tanh(z / κ))/dz
        p = tl.exp((x - m) - log_s)
        if PROBS:
            yv = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            else:
                w = 1.0
            # g ((U + 2 s ω lse) p_c − u_c)
            grad = p_scale * p - g * (w * ((1.0 - eps) * yv + eps / C))
        else:
            grad = p_scale * p + tl.where(offs == t_col, at_target, 0.0)
            if SMOOTH:
                if HAS_WEIGHT:
                    grad -= smooth * tl.load(w_ptr + v0 + offs, mask=mask, other=0.0)
                else:
                    grad -= smooth
        if SOFTCAP:
            grad *= chain
        if not PROBS:  # ignored rows: exactly 0, even where p is NaN (all −inf logits); bad rows: NaN
            grad = tl.where(valid, grad, 0.0) + poison
        tl.store(out_row + offs, grad.to(out_row.dtype.element_ty), mask=mask)


@_jit
def _row_forward_kernel(
    z_ptr, stride_z,  # logits (R, C), unit column stride
    t_ptr, stride_t,  # class indices (R,), or probabilities (R, C) with unit column stride
    w_ptr,  # class weights (C,) fp32, read only when HAS_WEIGHT
    loss_ptr, lse_ptr,  # (R,) outputs: loss fp32, LSE fp64 (see _store_lse)
    C, ignore_index, eps, z_loss, softcap,
    PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    loss, m, log_s = _row_loss(
        z_ptr + row * stride_z, t_ptr + row * stride_t, w_ptr, C, ignore_index, eps, z_loss, softcap,
        PROBS, HAS_WEIGHT, SMOOTH, SOFTCAP, BLOCK,
    )  # fmt: skip
    tl.store(loss_ptr + row, loss)
    _store_lse(lse_ptr + row, m, log_s)


@_jit
def _row_backward_kernel(
    z_ptr, stride_z,  # logits (R, C), unit column stride
    t_ptr, stride_t,  # class indices (R,), or probabilities (R, C) with unit column stride
    w_ptr, wsum_ptr,  # class weights (C,) fp32 and W = Σ_c w_c (1,) fp32, read only when HAS_WEIGHT
    lse_ptr, stride_lse, g_ptr, stride_g,  # (R,) fp64 LSE from forward, upstream gradient (stride 0: a scalar)
    out_ptr, stride_out,  # (R, C) gradient, unit column stride; may be z_ptr itself
    C, ignore_index, eps, z_loss, softcap,
    v0, C_all,  # the logits are columns [v0, v0 + C) of C_all classes (a vocabulary shard; 0 and C: whole)
    PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    # The fp64 lse as hi + lo, two fp32 numbers: p = exp((x − hi) − lo) keeps the bits fp32 would round off
    # at |lse| (x − hi is exact when x is near hi, where p matters). lse = ±inf gives lo = 0, not inf − inf.
    lse = tl.load(lse_ptr + row * stride_lse).to(tl.float64)
    hi = lse.to(tl.float32)
    lo = tl.where(lse == hi.to(tl.float64), 0.0, (lse - hi.to(tl.float64)).to(tl.float32))
    g = tl.load(g_ptr + row * stride_g)
    _row_grad(
        z_ptr + row * stride_z, t_ptr + row * stride_t, w_ptr, wsum_ptr, out_ptr + row * stride_out,
        hi, lo, g, C, ignore_index, eps, z_loss, softcap, v0, C_all, PROBS, HAS_WEIGHT, SMOOTH, SOFTCAP, BLOCK,
    )  # fmt: skip


@_jit
def _chunk_step_kernel(
    z_ptr, stride_z,  # one block of logits (R, C), unit column stride: overwritten by the gradient if HAS_GRAD
    t_ptr, w_ptr, wsum_ptr,  # class indices (R,); class weights (C,) and their sum (1,), fp32
    loss_ptr, lse_ptr, g_ptr, stride_g,  # (R,) loss fp32 and LSE fp64; upstream gradient per row (stride 0: a scalar)
    C, ignore_index, eps, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # linear_cross_entropy's chunk step: the forward kernel's pass, then (with a gradient) the backward
    # kernel's pass over the same row, in place, from the exact m and log s rather than the rounded lse.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    loss, m, log_s = _row_loss(
        z_row, t_ptr + row, w_ptr, C, ignore_index, eps, z_loss, softcap, False, HAS_WEIGHT, SMOOTH, SOFTCAP, BLOCK
    )  # fmt: skip
    tl.store(loss_ptr + row, loss)
    _store_lse(lse_ptr + row, m, log_s)
    if HAS_GRAD:
        g = tl.load(g_ptr + row * stride_g).to(tl.float32)
        _row_grad(
            z_row, t_ptr + row, w_ptr, wsum_ptr, z_row, m, log_s, g, C, ignore_index, eps, z_loss, softcap, 0, C,
            False, HAS_WEIGHT, SMOOTH, SOFTCAP, BLOCK,
        )  # fmt: skip
