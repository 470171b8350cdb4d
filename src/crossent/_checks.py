"""Tensor checks at the public boundary: TypeError/ValueError naming the argument, value and expectation.

Every public function (one process or vocab-parallel) runs these before any work. The one check that runs
later, inside the forward custom ops, is :func:`check_target_range` on CPU (see ``kernels/ops.py`` for why).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

TargetKind = Literal["index", "probs"]


def check_logits(name: str, x) -> None:
    """A floating tensor with at least one dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a class dimension, got a 0-d tensor")


def check_has_classes(input: torch.Tensor) -> int:
    """The number of classes C of ``cross_entropy``'s input (dim 1, or dim 0 of a (C,) input), at least 1.

    PyTorch gives NaN (probabilities) or an index error (class indices) for C = 0; a loss over no classes
    has no meaning, so it is a ValueError naming the shape.
    """
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    if num_classes == 0:
        raise ValueError(f"input has no classes: its class dim has size 0 (shape {tuple(input.shape)})")
    return num_classes


def target_kind(input: torch.Tensor, target, ignore_index: int) -> TargetKind:
    """Class indices (the input's shape without the class dim) or probabilities (the input's shape)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():
        if target.shape == input.shape:
            if ignore_index >= 0:  # as PyTorch: a negative ignore_index can never match and is allowed
                raise ValueError(
                    f"ignore_index={ignore_index} can't be used with class-probability targets "
                    f"(floating target of the input's shape {tuple(input.shape)})"
                )
            return "probs"
    elif not target.is_complex() and target.dtype != torch.bool and _is_index_shape(input.shape, target.shape):
        return "index"
    index_shape = _index_shape(input.shape)
    raise ValueError(
        f"target of shape {tuple(target.shape)} and dtype {target.dtype} matches neither target kind for input "
        f"of shape {tuple(input.shape)}: expected integer class indices of shape {tuple(index_shape)} or "
        f"floating class probabilities of shape {tuple(input.shape)}"
    )


def _index_shape(input_shape: torch.Size) -> torch.Size:
    """``input_shape`` without its class dim (dim 1, or dim 0 of a (C,) input): class indices' shape."""
    class_dim = 0 if len(input_shape) == 1 else 1
    return input_shape[:class_dim] + input_shape[class_dim + 1 :]


def _is_index_shape(input_shape: torch.Size, target_shape: torch.Size) -> bool:
    """``target_shape == _index_shape(input_shape)``; the (N, C) case compared without building that shape (~0.4 µs
    of a small call)."""
    if len(input_shape) == 2:
        return len(target_shape) == 1 and target_shape[0] == input_shape[0]
    return target_shape == _index_shape(input_shape)


def class_indices(target: torch.Tensor) -> torch.Tensor:
    """Class-index targets as int64 (PyTorch accepts uint8/int16/int32 too; the kernels index in int64)."""
    return target if target.dtype == torch.int64 else target.long()


def check_weight(weight: Optional[torch.Tensor], num_classes: Optional[int], device: torch.device) -> None:
    """None, or a floating (C,) class-weight tensor on ``device``; ``num_classes`` None: any length (checked
    later, e.g. against the vocab-parallel ranks' shards)."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
    if weight.dim() != 1 or (num_classes is not None and weight.shape[0] != num_classes):
        expected = "(C,)" if num_classes is None else f"({num_classes},)"
        raise ValueError(f"weight must have shape {expected} (one per class), got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but the input is on {device}")


def check_index_target(target, batch_shape: torch.Size, device: torch.device) -> None:
    """Integer class indices of the input's shape without its class dim (``input.shape[:-1]``), on ``device``."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != batch_shape:
        raise ValueError(
            f"target must have shape input.shape[:-1] = {tuple(batch_shape)} (the input without its class dim), "
            f"got {tuple(target.shape)}"
        )
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the input is on {device}")


