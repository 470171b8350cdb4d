"""C kernels for CPU tensors: the Python side of ``crossent._cpu_rows*`` (``src/crossent/csrc/cpu_rows.c``).

PyTorch's CPU ops have no 16-bit-in, fp32-statistics softmax, so the torch kernels upcast every chunk of bf16 /
fp16 logits to an fp32 copy and read that again (about twice the bytes of PyTorch's own bf16 loss), and their
O(rows) bookkeeping (targets, weights, factors in float64) is a few dozen small torch ops per call. The C kernels
do the same math row by row over the logits as stored — fp32, bf16 or fp16, converted in registers, exp in fp32
vector lanes, sums in float64 (lanes, or per block of 256 columns), per-row factors in float64 — and write per-row
results (fp32 loss, float64 lse) and gradients in the logits' dtype. They cover:

- cross-entropy with class indices over whole rows, every option but softcap (:func:`forward`, :func:`backward`,
  :func:`loss_and_grad`: ``torch_rows``' whole-row path and the fused CE's 16-bit blocks in ``linear_loop``;
  :func:`one_pass_rows` and :func:`target_weight`: the small inputs' one-pass backend, ``kernels/one_pass.py``);
- the per-token log-probs' row stats and gradient (:func:`log_prob_stats`, :func:`log_prob_grad`: ``logprob_rows``);
- distillation's forward / reverse KL block step (:func:`distill`: ``distill_rows``).

Everything else, and every CPU without the extension (``pip install`` builds it when a C compiler is present,
and skips it otherwise), runs the torch ops, with the same results up to rounding (``covers*`` decide).

The extension is built once per x86-64 level (``_cpu_rows_v4``, ``_v3``, ``_v2``) and for the compiler's default
target (``_cpu_rows``); the highest build that the CPU and ``CROSSENT_CPU_CAPABILITY`` allow is imported
(:data:`VARIANT`), chosen here from the CPU's flags (``crossent._cpu_level``), not by a compiler's resolver.

Large inputs are spread over ``torch.get_num_threads()`` threads in one OpenMP region per call, on PyTorch's own
OpenMP runtime (the C file's header says how), in small dynamic chunks of rows: a core taken by another process
(a data loader) delays only the chunks it holds.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from crossent import _cpu_level
from crossent._options import RowOptions

# The build of the C kernels for each level (setup.py: one per x86-64 level, and the compiler's default target)
BUILDS = {"x86-64-v4": "_cpu_rows_v4", "x86-64-v3": "_cpu_rows_v3", "x86-64-v2": "_cpu_rows_v2", "default": "_cpu_rows"}


def _load() -> Tuple[Optional[ModuleType], Optional[str]]:
    """The highest build at or below the level crossent runs at (the CPU's, or CROSSENT_CPU_CAPABILITY's; see
    crossent._cpu_level) that was built, and its level; (None, None) where none was (no C compiler)."""
    levels = _cpu_level.LEVELS[: _cpu_level.LEVELS.index(_cpu_level.level()) + 1]
    for level in reversed(levels):
        try:
            return importlib.import_module(f"crossent.{BUILDS[level]}"), level
        except ImportError:
            continue
    return None, None


_native, VARIANT = _load()
"""VARIANT: the level of the build that runs (``x86-64-v3``, …, ``default``), None without the C kernels."""

ENABLED = True
"""Switch for tests and comparisons: False sends every call to the torch ops (``torch_rows``, ``logprob_rows``,
``distill_rows``, the fused loops' fp32-copy blocks, the "aten" one pass for small inputs)."""

# Below this many logits a call runs on the calling thread (an OpenMP region costs a few µs to wake; the
# kernels process ~3 logits per ns per core on the 2-core x86 VM, fp32 and bf16).
PARALLEL_MIN_ELEMENTS = 1 << 15

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available() -> bool:
    """Whether the C kernels were built (``pip install`` found a C compiler) and are switched on."""
    return _native is not None and ENABLED


def covers(logits: Tensor, out: Optional[Tensor], opts) -> bool:
    """Whether the C row kernels take rows ``logits`` (N, M, C) or (N, C) (and write ``out``, same shape): CPU,
    fp32 / bf16 / fp16, no softcap (``opts``: the cross-entropy's or the log-probs' row options), the class dim
    contiguous."""
    return (available() and logits.is_cpu and logits.dtype in _DTYPE_CODES and opts.softcap is None
            and logits.shape[-1] > 0 and logits.stride(-1) == 1
            and (out is None or (out.dtype == logits.dtype and out.stride(-1) == 1)))  # fmt: skip


def forward(
    logits: Tensor, target: Tensor, class_weight: Optional[Tensor], opts: RowOptions, weights=None
) -> Tuple[Tensor, Tensor, float]:  # fmt: skip
    """Per-row loss (float32) and lse (float64), flat (rows,), of logits (N, M, C) or (N, C) and int targets of
    the batch shape, and the float64 sum of the losses. ``weights``: :func:`class_weights` of ``class_weight``,
    when the caller has them."""
    return _loss_rows(0, logits, target, class_weight, opts, weights=weights)


def backward(
    logits: Tensor, target: Tensor, class_weight: Optional[Tensor], lse: Tensor, grad_loss: Union[Tensor, float],
    opts: RowOptions, out: Tensor, weights=None,
) -> None:  # fmt: skip
    """Write ``grad_loss · ∂loss/∂logits`` into ``out`` (the logits' shape and dtype; may be the logits), from the
    float64 ``lse`` of the rows; ``grad_loss`` per row (``lse``'s shape, or broadcast to it) or one value."""
    rows = math.prod(logits.shape[:-1])
    grad, grad_value = _upstream(grad_loss, lse.shape)
    _cross_entropy_rows(1, logits, target, class_weight, opts, out=out, lse=_flat(lse, torch.float64, rows),
                        grad=grad, grad_value=grad_value, weights=weights)  # fmt: skip


def loss_and_grad(
    logits: Tensor, target: Tensor, class_weight: Optional[Tensor], grad_loss: Union[Tensor, float], opts: RowOptions,
    out: Tensor, factored: bool = False, weights=None,
) -> Tuple[Tensor, Tensor, float]:  # fmt: skip
    """:func:`forward` and then :func:`backward` (into ``out``, which may be the logits), each row while it is in the
    cache — one exp per logit where the row fits the kernels' row buffer: the fused loops and the small-input path
    know the upstream gradient ``grad_loss`` in forward. Returns (loss, lse) flat and the float64 sum of the losses.

    ``factored``: write only the gradient's ``scale · p`` part (``scale`` as in ``torch_rows.IndexGradFactors``: 0
    on ignored rows, NaN on out-of-range ones); the fused loops add the target and smoothing terms after their
    products."""
    grad, grad_value = _upstream(grad_loss, logits.shape[:-1])
    return _loss_rows(2, logits, target, class_weight, opts, out=out, grad=grad, grad_value=grad_value,
                      factored=factored, weights=weights)  # fmt: skip


def _loss_rows(mode, logits, target, class_weight, opts, **kwargs) -> Tuple[Tensor, Tensor, float]:
    """:func:`_cross_entropy_rows` in mode 0 or 2 into new per-row loss (float32) and lse (float64) tensors."""
    rows = math.prod(logits.shape[:-1])
    loss = torch.empty(rows, dtype=torch.float32)
    lse = torch.empty(rows, dtype=torch.float64)
    total = _cross_entropy_rows(mode, logits, target, class_weight, opts, loss=loss, lse=lse, **kwargs)
    return loss, lse, total


def _upstream(grad_loss: Union[Tensor, float], batch_shape) -> Tuple[Optional[Tensor], float]:
    """The upstream gradient as the C entry takes it: (None, the value) for one value on every row (a float, or a
    one-element CPU tensor: a free host read), else (per-row float32 values, 0)."""
    if isinstance(grad_loss, float):
        return None, grad_loss
    if grad_loss.numel() == 1:
        return None, float(grad_loss)
    return _flat(grad_loss.expand(batch_shape), torch.float32, math.prod(batch_shape)), 0.0


def target_weight(target: Tensor, weights, num_classes: int, ignore_index: int) -> Tuple[float, int]:
    """Of int64 class indices ``target`` (N,) (contiguous): ``Σ w_t`` over the non-ignored ones (the weighted mean's
    denominator, float64) and how many of those lie outside [0, C) — one read of the targets, on the host."""
    return _native.target_weight(target.data_ptr(), target.numel(), num_classes, ignore_index, _ptr(weights[0]))


def one_pass_rows(
    logits: Tensor, target: Tensor, opts: RowOptions, weights, grad_value: float, out: Optional[Tensor],
    row_losses: bool,
) -> Tuple[Optional[Tensor], Tensor, float]:  # fmt: skip
    """The small inputs' one pass (``kernels/one_pass.py``) over logits (N, C) with the class dim contiguous and
    int64 class indices (N,): per-row loss (float32; None unless ``row_losses``), lse (float64) and the float64 sum of
    the losses, and where ``out`` (N, C) is given ``grad_value · ∂loss/∂logits`` into it — :func:`forward` or
    :func:`loss_and_grad` for that layout, without their general reshaping (~2.5 µs of a ~45 µs 64 × 1000 step).
    ``weights``: :func:`class_weights`."""
    n = logits.shape[0]
    loss = torch.empty(n, dtype=torch.float32) if row_losses else None
    lse = torch.empty(n, dtype=torch.float64)
    out_stride = 0 if out is None else out.stride(0)
    total = _rows_call(0 if out is None else 2, logits, 1, logits.stride(0), 0, out, out_stride, 0,
                       target.contiguous(), opts, weights, loss, lse, None, grad_value, False, n)  # fmt: skip
    return loss, lse, total


def _cross_entropy_rows(mode, logits, target, class_weight, opts, *, out=None, loss=None, lse=None, grad=None,
                        factored=False, weights=None, grad_value=0.0):  # fmt: skip
    """The C entry point ``cross_entropy_rows`` (mode 0 forward, 1 backward, 2 both) on (N, M, C) or (N, C) logits
    (``out`` alike); returns the float64 sum of the row losses (modes 0 and 2). ``weights``: :func:`class_weights` of
    ``class_weight``, when the caller has them; ``grad`` None: ``grad_value`` on every row."""
    if logits.dim() == 2:  # (N, C): one position per batch row
        (n, num_classes), m, strides = logits.shape, 1, (logits.stride(0), 0)
        out_strides = (0, 0) if out is None else (out.stride(0), 0)
    else:
        (n, m, num_classes), strides = logits.shape, logits.stride()[:2]
        out_strides = (0, 0) if out is None else out.stride()[:2]
    rows = n * m
    weights = class_weights(class_weight, num_classes) if weights is None else weights
    return _rows_call(mode, logits, m, *strides, out, *out_strides, _flat(target, torch.int64, rows), opts, weights,
                      loss, lse, grad, grad_value, factored, rows)  # fmt: skip


def _rows_call(mode, logits, m, s_n, s_m, out, out_s_n, out_s_m, target, opts, weights, loss, lse, grad, grad_value,
               factored, rows) -> float:  # fmt: skip
    """``cross_entropy_rows`` of the C extension on rows laid out as (N, M, C) by element strides ``s_n``, ``s_m``
    (``out`` by ``out_s_n``, ``out_s_m``), ``target`` int64 contiguous (rows,); None tensors are passed as 0."""
    w64, w32, total_weight = weights
    num_classes = logits.shape[-1]
    return _native.cross_entropy_rows(
        mode, _DTYPE_CODES[logits.dtype], logits.data_ptr(), m, s_n, s_m, num_classes, _ptr(out), out_s_n, out_s_m,
        target.data_ptr(), opts.ignore_index, _ptr(w64), _ptr(w32), total_weight, opts.label_smoothing, opts.z_loss,
        _ptr(loss), _ptr(lse), _ptr(grad), float(grad_value), int(factored), rows, _threads(rows, num_classes),
    )  # fmt: skip


def log_prob_stats(logits: Tensor, temperature: float, entropy: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per row of ``x = logits / temperature`` (N, M, C): the max (all −inf rows: the lowest fp32), ``S = Σ exp(x −
    max)`` and (``entropy``) ``D = Σ exp(x − max)(x − max)``, each (N, M) float32 (fp32 lanes per block of 256
    columns, the blocks added in float64, rounded once): ``logprob_rows.LogProbStats`` without the id logits."""
    n, m, num_classes = logits.shape
    rows = n * m
    row_max = torch.empty(rows, dtype=torch.float32)
    sumexp = torch.empty(rows, dtype=torch.float64)
    plogp = torch.empty(rows, dtype=torch.float64) if entropy else None
    _native.log_prob_stats(_DTYPE_CODES[logits.dtype], logits.data_ptr(), m, logits.stride(0), logits.stride(1),
                           num_classes, float(temperature), int(entropy), row_max.data_ptr(), sumexp.data_ptr(),
                           _ptr(plogp), rows, _threads(rows, num_classes))  # fmt: skip
    plogp = None if plogp is None else plogp.to(torch.float32).view(n, m)
    return row_max.view(n, m), sumexp.to(torch.float32).view(n, m), plogp


def log_prob_grad(logits: Tensor, out: Tensor, temperature: float, shift: Tensor, scale: Tensor,
                  entropy_scale: Optional[Tensor], columns: Tensor, at_ids: Tensor) -> None:
    """The per-token log-probs' gradient of rows ``logits`` (N, M, C) into ``out`` (same shape and dtype; may be the
    logits), from ``logprob_rows.LogProbGradFactors``: ``shift`` float64 (N, M), ``scale`` / ``entropy_scale``
    (N, M), ``columns`` / ``at_ids`` (N, M, K)."""
    n, m, num_classes = logits.shape
    rows, k_ids = n * m, columns.shape[-1]
    shift = _flat(shift, torch.float64, rows)
    scale = _flat(scale, torch.float32, rows)
    entropy_scale = None if entropy_scale is None else _flat(entropy_scale, torch.float32, rows)
    columns = _flat(columns, torch.int64, rows * k_ids)
    at_ids = _flat(at_ids, torch.float32, rows * k_ids)
    _native.log_prob_grad(_DTYPE_CODES[logits.dtype], logits.data_ptr(), m, logits.stride(0), logits.stride(1),
                          num_classes, out.data_ptr(), out.stride(0), out.stride(1), float(temperature),
                          shift.data_ptr(), scale.data_ptr(), _ptr(entropy_scale), columns.data_ptr(),
                          at_ids.data_ptr(), k_ids, rows, _threads(rows, num_classes))  # fmt: skip


def covers_distill(student: Tensor, teacher: Tensor, opts) -> bool:
    """Whether :func:`distill` takes a block of student and teacher logits (rows, V): options it covers
    (:func:`covers_distill_options`), the same dtype (fp32 / bf16 / fp16) and shape, rows contiguous."""
    return (covers_distill_options(opts, student.device, student.dtype) and teacher.dtype == student.dtype
            and teacher.shape == student.shape and student.dim() == 2 and student.shape[-1] > 0
            and student.stride(-1) == 1 and teacher.stride(-1) == 1)  # fmt: skip


def covers_distill_options(opts, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`distill` takes blocks of ``dtype`` on ``device`` with distillation options ``opts``: the C
    kernels built, CPU, forward or reverse KL (β 0 or 1), no softcap, no hard loss, teacher logits (not
    log-probabilities)."""
    return (available() and device.type == "cpu" and dtype in _DTYPE_CODES and opts.beta in (0.0, 1.0)
            and opts.softcap is None and not opts.hard_weight and not opts.teacher_log_probs)  # fmt: skip


def distill(student: Tensor, teacher: Tensor, temperature: float, reverse: bool, row_scale: Optional[Tensor]) -> Tensor:
    """Per row of (rows, V) logits at ``temperature``: KL(p ‖ q) (``reverse``: KL(q ‖ p)) in float64, p the teacher's
    and q the student's softmax; with ``row_scale`` (rows,), ``row_scale · ∂KL/∂(student / T)`` written over
    ``student`` (rows whose scale is 0: exactly 0)."""
    rows, num_classes = student.shape
    div = torch.empty(rows, dtype=torch.float64)
    scale = None if row_scale is None else _flat(row_scale, torch.float32, rows)
    _native.distill(_DTYPE_CODES[student.dtype], student.data_ptr(), teacher.data_ptr(), 1, student.stride(0), 0,
                    teacher.stride(0), 0, num_classes, float(temperature), int(reverse), _ptr(scale), div.data_ptr(),
                    rows, _threads(rows, num_classes))  # fmt: skip
    return div


def _flat(values: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
    """A per-row tensor as a contiguous (rows,) tensor of ``dtype`` (a copy only where needed)."""
    if values.dtype == dtype and values.dim() == 1 and values.is_contiguous() and values.numel() == rows:
        return values
    return values.to(dtype).reshape(rows).contiguous()


def class_weights(class_weight: Optional[Tensor], num_classes: int):
    """(weights in float64, the same in float32, their sum W in float64); (None, None, C) without weights."""
    if class_weight is None:
        return None, None, float(num_classes)
    w64 = class_weight.detach().to(torch.float64).contiguous()
    return w64, w64.to(torch.float32), float(w64.sum())


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _threads(rows: int, num_classes: int) -> int:
    """OpenMP threads for a call: PyTorch's thread count, one below PARALLEL_MIN_ELEMENTS logits."""
    return 1 if rows * num_classes < PARALLEL_MIN_ELEMENTS else max(1, min(torch.get_num_threads(), rows))
