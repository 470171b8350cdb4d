"""Vocab-parallel fused linear cross-entropy: time, peak memory and bytes communicated per rank, P = 1, 2.

    python benchmarks/vocab_parallel.py                # (N, D, V) = (2048, 1024, 65536), P = 1 and 2
    python benchmarks/vocab_parallel.py --quick        # a tiny size, for the smoke test
    python benchmarks/vocab_parallel.py --ranks 1 2 4 --size 4096 1024 131072 --reps 3

The first row is single-process ``crossent.linear_cross_entropy`` (no process group, the baseline),
then each P runs in its own P spawned processes (gloo on 127.0.0.1; nccl, one GPU per rank, when CUDA has
≥ P devices). The CPU's cores are split evenly between the ranks (torch threads = cores // P), so on a
CPU the total work is the same at every P and the time shows the overhead of splitting, not a speedup.
Per step (forward + backward, fp32, reduction="mean"):

    FLOPs per rank   6·N·D·V/P   (logits, dX and dW products, all in forward for reduction="mean")
    bytes sent       this rank's payload of every collective, counted on rank 0, forward (the loss:
                     80 metadata + 4·N max + 8·N sum-exp and target logit) and backward (4·N·D, the
                     all-reduce of dX), each vs 4·N·V, the fp32 logits a gather-based loss would move
    peak memory      CPU: peak RSS during the steps minus RSS before them; CUDA: max_memory_allocated
                     minus what the inputs and weights hold
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", nargs=3, type=int, default=[2048, 1024, 65536], metavar=("N", "D", "V"))
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="world sizes P to run")
    p.add_argument("--reps", type=int, default=3, help="timed steps per P (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="(N, D, V) = (256, 64, 4096), 2 reps: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.reps, args.warmup = [256, 64, 4096], 2, 1
    n, d, v = args.size
    cuda = torch.cuda.is_available()
    print(f"vocab-parallel fused linear CE, fp32, (N, D, V) = ({n}, {d}, {v}), "
          f"{'nccl' if cuda else 'gloo'}, {os.cpu_count()} CPU cores")  # fmt: skip
    header = f"{'P':>3} {'V/P':>7} {'median s':>9} {'GFLOP/s/rank':>13} {'peak MiB/rank':>14} " \
             f"{'fwd bytes':>10} {'(formula)':>10} {'/ 4·N·V':>8} {'bwd bytes':>11} {'(formula)':>11} {'/ 4·N·V':>8}"  # fmt: skip
    print(header)
    for world in [0, *args.ranks]:  # 0: the single-process baseline
        if cuda and torch.cuda.device_count() < world:
            print(f"{world:>3} skipped: {torch.cuda.device_count()} GPU(s)")
            continue
        r = _run(world, n, d, v, args.reps, args.warmup)
        if world == 0:
            gflops = 6 * n * d * v / r["median_s"] / 1e9
            print(f"{'1*':>3} {v:>7} {r['median_s']:>9.3f} {gflops:>13.1f} {r['peak_mib']:>14.1f}   "
                  "(crossent.linear_cross_entropy, one process, no communication)", flush=True)  # fmt: skip
            continue
        fwd, bwd = 80 + 12 * n, 4 * n * d  # the formulas of the module docstring
        logits_bytes = 4 * n * v
        gflops = 6 * n * d * (v / world) / r["median_s"] / 1e9
        print(f"{world:>3} {v // world:>7} {r['median_s']:>9.3f} {gflops:>13.1f} {r['peak_mib']:>14.1f} "
              f"{r['fwd_bytes']:>10,} {fwd:>10,} {r['fwd_bytes'] / logits_bytes:>8.1e} "
              f"{r['bwd_bytes']:>11,} {bwd:>11,} {r['bwd_bytes'] / logits_bytes:>8.1e}", flush=True)  # fmt: skip
    return 0


def _run(world, n, d, v, reps, warmup):
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, n, d, v, reps, warmup, q)) for r in range(max(world, 1))]
    for pr in procs:
        pr.start()
    out = {}
    try:
        for _ in range(max(world, 1)):
            rank, res = q.get(timeout=3600)
            if isinstance(res, str):
                raise RuntimeError(f"rank {rank} failed:\n{res}")
            out[rank] = res
    finally:
        for pr in procs:
            pr.join(timeout=30)
            if pr.is_alive():
                pr.kill()
    return {"median_s": max(o["median_s"] for o in out.values()), "peak_mib": max(o["peak_mib"] for o in out.values()),
            "fwd_bytes": out[0]["fwd_bytes"], "bwd_bytes": out[0]["bwd_bytes"]}  # fmt: skip


def _rank(rank, world, port, n, d, v, reps, warmup, q):
    try:
        q.put((rank, _measure(rank, world, port, n, d, v, reps, warmup)))
    except BaseException:  # noqa: BLE001 - report to the parent instead of hanging it
        import traceback

        q.put((rank, traceback.format_exc()))


def _measure(rank, world, port, n, d, v, reps, warmup):
    """One rank's timings; ``world == 0``: single-process ``crossent.linear_cross_entropy``, no group."""
    import crossent
    from crossent.distributed import vocab_parallel_linear_cross_entropy, vocab_ranges

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))
    if world:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=30))  # fmt: skip
    barrier = dist.barrier if world else (lambda: None)
    sent = _count_collectives()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    sizes = [v // world + (r < v % world) for r in range(world)] if world else [v]
    lo, hi = vocab_ranges(sizes)[rank]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()
    w = (torch.randn(v, d, generator=g)[lo:hi] * d**-0.5).to(device).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g).to(device)
    loss_fn = vocab_parallel_linear_cross_entropy if world else crossent.linear_cross_entropy
    forward_bytes = []

    def step():
        x.grad = w.grad = None
        loss = loss_fn(x, w, target)
        forward_bytes.append(sum(sent))
        loss.backward()
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    x.grad = w.grad = None
    base = torch.cuda.memory_allocated() if cuda else _rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sent.clear()
    forward_bytes.clear()
    times, total_bytes = [], []
    for _ in range(reps):
        barrier()
        t0 = time.perf_counter()
        step()
        barrier()
        times.append(time.perf_counter() - t0)
        total_bytes.append(sum(sent))
        sent.clear()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if world:
        dist.destroy_process_group()
    return {"median_s": statistics.median(times), "peak_mib": (peak - base) / 2**20,
            "fwd_bytes": forward_bytes[0], "bwd_bytes": total_bytes[0] - forward_bytes[0]}  # fmt: skip


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _count_collectives():
    """Wrap the collectives crossent.distributed calls so each records its payload in bytes (this rank's
    contribution; a ring all-reduce moves about 2(P − 1)/P of it each way)."""
    sent = []

    def wrap(name, size):
        real = getattr(dist, name)

        def counted(*a, **k):
            sent.append(size(*a, **k))
            return real(*a, **k)

        setattr(dist, name, counted)

    wrap("all_reduce", lambda t, *a, **k: t.numel() * t.element_size())
    wrap("all_gather", lambda out, t, *a, **k: t.numel() * t.element_size())
    wrap("all_gather_object", lambda out, obj, *a, **k: 0)  # only on the error path
    wrap("barrier", lambda *a, **k: 0)
    return sent


if __name__ == "__main__":
    sys.exit(main())
