"""Train a tiny language-model head whose vocabulary is split over the ranks (vocab parallelism).

Launch (CPU, gloo; nccl is used instead when CUDA is present)::

    torchrun --standalone --nproc-per-node 2 examples/vocab_parallel_train.py --steps 30

Every rank holds the same small trunk (embedding → linear → tanh), sees the same batch, and holds its own
rows of the output projection (unequal when P does not divide V). ``vocab_parallel_linear_cross_entropy``
returns the full loss on every rank and the full gradient for the hidden states, so the replicated trunk
stays identical on every rank without any gradient all-reduce; each rank updates only its head rows.
At step 0 the script checks the loss against single-process ``crossent.cross_entropy(hidden @ W_full.T)``,
gathering the head to do so (affordable only in a toy).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import crossent
from crossent.distributed import vocab_parallel_linear_cross_entropy, vocab_ranges


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--vocab", type=int, default=1001, help="global vocabulary size V (odd: unequal shards)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256, help="tokens per batch")
    p.add_argument("--lr", type=float, default=2.0)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    # This rank's vocabulary slice: the first V % P ranks get one extra row.
    sizes = [args.vocab // world + (r < args.vocab % world) for r in range(world)]
    lo, hi = vocab_ranges(sizes)[rank]

    torch.manual_seed(0)  # the same trunk and head initialisation on every rank
    trunk = nn.Sequential(nn.Embedding(args.vocab, args.dim), nn.Linear(args.dim, args.dim), nn.Tanh()).to(device)
    head_full = torch.randn(args.vocab, args.dim) * args.dim**-0.5
    head = nn.Parameter(head_full[lo:hi].clone().to(device))  # this rank's rows only
    del head_full
    opt = torch.optim.SGD([*trunk.parameters(), head], lr=args.lr)

    gen = torch.Generator().manual_seed(1)  # the same batches on every rank
    first = last = None
    for step in range(args.steps):
        tokens = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
        target = (tokens * 7 + 3) % args.vocab  # a learnable next-token rule
        target[::17] = -100  # some padding positions
        hidden = trunk(tokens)
        loss = vocab_parallel_linear_cross_entropy(hidden, head, target, label_smoothing=0.05)
        if step == 0:
            check_against_single_process(hidden.detach(), head.detach(), target, loss.detach(), world)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # every rank: hidden gets the full gradient, head its rows' gradient
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {last:.4f}", flush=True)

    # The replicated trunk must still be identical on every rank (no gradient all-reduce was needed).
    flat = torch.cat([q.detach().reshape(-1) for q in trunk.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    drift = (spread - flat).abs().max()
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"ranks {world}, shard sizes {sizes}, loss {first:.4f} -> {last:.4f}, trunk drift {drift.item():.1e}")
    dist.barrier()  # every rank done with its collectives before any tears its gloo connections down
    dist.destroy_process_group()


def check_against_single_process(hidden, head, target, loss, world) -> None:
    """Gather the head rows (only affordable in a toy) and compare with single-process crossent."""
    rows = [None] * world
    dist.all_gather_object(rows, head.cpu())
    full = torch.cat(rows).to(hidden.device)
    want = crossent.cross_entropy(hidden @ full.T, target, label_smoothing=0.05)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    main()
