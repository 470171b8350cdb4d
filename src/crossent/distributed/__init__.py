"""Vocab-parallel cross-entropy over ``torch.distributed``: each rank holds a slice of the vocabulary.

``layout`` is the pure shard math (no process group needed), ``agreement`` the protocol by which the ranks
check a call together, ``api`` the two public functions. See docs/distributed.md.
"""

from crossent.distributed.api import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_distill_loss,
    vocab_parallel_linear_token_log_probs,
    vocab_parallel_token_log_probs,
)
from crossent.distributed.layout import check_vocab_layout, vocab_ranges

__all__ = [
    "vocab_ranges",
    "check_vocab_layout",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_token_log_probs",
    "vocab_parallel_linear_token_log_probs",
    "vocab_parallel_linear_distill_loss",
]
