"""Measurements shared by both ``crossent bench`` ops: interleaved median times, bytes saved for backward."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, Mapping

import torch

# The dtypes ``crossent bench --dtype`` accepts, by name.
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}  # fmt: skip


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], reps: int, min_sample: float = 0.0, device: torch.device | None = None
) -> Dict[str, float]:
    """Median seconds per call of each function, timed in turns so that load drifts hit every one alike.

    Each round runs every function once, the order reversed on odd rounds (no method always runs right after
    the same other one). A function faster than ``min_sample`` seconds is called ``k`` times per sample, ``k``
    from the time of one calibration call, and the sample is divided by ``k``: a 0.1 ms call is not
    timed alone against a 1 ms clock jitter. CUDA work is synchronised before each clock read.

    >>> sorted(interleaved_medians({"a": lambda: None, "b": lambda: None}, reps=3))
    ['a', 'b']
    """
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        sync()
        calls[name] = max(1, math.ceil(min_sample / max(time.perf_counter() - start, 1e-9)))
    samples: Dict[str, list] = {name: [] for name in fns}
    order = list(fns)
    for r in range(reps):
        for name in order if r % 2 == 0 else reversed(order):
            start = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            sync()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b|`` in float64 (0 for empty tensors): a result's error against its float64 oracle ``b``.

    >>> max_abs_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5], dtype=torch.float64))
    0.5
    """
    return (a.double() - b).abs().max().item() if a.numel() else 0.0


def saved_bytes(fn: Callable[[], torch.Tensor], *exclude: torch.Tensor) -> int:
    """Bytes autograd keeps for backward while ``fn()`` builds its graph, minus tensors sharing storage with
    ``exclude`` (the caller's own inputs, which are alive anyway). Each storage counts once. Counted: the saved
    tensors, and a gradient a Function formed in forward and keeps on its ``ctx`` as ``formed`` (crossent's small
    CPU path hands it out without a copy, so it is not a saved tensor), found from the graph of ``fn()``'s result.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    nodes, visited = [getattr(out, "grad_fn", None)], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        formed = getattr(node, "formed", None)
        if isinstance(formed, torch.Tensor):
            pack(formed)
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return sum(seen.values())


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``.

    >>> format_bytes(0), format_bytes(1536), format_bytes(3 * 2**30)
    ('0 B', '1.5 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def logit_products(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor):
    """The 4 products a forward+backward through ``X Wᵀ`` runs when the logits are recomputed, and nothing else:
    the logits (forward) into ``out``, again (backward), then ``dX = G W`` and ``dW = Gᵀ X`` with ``G = out`` —
    ``8·N·D·V`` FLOPs for ``x (N, D)``, ``w (V, D)``, ``out (N, V)``. The floor a fused method's time is set against.

    >>> x, w = torch.ones(2, 3), torch.ones(4, 3)
    >>> dx, dw = logit_products(x, w, torch.empty(2, 4))  # G = X Wᵀ: every entry 3
    >>> dx.tolist(), dw.shape
    ([[12.0, 12.0, 12.0], [12.0, 12.0, 12.0]], torch.Size([4, 3]))
    """
    torch.mm(x, w.T, out=out)
    torch.mm(x, w.T, out=out)
    return out @ w, out.T @ x
