"""The fused linear CE's block shape: how many token rows, and vocabulary columns, one block holds.

Pure arithmetic on (N, D, V, dtype, device) and the memory budget; nothing is allocated here. The memory
formula is derived in docs/linear_cross_entropy.md.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from crossent._precision import compute_dtype

# Scratch budget (bytes) when the caller gives none, and the fewest token rows a block may have before
# the vocabulary is split instead (a split costs one more logits product per block; fewer rows make the
# dW product, whose inner dimension is the row count, bandwidth-bound on dW).
# The budget is the larger of the device's floor below and half the fp32 dW sum (V·D·4 bytes), which
# must exist anyway: bigger blocks mean fewer read-modify-write passes over dW and fewer re-packings of W
# by the products, and scratch stays below 50% of dW. CPU floor 128 MiB: ~820 rows at (V, D) =
# (32768, 1024), so scratch + dX + dW stays under PyTorch's chunked mode there. At (2048, 2048, 131072)
# forward+backward took 12.8 s with 256 MiB blocks, 11.9 s with 512 MiB (half of dW: 3 blocks) and
# 12.5 s with 1.1 GiB (in-process, alternating; 2-core x86 VM). CUDA: starting values, not measured.
DEFAULT_MEMORY_BUDGET = {"cpu": 128 << 20, "cuda": 1 << 30}
DW_SHARE = 2  # the default budget is at least (fp32 dW bytes) / DW_SHARE
MIN_BLOCK_ROWS = {"cpu": 64, "cuda": 256}
MIN_BLOCK_COLS = 256  # the narrowest vocabulary piece the plan picks by itself
ROW_ALIGN = 8  # block rows are rounded down to a multiple of this (GEMM micro-kernels), when possible


class ChunkPlan(NamedTuple):
    """Token rows per block, and vocabulary columns per block (``cols == V``: no vocabulary split)."""

    rows: int
    cols: int


def scratch_bytes(rows: int, cols: int, dim: int, dtype: torch.dtype, fp32_block: bool = True) -> int:
    """Bytes of scratch one (rows, cols) block needs beyond dX, dW and db (see docs/linear_cross_entropy.md).

    ``rows · cols · (s_c + s_16)`` for the block (compute dtype, plus a 16-bit copy for 16-bit inputs:
    the logits product's output and the gradient products' operand) and ``rows · D · 3 s_c`` for the
    block's dX rows, scaled input rows and their cast, where ``s_c`` = 4 (8 for float64). ``fp32_block=False``:
    a 16-bit block without its compute-dtype copy (the C step on the CPU reads and writes the 16-bit block).
    """
    s_c = torch.finfo(compute_dtype(dtype)).bits // 8
    s_16 = _bytes_16(dtype)
    block = s_c + s_16 if fp32_block or not s_16 else s_16
    return rows * cols * block + rows * dim * 3 * s_c


def default_memory_budget(device: torch.device, vocab: int = 0, dim: int = 0, dtype: torch.dtype = torch.float32) -> int:
    """The device's floor (``DEFAULT_MEMORY_BUDGET``), or half the fp32 dW sum if that is larger; for 16-bit
    input times ``(s_c + s_16) / s_c`` = 1.5, so that its blocks hold as many rows as fp32 input's (the
    16-bit copy of the block only feeds the 16-bit products, and each block of rows costs one pass over
    the fp32 dW sum: bf16 at (2048, 1024, 32768) took 1.41× the bf16 floor in blocks of 512 rows, 1.33× in
    blocks of 1024; docs/benchmarks.md, "16-bit inputs")."""
    floor = DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cuda"])
    budget = max(floor, vocab * dim * 4 // DW_SHARE)
    s_c = torch.finfo(compute_dtype(dtype)).bits // 8
    return budget * (s_c + _bytes_16(dtype)) // s_c


def _bytes_16(dtype: torch.dtype) -> int:
    """Bytes of the block's 16-bit copy per element: 2 for 16-bit input, else 0."""
    return 0 if compute_dtype(dtype) == dtype else torch.finfo(dtype).bits // 8


