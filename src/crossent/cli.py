"""``crossent`` command line: ``crossent bench`` times crossent against PyTorch on this machine.

``crossent bench`` (cross_entropy) and ``crossent bench --op linear`` (fused linear + cross-entropy) each
take about a minute on a 2-core CPU by default; ``--full`` runs every case at the sizes of
docs/benchmarks.md, ``--quick`` a tiny smoke run. Progress goes to stderr, the table (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from crossent.bench import cross_entropy as ce_bench
from crossent.bench import linear_ce, plot
from crossent.bench.linear_methods import METHODS as LINEAR_METHODS
from crossent.bench.measure import DTYPES
from crossent.bench.progress import progress_bar
from crossent.bench.report import Row, cpu_paths, format_table, to_json


@dataclass(frozen=True)
class Grid:
    """Every combination of these shapes, dtypes and loads."""

    shapes: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[str, ...]
    loads: Tuple[str, ...]


@dataclass(frozen=True)
class Defaults:
    """What a mode measures: the union of its grids, where --shape, --dtype and --load, when given, replace
    that field in every grid; ``reps`` where --reps is not given."""

    grids: Tuple[Grid, ...]
    reps: int
    min_sample: float  # seconds: faster calls are timed in batches this long (measure.interleaved_medians)
    methods: Tuple[str, ...] = ()  # linear only (ce always compares crossent with F.cross_entropy)


SMALL, LARGE = ce_bench.SMALL_SHAPES, ce_bench.LARGE_SHAPES
BOTH_DTYPES, BOTH_LOADS = ("float32", "bfloat16"), ("quiet", "loaded")
# The default runs take about a minute each on a 2-core CPU (docs/benchmarks.md): every small ce case, one
# large shape in float32 only (a large case costs ~10 s quiet), and one linear shape.
DEFAULTS: Dict[Tuple[str, str], Defaults] = {
    ("ce", "quick"): Defaults((Grid(SMALL[:1], ("float32",), ("quiet",)),), 2, 0.0),
    ("ce", "default"): Defaults((Grid(SMALL, BOTH_DTYPES, BOTH_LOADS), Grid(LARGE[:1], ("float32",), BOTH_LOADS)),
                                5, 0.02),
    ("ce", "full"): Defaults((Grid(SMALL + LARGE, BOTH_DTYPES, BOTH_LOADS),), 7, 0.05),
    ("linear", "quick"): Defaults((Grid(linear_ce.QUICK_SHAPES, ("float32",), ("quiet",)),), 2, 0.0,
                                  ("torch", "crossent")),
    ("linear", "default"): Defaults((Grid(linear_ce.DEFAULT_SHAPES, ("float32",), ("quiet",)),), 3, 0.0,
                                    ("torch", "crossent")),
    ("linear", "full"): Defaults((Grid(linear_ce.FULL_SHAPES, ("float32",), ("quiet",)),), 3, 0.0, LINEAR_METHODS),
}  # fmt: skip
LOADS = {"quiet": ("quiet",), "loaded": ("loaded",), "both": ("quiet", "loaded")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``crossent`` console script and ``python -m crossent``."""
    parser, bench = _parser()
    args = parser.parse_args(argv)
    if args.command != "bench":
        parser.print_help()
        return 2
    return _bench(args, bench)


def _bench(args: argparse.Namespace, bench: argparse.ArgumentParser) -> int:
    mode = "quick" if args.quick else "full" if args.full else "default"
    defaults = DEFAULTS[args.op, mode]
    combos = _combinations(defaults.grids, _check_shapes(args, bench), args.dtype, args.load)
    reps = args.reps or defaults.reps
    device = _device(args, bench)
    if args.plot and not plot.available():
        bench.error("--plot needs matplotlib, which is not installed here (pip install 'crossent[plot]')")
    if args.op == "ce":
        cases = [ce_bench.Case(shape, dtype, load) for shape, dtype, load in combos]
        with progress_bar(len(cases), "crossent bench") as bar:
            rows = ce_bench.run(cases, device, reps, defaults.min_sample, bar)
        what = f"cross_entropy vs F.cross_entropy, forward+backward, {ce_bench.IGNORED_FRACTION:.0%} of targets ignored"
    else:
        cases = [linear_ce.Case(shape, dtype, f, load) for shape, dtype, load in combos for f in linear_ce.FRACTIONS]
        with progress_bar(linear_ce.steps(cases, defaults.methods), "crossent bench --op linear") as bar:
            rows = linear_ce.run(cases, defaults.methods, reps, defaults.min_sample, bar)
        what = ("linear_cross_entropy vs F.cross_entropy(x @ W.T), forward+backward; "
                "peak RSS per method in a fresh process")  # fmt: skip
    meta = {"op": args.op, "mode": mode, "device": str(device), "reps": reps, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_paths(), "what": what}  # fmt: skip
    header = (f"crossent bench --op {args.op} ({mode}): {what}; {device}, median of {reps} interleaved rounds, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_paths()}")  # fmt: skip
    _report(rows, meta, header, args)
    return 0


