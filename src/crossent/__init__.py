"""crossent: exact, stable, memory-frugal softmax cross-entropy for PyTorch."""

from crossent import reference
from crossent._options import CrossEntropyOptions, LinearCrossEntropyOptions
from crossent.functional import cross_entropy, linear_cross_entropy
from crossent.modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = [
    "reference",
    "CrossEntropyOptions",
    "cross_entropy",
    "CrossEntropyLoss",
    "LinearCrossEntropyOptions",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
]

__version__ = "0.1.0"