def plan_chunks(
    num_rows: int,
    dim: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    fp32_block: bool = True,
    one_block_spares: int = 0,
) -> ChunkPlan:
    """Pick the block shape: as many full-vocabulary rows as the budget holds; if that is fewer than
    ``MIN_BLOCK_ROWS``, that many rows and as many vocabulary columns as fit. ``chunk_size`` fixes the
    rows (then only an explicit ``memory_budget`` can split the vocabulary). ``fp32_block``: as
    :func:`scratch_bytes`. ``one_block_spares``: bytes that taking every row in one block saves elsewhere (the
    fp32 dW sum, which the C block step does not need for a single block); with the default budget, one block
    is taken when its scratch fits the budget plus these, so peak memory stays within what several blocks use.

    Raises:
        ValueError: as :func:`check_memory_budget`.
    """
    n = max(num_rows, 1)
    check_memory_budget(num_rows, dim, vocab, dtype, chunk_size, memory_budget)
    if chunk_size is not None:
        rows = min(chunk_size, n)
        if memory_budget is None:
            return ChunkPlan(rows, vocab)
        return ChunkPlan(rows, _cols_that_fit(rows, vocab, dim, dtype, memory_budget, fp32_block))
    budget = default_memory_budget(device, vocab, dim, dtype) if memory_budget is None else memory_budget
    if memory_budget is None and scratch_bytes(n, vocab, dim, dtype, fp32_block) <= budget + one_block_spares:
        return ChunkPlan(n, vocab)
    full_rows = max(1, budget // scratch_bytes(1, vocab, dim, dtype, fp32_block))
    min_rows = min(n, MIN_BLOCK_ROWS.get(device.type, MIN_BLOCK_ROWS["cuda"]))
    if full_rows >= min_rows:
        return ChunkPlan(_balanced(n, full_rows), vocab)
    per_col = scratch_bytes(min_rows, 1, dim, dtype, fp32_block) - scratch_bytes(min_rows, 0, dim, dtype)
    cols = (budget - scratch_bytes(min_rows, 0, dim, dtype)) // per_col
    if cols < MIN_BLOCK_COLS:  # pieces this narrow make poor products: keep full rows, however few
        return ChunkPlan(full_rows, vocab)
    return ChunkPlan(_balanced(n, min_rows), min(cols, vocab))


def check_memory_budget(num_rows, dim, vocab, dtype, chunk_size=None, memory_budget=None) -> None:
    """A ``memory_budget`` that holds one full-vocabulary row, and with ``chunk_size`` a block of that many rows
    (at most ``num_rows``) and one vocabulary column. The public functions call this before any work; the plan
    itself is made inside the custom ops (so that a compiled graph does not depend on N).

    Raises:
        ValueError: a budget below those.
    """
    if memory_budget is None:
        return
    if memory_budget < scratch_bytes(1, vocab, dim, dtype):
        raise ValueError(
            f"memory_budget={memory_budget} bytes is too small for even one row: one row of V={vocab} classes "
            f"(D={dim}, {dtype}) needs {scratch_bytes(1, vocab, dim, dtype)} bytes of scratch"
        )
    if chunk_size is not None:
        _cols_that_fit(min(chunk_size, max(num_rows, 1)), vocab, dim, dtype, memory_budget)


def _cols_that_fit(rows, vocab, dim, dtype, budget, fp32_block=True):
    per_col = scratch_bytes(rows, 1, dim, dtype, fp32_block) - scratch_bytes(rows, 0, dim, dtype)
    cols = (budget - scratch_bytes(rows, 0, dim, dtype)) // per_col
    if cols < 1:
        raise ValueError(
            f"memory_budget={budget} bytes cannot hold a block of {rows} rows (chunk_size) and even one "
            f"vocabulary column: that needs {scratch_bytes(rows, 1, dim, dtype)} bytes"
        )
    return min(vocab, cols)


def _balanced(n, rows):
    """Rows per block for equal blocks: the fewest blocks of at most ``rows`` rows, ROW_ALIGN-rounded."""
    blocks = -(-n // rows)
    if blocks == 1:
        return n
    even = -(-n // blocks)
    aligned = -(-even // ROW_ALIGN) * ROW_ALIGN
    return aligned if aligned <= rows else even
