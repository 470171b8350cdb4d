"""crossent: exact, stable, memory-frugal softmax cross-entropy for PyTorch."""

from crossent import reference
from crossent._results import CrossEntropyStats, TokenLogProbs
from crossent.functional import cross_entropy, linear_cross_entropy
from crossent.functional_log_probs import linear_token_log_probs, token_log_probs
from crossent.functional_distill import distill_loss, linear_distill_loss, sparse_distill_loss
from crossent.modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = [
    "reference",
    "cross_entropy",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "CrossEntropyStats",
    "token_log_probs",
    "linear_token_log_probs",
    "TokenLogProbs",
    "distill_loss",
    "linear_distill_loss",
    "sparse_distill_loss",
]

__version__ = "0.2.0"
