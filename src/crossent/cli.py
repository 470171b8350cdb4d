"""``crossent`` command line: ``crossent bench`` times crossent against PyTorch on this machine."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from crossent.bench import cross_entropy as ce_bench
from crossent.bench.progress import Progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``crossent`` console script and ``python -m crossent``."""
    args = _parser().parse_args(argv)
    if args.command != "bench":
        _parser().print_help()
        return 2
    return _bench(args)


def _bench(args) -> int:
    if args.op == "linear":  # fused linear + CE: CPU fp32, each method in its own subprocess, table + plot
        from crossent.bench import linear_ce

        if args.shape or args.dtype != "float32" or args.device not in ("auto", "cpu"):
            raise SystemExit(
                "crossent bench --op linear runs CPU float32 on its own (N, D, V) shapes; "
                "for other shapes use benchmarks/linear_ce.py --shape N D V"
            )

        return linear_ce.main((["--quick"] if args.quick else []) + ["--reps", str(args.reps), "--out", args.out])
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("crossent bench: --device cuda but no CUDA device is available")
    shapes = args.shape or (ce_bench.QUICK_SHAPES if args.quick else ce_bench.DEFAULT_SHAPES)
    print(f"crossent bench: cross_entropy forward+backward, {args.dtype}, {device}, median of {args.reps}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    with Progress(len(shapes) * len(ce_bench.METHODS), "bench") as bar:
        results = ce_bench.run(shapes, DTYPES[args.dtype], device, args.reps, on_step=bar.step)
    print(ce_bench.format_table(results))
    return 0


def _shape(text: str):
    try:
        n, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x32768 (N x C), got {text!r}") from None
    if n < 1 or c < 1:
        raise argparse.ArgumentTypeError(f"shape must have N >= 1 and C >= 1, got {text!r}")
    return n, c


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossent", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="time crossent vs PyTorch on this machine (default: a ~1 minute run)")
    bench.add_argument("--shape", type=_shape, action="append", metavar="NxC",
                       help="logits shape, repeatable (default: 8192x8192, 4096x32768, 1024x131072)")  # fmt: skip
    bench.add_argument("--dtype", choices=list(DTYPES), default="float32")
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bench.add_argument("--reps", type=int, default=5, help="timed repetitions per method (median reported)")
    bench.add_argument("--quick", action="store_true", help="a tiny shape only (a smoke test)")
    bench.add_argument("--op", choices=["ce", "linear"], default="ce",
                       help="ce: cross_entropy (default); linear: fused linear + CE vs the GEMM floor, PyTorch "
                            "and CCE (CPU, float32; writes linear_ce.md and linear_ce.png to --out)")  # fmt: skip
    bench.add_argument("--out", default="bench-out", help="folder for --op linear's table and plot")
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
