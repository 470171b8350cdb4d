"""A training step of a Llama-style transformers model, stock vs ``crossent.transformers.patch``.

Default: vocabulary 128256 (Llama 3), hidden 256, 2 layers, batch 4 × 512 tokens, fp32, AdamW, on the CPU.

- time and the loss curve: one process holding two copies of the same random-init model, stock and patched,
  stepping alternately (interleaved, so machine load hits both alike) on the same batches; the ratio is of
  the medians of the per-step times (forward + backward + optimizer step);
- peak memory: one subprocess per variant, running ``--memory-steps`` steps; peak RSS (``ru_maxrss``) above
  the RSS after the model, the optimizer state (one step done first, so Adam's moments exist) and the data
  were built — what the step itself adds.

    python benchmarks/hf_step.py                       # the docs/benchmarks.md numbers (30 steps)
    python benchmarks/hf_step.py --steps 3 --vocab 4096 --seq 64   # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def build(args, seed=0):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).float().train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def batches(args, n):
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(n)]


def step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.item()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_worker(args):
    """Peak RSS added by the training steps of one variant (this process runs nothing else)."""
    import crossent.transformers as ct

    model, opt = build(args)
    if args.worker == "crossent":
        ct.patch(model)
    data = batches(args, args.memory_steps + 1)
    step(model, opt, data[0][:, :8])  # Adam's state exists before the baseline (a short sequence: a small peak)
    base = rss_bytes()
    for ids in data[1:]:
        step(model, opt, ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": args.worker, "baseline": base, "peak": peak, "added": peak - base}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=["stock", "crossent"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return memory_worker(args)

    memory = {}
    for variant in ("stock", "crossent"):
        sizes = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                 ("vocab", "hidden", "layers", "batch", "seq", "memory_steps", "threads")]  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", variant] + sizes
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:8s} peak RSS {memory[variant]['peak'] / 2**30:.2f} GiB, added by the step "
              f"{memory[variant]['added'] / 2**30:.2f} GiB", flush=True)  # fmt: skip

    import crossent.transformers as ct

    stock, stock_opt = build(args)
    patched, patched_opt = build(args)
    ct.patch(patched)
    data = batches(args, args.steps)
    rows = []
    for i, ids in enumerate(data):
        for name, model, opt in (("stock", stock, stock_opt), ("crossent", patched, patched_opt))[:: 1 if i % 2 else -1]:
            t0 = time.perf_counter()
            loss = step(model, opt, ids)
            rows.append({"step": i, "variant": name, "seconds": time.perf_counter() - t0, "loss": loss})
        s, c = (next(r for r in rows[-2:] if r["variant"] == v) for v in ("stock", "crossent"))
        print(f"step {i:3d}  stock {s['seconds']:.2f}s loss {s['loss']:.6f}   crossent {c['seconds']:.2f}s "
              f"loss {c['loss']:.6f}", flush=True)  # fmt: skip

    def median(v):
        return statistics.median(r["seconds"] for r in rows if r["variant"] == v)

    def losses(v):
        return [r["loss"] for r in rows if r["variant"] == v]

    rel = max(abs(a - b) / abs(a) for a, b in zip(losses("stock"), losses("crossent")))
    summary = {
        "config": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "batch", "seq", "steps")},
        "threads": torch.get_num_threads(),
        "time_median_s": {v: median(v) for v in ("stock", "crossent")},
        "time_ratio": median("crossent") / median("stock"),
        "memory": memory,
        "peak_rss_ratio": memory["crossent"]["peak"] / memory["stock"]["peak"],
        "added_memory_ratio": memory["crossent"]["added"] / memory["stock"]["added"],
        "loss_max_relative_difference": rel,
        "steps": rows,
    }
    print(f"time per step (median): stock {median('stock'):.2f}s, crossent {median('crossent'):.2f}s, "
          f"ratio {summary['time_ratio']:.2f}")  # fmt: skip
    print(f"peak RSS ratio {summary['peak_rss_ratio']:.2f}; memory added by the step, ratio "
          f"{summary['added_memory_ratio']:.2f}; loss curves: max relative difference {rel:.2e}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
