"""Which kernel backend runs a call: decided per call from the tensors' device, never at import.

The one place that maps ``impl`` to code: :func:`resolve_impl` turns the user's ``"auto"`` into a backend
name at the public boundary (a string the custom ops carry), and :func:`row_kernels` /
:func:`chunk_kernels` turn that name into the row kernels' module or the fused loop's chunk step.
For small CPU inputs :func:`one_pass` picks the cross-entropy's one-pass backend (:mod:`one_pass`) that the same
autograd Function runs instead of the rows' forward. Triton's modules are imported only when asked for: Triton is
optional.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Dict, Optional

import torch
from torch import Tensor

from crossent._modes import forward_ad_active, plain_eager
from crossent._options import CrossEntropyOptions
from crossent._reduction import host_row_scale
from crossent.kernels import cpu_rows, distill_rows, linear_step, logprob_rows, torch_rows
from crossent.kernels.one_pass import OnePass, target_total_weight
from crossent.kernels.shard import VocabShard

# Up to this many logits a CPU cross-entropy in plain eager mode runs a one-pass backend (kernels/one_pass.py): the
# rows' per-call bookkeeping (~150 µs: separate range check, reduction nodes, per-row factors) is several times its
# work there, and the (N, C) gradient the one pass keeps for backward is at most 4 MiB of fp32. Set on the 2-core
# x86-64-v4 VM (docs/benchmarks.md, "Small shapes"), where the two paths met at 2^20 logits.
ONE_PASS_MAX_ELEMENTS = 1 << 20

# Where PyTorch's fused log_softmax + nll_loss (the "aten" one pass) is faster than the C one pass, per level of the
# C kernels' build that runs (cpu_rows.VARIANT) and dtype: the number of logits from which "aten" runs. Empty: at
# x86-64-v4 and at x86-64-v3 (under CROSSENT_CPU_CAPABILITY, PyTorch on AVX2) the C pass is below PyTorch's kernel at
# every shape measured (benchmarks/cpu_kernels.py and crossent bench; docs/benchmarks.md, "The user's CPU, second
# round"). A level's entry comes from benchmarks/small_shapes.py on a CPU of that level, stated where measured.
PYTORCH_FASTER_FROM: Dict[str, Dict[torch.dtype, int]] = {}


def triton_available() -> bool:
    """Triton is installed (its kernels run on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``)."""
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"auto"`` → ``"triton"`` for CUDA tensors when Triton is importable, else ``"torch"``.

    ``"triton"`` on a CPU tensor needs ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests).
    """
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("impl='triton' needs the triton package (pip install triton); use impl='torch' or 'auto'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); got a {device.type} tensor"
        )
    return "triton"


def one_pass_backend(logits: Tensor, dtype_ok: bool) -> str:
    """``"c"`` where the C one pass covers ``logits`` (``dtype_ok``: ``cpu_rows.covers``) and PyTorch's kernel is not
    the faster one for its size (:data:`PYTORCH_FASTER_FROM`), else ``"aten"``."""
    if not dtype_ok:
        return "aten"
    level = PYTORCH_FASTER_FROM.get(cpu_rows.VARIANT)
    faster_from = None if level is None else level.get(logits.dtype)
    return "c" if faster_from is None or logits.numel() < faster_from else "aten"


def one_pass(
    logits: Tensor, target: Tensor, class_weight: Optional[Tensor], kind: str, opts: CrossEntropyOptions,
    shard: VocabShard,
) -> Optional[OnePass]:  # fmt: skip
    """The one-pass plan of a checked cross-entropy call on classes-last ``logits`` (C,) or (N, C) and int64 class
    indices, or None where the rows' kernels run: not class indices, ``impl`` not ``"auto"``, not the CPU, a
    vocabulary shard, more than :data:`ONE_PASS_MAX_ELEMENTS` logits or another layout, softcap, not plain eager
    mode, forward-mode AD. Reads the targets on the host once: the range check (a ValueError) and the weighted
    mean's denominator, from which the reduction's row scale (``_reduction.host_row_scale``)."""
    if (kind != "index" or opts.impl != "auto" or not logits.is_cpu or logits.dim() > 2
            or logits.numel() > ONE_PASS_MAX_ELEMENTS or opts.row.softcap is not None or shard.group_name is not None
            or not plain_eager(logits, target, class_weight) or forward_ad_active()):  # fmt: skip
        return None
    num_classes = logits.shape[-1]
    weights = cpu_rows.class_weights(class_weight, num_classes)
    flat_target = target if target.dim() == 1 else target.reshape(-1)  # a reshape's new view costs ~0.7 µs
    total_weight = target_total_weight(flat_target, weights, num_classes, opts.row.ignore_index)
    row_scale = host_row_scale(opts, total_weight)
    form = row_scale is not None and torch.is_grad_enabled() and logits.requires_grad and not opts.inplace_backward
    backend = one_pass_backend(logits, cpu_rows.covers(logits, None, opts.row))
    return OnePass(backend, row_scale, form, weights)


def row_kernels(impl: str):
    """The row kernels' module for a resolved ``impl``: :mod:`torch_rows` or :mod:`triton_rows` (same contract)."""
    if impl == "triton":
        from crossent.kernels import triton_rows

        return triton_rows
    return torch_rows


def chunk_kernels(impl: str) -> linear_step.ChunkKernels:
    """The fused loop's chunk step for a resolved ``impl``: torch ops, or Triton's (:mod:`triton_linear`)."""
    if impl == "triton":
        from crossent.kernels.triton_linear import TRITON_KERNELS

        return TRITON_KERNELS
    return linear_step.TORCH_KERNELS


def logprob_kernels(impl: str):
    """The per-token log-prob row kernels for a resolved ``impl``: :mod:`logprob_rows` or :mod:`triton_logprobs`."""
    if impl == "triton":
        from crossent.kernels import triton_logprobs

        return triton_logprobs
    return logprob_rows


def logprob_chunk_kernels(impl: str) -> logprob_rows.LogProbChunkKernels:
    """The fused log-prob loops' chunk step for a resolved ``impl``: torch ops, or Triton's."""
    if impl == "triton":
        from crossent.kernels.triton_logprobs import TRITON_LOGPROB_KERNELS

        return TRITON_LOGPROB_KERNELS
    return logprob_rows.TORCH_LOGPROB_KERNELS


def no_autocast(device: torch.device):
    """A context in which ``torch.autocast`` is off for ``device``'s type: the kernels keep their own precision.
    A null context where it is off already (entering ``torch.autocast`` costs ~4 µs, a tenth of a small call)."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def distill_step(impl: str):
    """Distillation's whole-row block step for a resolved ``impl``: :func:`distill_rows.block_step_` or its
    Triton version (:mod:`triton_distill`, same contract; it runs the torch step for what it does not cover)."""
    if impl == "triton":
        from crossent.kernels.triton_distill import block_step_

        return block_step_
    return distill_rows.block_step_