def check_token_index(index, batch_shape: torch.Size, device: torch.device) -> bool:
    """Integer ids of shape ``batch_shape`` (one per position; returns True) or ``batch_shape + (K,)`` (K per
    position; returns False), on ``device``."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"index must hold integer class ids, got dtype {index.dtype}")
    single = index.shape == batch_shape
    if not single and not (index.dim() == len(batch_shape) + 1 and index.shape[:-1] == batch_shape):
        raise ValueError(
            f"index must have shape input.shape[:-1] = {tuple(batch_shape)} (one id per position) or "
            f"input.shape[:-1] + (K,) = {tuple(batch_shape) + ('K',)} (K ids per position), got {tuple(index.shape)}"
        )
    if index.device != device:
        raise ValueError(f"index is on {index.device} but the input is on {device}")
    return single


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every class index is in [0, C) or equals ignore_index.

    Reads the target on the host, so it is called only for CPU tensors. On CUDA the kernels clamp
    the index for memory safety and give the offending rows a NaN loss and gradient instead.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad].reshape(-1)[0])
        raise ValueError(
            f"target contains class index {value}, outside [0, {num_classes}) and not ignore_index={ignore_index}"
        )


def check_linear(input, linear_weight, target, linear_bias, check_target=check_index_target) -> None:
    """Shapes, dtypes and devices of the fused linear functions' tensors, before any work; the class ids by
    ``check_target(target, input.shape[:-1], input.device)`` (:func:`check_token_index` for the log-probs)."""
    check_logits("input", input)
    if not isinstance(linear_weight, torch.Tensor):
        raise TypeError(f"linear_weight must be a torch.Tensor, got {type(linear_weight).__name__}")
    if linear_bias is not None and not isinstance(linear_bias, torch.Tensor):
        raise TypeError(f"linear_bias must be a torch.Tensor or None, got {type(linear_bias).__name__}")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be (V, D), got shape {tuple(linear_weight.shape)}")
    vocab, dim = linear_weight.shape
    if input.shape[-1] != dim:
        raise ValueError(
            f"input's last dim ({input.shape[-1]}, shape {tuple(input.shape)}) must equal linear_weight's D "
            f"({dim}, shape {tuple(linear_weight.shape)})"
        )
    if vocab == 0:
        raise ValueError("linear_weight has no rows (V = 0): there are no classes")
    check_target(target, input.shape[:-1], input.device)
    if linear_bias is not None and linear_bias.shape != (vocab,):
        raise ValueError(f"linear_bias must have shape ({vocab},) (one per class), got {tuple(linear_bias.shape)}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has {input.dtype}; they must match")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")


def check_distill_logits(input, teacher, target) -> None:
    """``distill_loss``'s tensors: floating student and teacher of one shape ``(..., V)`` (V ≥ 1) on one device,
    and None or integer class indices ``input.shape[:-1]``."""
    check_logits("input", input)
    check_logits("teacher", teacher)
    if teacher.shape[-1] != input.shape[-1]:
        raise ValueError(
            f"student and teacher must share the vocabulary: input has V={input.shape[-1]} (shape "
            f"{tuple(input.shape)}), teacher has V={teacher.shape[-1]} (shape {tuple(teacher.shape)})"
        )
    if teacher.shape != input.shape:
        raise ValueError(f"teacher must have the input's shape {tuple(input.shape)}, got {tuple(teacher.shape)}")
    if input.shape[-1] == 0:
        raise ValueError(f"input has no classes: its last dim has size 0 (shape {tuple(input.shape)})")
    if teacher.device != input.device:
        raise ValueError(f"teacher is on {teacher.device} but input is on {input.device}")
    if target is not None:
        check_index_target(target, input.shape[:-1], input.device)


def check_distill_linear(input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target,
                         hard_weight: float) -> None:  # fmt: skip
    """``linear_distill_loss``'s tensors: each head as :func:`check_linear` checks it (hidden sizes may differ),
    one vocabulary V, the teacher's rows matching the student's, one dtype and device; a target for α > 0."""
    if hard_weight and target is None:
        raise ValueError(f"hard_weight={hard_weight} needs the labels: pass target (class indices)")
    check_logits("input", input)
    check_logits("teacher_input", teacher_input)
    labels = target
    if labels is None:  # the checks below want class indices of the batch shape: a stand-in without storage
        labels = torch.zeros((), dtype=torch.int64, device=input.device).expand(input.shape[:-1])
    check_linear(input, linear_weight, labels, linear_bias)
    if teacher_input.shape[:-1] != input.shape[:-1]:
        raise ValueError(
            f"teacher_input must have the input's batch shape {tuple(input.shape[:-1])} (one teacher position per "
            f"student position), got shape {tuple(teacher_input.shape)}"
        )
    if isinstance(teacher_weight, torch.Tensor) and teacher_weight.dim() == 2 and (
        teacher_weight.shape[0] != linear_weight.shape[0]
    ):
        raise ValueError(
            f"student and teacher must share the vocabulary: linear_weight has V={linear_weight.shape[0]} rows, "
            f"teacher_weight has V={teacher_weight.shape[0]} (shape {tuple(teacher_weight.shape)})"
        )
    check_linear(teacher_input, teacher_weight, labels, teacher_bias)
    if teacher_input.dtype != input.dtype:
        raise TypeError(f"teacher_input has dtype {teacher_input.dtype} but input has {input.dtype}; they must match")
    if teacher_input.device != input.device:
        raise ValueError(f"teacher_input is on {teacher_input.device} but input is on {input.device}")


def check_sparse_teacher(input, linear_weight, linear_bias, teacher_ids, teacher_log_probs, target) -> None:
    """``sparse_distill_loss``'s tensors: the student's head as :func:`check_linear` checks it, integer
    ``teacher_ids`` and floating ``teacher_log_probs`` of one shape ``input.shape[:-1] + (K,)``, K ≥ 1."""
    check_logits("input", input)
    labels = target if target is not None else torch.zeros((), dtype=torch.int64, device=input.device).expand(
        input.shape[:-1])  # fmt: skip
    check_linear(input, linear_weight, labels, linear_bias)
    for name, t in (("teacher_ids", teacher_ids), ("teacher_log_probs", teacher_log_probs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != input.dim() or t.shape[:-1] != input.shape[:-1] or t.shape[-1] == 0:
            raise ValueError(f"{name} must have shape input.shape[:-1] + (K,) = {tuple(input.shape[:-1])} + (K,) "
                             f"with K ≥ 1, got {tuple(t.shape)}")  # fmt: skip
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if teacher_ids.is_floating_point() or teacher_ids.is_complex() or teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must hold integer ids, got dtype {teacher_ids.dtype}")
    if not teacher_log_probs.is_floating_point():
        raise TypeError(f"teacher_log_probs must be floating, got dtype {teacher_log_probs.dtype}")
    if teacher_log_probs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_log_probs {tuple(teacher_log_probs.shape)} and teacher_ids "
                         f"{tuple(teacher_ids.shape)} must have the same shape")  # fmt: skip