def _report(rows: List[Row], meta: dict, header: str, args: argparse.Namespace) -> None:
    """The table (or JSON) on stdout; files for --out and --plot, named on stderr."""
    table = header + "\n" + format_table(rows)
    print(to_json(meta, rows) if args.json else table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"bench-{args.op}.txt").write_text(table + "\n")
        (out / f"bench-{args.op}.json").write_text(to_json(meta, rows) + "\n")
        print(f"wrote {out / f'bench-{args.op}.txt'} and {out / f'bench-{args.op}.json'}", file=sys.stderr)
    if args.plot:
        plot.write_plot(rows, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr)


def _combinations(grids: Sequence[Grid], shapes: Sequence[Tuple[int, ...]], dtypes: Optional[Sequence[str]],
                  load: Optional[str]) -> List[Tuple[Tuple[int, ...], str, str]]:  # fmt: skip
    """(shape, dtype, load) of every grid, the given flags replacing their field, in order, without repeats.

    >>> _combinations([Grid(((8, 5),), ("float32",), ("quiet", "loaded"))], [], ["bfloat16"], None)
    [((8, 5), 'bfloat16', 'quiet'), ((8, 5), 'bfloat16', 'loaded')]
    """
    combos = []
    for grid in grids:
        combos += itertools.product(shapes or grid.shapes, dtypes or grid.dtypes, LOADS[load] if load else grid.loads)
    return list(dict.fromkeys(combos))


def _check_shapes(args: argparse.Namespace, bench: argparse.ArgumentParser) -> Tuple[Tuple[int, ...], ...]:
    """--shape values with the op's number of dimensions: N x C for ce, N x D x V for linear."""
    want, form = (2, "NxC, e.g. 4096x32768") if args.op == "ce" else (3, "NxDxV, e.g. 4096x1024x32768")
    for shape in args.shape or ():
        if len(shape) != want:
            bench.error(f"--shape for --op {args.op} must be {form}, got {'x'.join(map(str, shape))}")
    return tuple(args.shape or ())


def _device(args: argparse.Namespace, bench: argparse.ArgumentParser) -> torch.device:
    if args.op == "linear" and args.device == "cuda":
        bench.error("--device cuda: --op linear measures peak RSS, so it runs on the CPU only "
                    "(benchmarks/gpu.py times the fused loss on a GPU)")  # fmt: skip
    if args.device == "cuda" and not torch.cuda.is_available():
        bench.error("--device cuda, but no CUDA device is available")
    cuda = args.device == "cuda" or (args.device == "auto" and args.op == "ce" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def _shape(text: str) -> Tuple[int, ...]:
    """``'4096x32768'`` → ``(4096, 32768)``; every size at least 1.

    >>> _shape("8x50"), _shape("4X3x5")
    ((8, 50), (4, 3, 5))
    """
    try:
        sizes = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be sizes joined by x, like 4096x32768, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"shape must have 2 or 3 sizes, each >= 1, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="crossent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="time crossent vs PyTorch on this machine (default: about a minute)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    bench.add_argument("--op", choices=["ce", "linear"], default="ce",
                       help="ce: cross_entropy vs F.cross_entropy (default); linear: fused linear_cross_entropy vs "
                            "F.cross_entropy(x @ W.T) with 0/50/90%% of targets ignored (CPU)")  # fmt: skip
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one tiny case, 2 rounds: a smoke test (seconds)")
    size.add_argument("--full", action="store_true",
                      help="every case at the sizes of docs/benchmarks.md (ce: + 1024x131072 and 7 rounds, several "
                           "minutes; linear: 4096x1024x32768 and 2048x2048x131072, every method, about an hour)",
                      )  # fmt: skip
    bench.add_argument("--shape", type=_shape, action="append", metavar="SHAPE",
                       help="repeatable, replaces the mode's shapes: NxC for ce (default 64x1000, 256x1000, "
                            "128x32000, 4096x32768), NxDxV for linear (default 2048x256x32768)")  # fmt: skip
    bench.add_argument("--dtype", choices=list(DTYPES), action="append",
                       help="repeatable, replaces the mode's dtypes (default: float32 and bfloat16 for ce, "
                            "float32 only at 4096x32768; float32 for linear)")  # fmt: skip
    bench.add_argument("--load", choices=list(LOADS),
                       help="loaded: one busy-loop process runs beside the timing (started and stopped by the bench); "
                            "default both for ce, quiet for linear and --quick")  # fmt: skip
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="auto: cuda when available for ce; linear runs on the CPU")  # fmt: skip
    bench.add_argument("--reps", type=_positive, metavar="N",
                       help="timed rounds per case, median reported (default 5 for ce, 3 for linear, "
                            "2 with --quick)")  # fmt: skip
    bench.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    bench.add_argument("--plot", metavar="PATH", help="also write a figure (.png, .svg, .pdf); needs matplotlib "
                       "(pip install 'crossent[plot]'), checked before anything runs")  # fmt: skip
    bench.add_argument("--out", metavar="DIR", help="also write the table and the JSON to DIR/bench-<op>.txt, .json")
    return parser, bench


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
