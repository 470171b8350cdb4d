"""A/B of two crossent source trees on the same workload: did a change make anything slower?

Each round runs one short subprocess per tree (``PYTHONPATH=<tree>/src``), in alternating order, and each
subprocess reports the median of its timed repetitions (after a warm-up); the table gives the median over
rounds and the ratio B / A. Alternating processes spread machine noise over both sides alike.

Run (an old revision checked out beside the working tree):
    git worktree add --detach ../crossent-old <rev>
    .venv/bin/python benchmarks/ab_revisions.py ../crossent-old . [--rounds 5] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# (name, setup, step): setup builds tensors once; step is one forward+backward
WORKLOADS = {
    "ce 64x1000 f32 (x200)": (  # a small call's fixed cost: 200 steps per timing
        "z = torch.randn(64, 1000, requires_grad=True); t = torch.randint(0, 1000, (64,))",
        "for _ in range(200): crossent.cross_entropy(z, t).backward(); z.grad = None",
    ),
    "ce 64x1000 bf16 (x200)": (
        "z = torch.randn(64, 1000).bfloat16().requires_grad_(); t = torch.randint(0, 1000, (64,))",
        "for _ in range(200): crossent.cross_entropy(z, t).backward(); z.grad = None",
    ),
    "ce 4096x32768 f32": (
        "z = torch.randn(4096, 32768, requires_grad=True); t = torch.randint(0, 32768, (4096,))",
        "crossent.cross_entropy(z, t).backward(); z.grad = None",
    ),
    "ce 1024x131072 f32": (
        "z = torch.randn(1024, 131072, requires_grad=True); t = torch.randint(0, 131072, (1024,))",
        "crossent.cross_entropy(z, t).backward(); z.grad = None",
    ),
    "ce 4096x32768 bf16": (
        "z = torch.randn(4096, 32768).bfloat16().requires_grad_(); t = torch.randint(0, 32768, (4096,))",
        "crossent.cross_entropy(z, t).backward(); z.grad = None",
    ),
    "linear 4096x1024x32768 f32": (
        "x = torch.randn(4096, 1024, requires_grad=True); w = (torch.randn(32768, 1024) / 32).requires_grad_();"
        " t = torch.randint(0, 32768, (4096,))",
        "crossent.linear_cross_entropy(x, w, t).backward(); x.grad = w.grad = None",
    ),
}

_CHILD = """
import statistics, time, torch, crossent
torch.manual_seed(0)
{setup}
{step}
times = []
for _ in range({reps}):
    start = time.perf_counter()
    {step}
    times.append(time.perf_counter() - start)
print(statistics.median(times))
"""


def _time(tree: str, workload: str, reps: int) -> float:
    setup, step = WORKLOADS[workload]
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"))
    code = _CHILD.format(setup=setup, step=step, reps=reps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree_a", help="source tree A (the baseline)")
    parser.add_argument("tree_b", help="source tree B (the change)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workload", action="append", choices=list(WORKLOADS), help="default: all")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for workload in args.workload or list(WORKLOADS):
        a, b = [], []
        for r in range(args.rounds):
            order = [(args.tree_a, a), (args.tree_b, b)][:: 1 if r % 2 == 0 else -1]
            for tree, sink in order:
                sink.append(_time(tree, workload, args.reps))
        ma, mb = statistics.median(a), statistics.median(b)
        rows.append({"workload": workload, "a_s": ma, "b_s": mb, "b_over_a": mb / ma})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'workload':28} {'A median s':>11} {'B median s':>11} {'B / A':>7}")
    for row in rows:
        print(f"{row['workload']:28} {row['a_s']:11.3f} {row['b_s']:11.3f} {row['b_over_a']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
