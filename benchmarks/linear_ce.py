"""Issue-3 benchmark: fused linear + cross-entropy vs the matrix-product floor, PyTorch and CCE, on this CPU.

The measurement lives in :mod:`crossent.bench.linear_ce` (``crossent bench --op linear`` runs it too):
(N, D, V) = (4096, 1024, 32768) and (2048, 2048, 131072), fp32, forward+backward; per method the median
time and the peak RSS, each in its own subprocess; a table (linear_ce.md) and a plot (linear_ce.png).
Run:  .venv/bin/python benchmarks/linear_ce.py [--reps 3] [--out bench-out] [--methods ...] [--quick]
"""

import sys

from crossent.bench.linear_ce import main

if __name__ == "__main__":
    sys.exit(main())
