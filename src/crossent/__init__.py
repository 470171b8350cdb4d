"""crossent: exact, stable, memory-frugal softmax cross-entropy for PyTorch."""

from crossent import reference
from crossent._options import CrossEntropyOptions
from crossent.functional import cross_entropy
from crossent.modules import CrossEntropyLoss

__all__ = [
    "reference",
    "CrossEntropyOptions",
    "cross_entropy",
    "CrossEntropyLoss",
]

__version__ = "0.1.0"
