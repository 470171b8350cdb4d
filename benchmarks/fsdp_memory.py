"""Per-rank peak memory of one FSDP2 training step, stock vs crossent.transformers.patch, vocabulary 128256.

    python benchmarks/fsdp_memory.py            # every config, each in fresh torchrun processes (2 gloo ranks)
    python benchmarks/fsdp_memory.py --quick    # a small model (the test's smoke run)

A Llama-style model (hidden 256, 2 decoder layers, vocabulary 128256), ``fully_shard`` per decoder layer and on the
root (FSDP2 on CPU over gloo); each rank runs one forward + backward on its own batch of 2 × 512 tokens. Memory is
the process's resident-set high-water mark (Linux ``VmHWM``), reset just before the step (``/proc/self/clear_refs``
← 5) and read after it: the step's peak, model and optimizer state included (they are resident throughout). A fresh
pair of processes per config, so no config inherits another's high-water mark or allocator caches.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CONFIGS = {  # name → (patched, mixed precision)
    "stock FSDP2": (False, False),
    "crossent FSDP2": (True, False),
    "stock FSDP2, bf16 params": (False, True),
    "crossent FSDP2, bf16 params": (True, True),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def rank_main(name: str, quick: bool) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import crossent.transformers as ct

    patched, bf16 = CONFIGS[name]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    vocab, hidden, seq = (4096, 64, 64) if quick else (128256, 256, 512)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      tie_word_embeddings=False)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).train()
    if patched:
        ct.patch(model)
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    peak = _status_kib("VmHWM")
    row = torch.tensor([before, peak, float(loss)], dtype=torch.float64)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    if rank == 0:
        for r, (b, p, value) in enumerate(t.tolist() for t in rows):
            print(f"ROW {name}|{r}|{b / 1024:.0f}|{p / 1024:.0f}|{(p - b) / 1024:.0f}|{value:.4f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model (vocabulary 4096)")
    parser.add_argument("--rank-config", help=argparse.SUPPRESS)  # set for the torchrun children
    args = parser.parse_args()
    if args.rank_config:
        rank_main(args.rank_config, args.quick)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for name in CONFIGS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               "--rank-config", name] + (["--quick"] if args.quick else [])  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [line[4:].split("|") for line in run.stdout.splitlines() if line.startswith("ROW ")]
        if run.returncode or not found:
            sys.exit(f"{name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        rows[name] = found
    print("| config | rank | RSS before step (MiB) | step peak RSS (MiB) | step peak − before (MiB) | loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, found in rows.items():
        for _, rank, before, peak, step, loss in found:
            print(f"| {name} | {rank} | {before} | {peak} | {step} | {loss} |")
    for patched_name in [n for n in CONFIGS if CONFIGS[n][0]]:
        stock_name = patched_name.replace("crossent", "stock")
        ratios = [int(p[4]) / max(int(s[4]), 1) for p, s in zip(rows[patched_name], rows[stock_name])]
        print(f"{patched_name} / {stock_name}, step peak − before, per rank: "
              + ", ".join(f"{r:.2f}x" for r in ratios))  # fmt: skip


if __name__ == "__main__":
    main()
