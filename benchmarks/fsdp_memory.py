"""Per-rank peak memory of one FSDP2 training step, stock vs crossent.transformers.patch, vocabulary 128256.

    python benchmarks/fsdp_memory.py            # every config, each in fresh torchrun processes (2 gloo ranks)
    python benchmarks/fsdp_memory.py --quick    # a small model (a smoke run)
    python benchmarks/fsdp_memory.py --accelerate --nproc 8   # on GPUs: accelerate's FSDP2 plugin prepares it


A Llama-style model (hidden 256, 2 decoder layers, vocabulary 128256), ``fully_shard`` per decoder layer and on the
root (FSDP2 on CPU over gloo); each rank runs one forward + backward on its own batch of 2 × 512 tokens. Memory is
the process's resident-set high-water mark (Linux ``VmHWM``), reset just before the step (``/proc/self/clear_refs``
← 5) and read after it: the step's peak, model and optimizer state included (they are resident throughout). A fresh
pair of processes per config, so no config inherits another's high-water mark or allocator caches.

On CUDA (nccl, one GPU per rank) memory is ``torch.cuda.max_memory_allocated`` over the step (reset before it), and
the step time is the median of 5 steps after one warm-up. ``--accelerate`` prepares model and optimizer with
``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, transformer-based wrap))`` and its
``mixed_precision`` (bf16 configs) instead of the ``fully_shard`` calls above — on the CPU accelerate wraps DDP
whatever the plugin says, so it is for GPU runs (``benchmarks/gpu.py --only fsdp``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {  # name → (patched, mixed precision)
    "stock FSDP2": (False, False),
    "crossent FSDP2": (True, False),
    "stock FSDP2, bf16 params": (False, True),
    "crossent FSDP2, bf16 params": (True, True),
}


def rank_main(name: str, quick: bool, accelerate: bool) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import crossent.transformers as ct
    from crossent.bench.linear_memory import _reset_peak_rss, _rss_bytes

    patched, bf16 = CONFIGS[name]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    vocab, hidden, seq = (4096, 64, 64) if quick else (128256, 256, 512)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      tie_word_embeddings=False)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).train().to(device)
    if patched:
        ct.patch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    backward = torch.Tensor.backward
    if accelerate:
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"])  # fmt: skip
        accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision="bf16" if bf16 else "no")
        model, optimizer = accelerator.prepare(model, optimizer)
        backward = accelerator.backward
    else:
        kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (2, seq), generator=g).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss

    if cuda:
        step()  # warm-up, then the step's peak above what stays allocated between steps
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 1024
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 1024
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    else:
        before = _rss_bytes("VmRSS") / 1024  # KiB, as the CUDA figures
        _reset_peak_rss()  # VmHWM to the current RSS
        loss = step()
        peak = _rss_bytes("VmHWM") / 1024
        seconds = float("nan")
    row = torch.tensor([before, peak, float(loss), seconds], dtype=torch.float64, device=device)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    if rank == 0:
        for r, (b, p, value, sec) in enumerate(t.tolist() for t in rows):
            print(f"ROW {name}|{r}|{b / 1024:.0f}|{p / 1024:.0f}|{(p - b) / 1024:.0f}|{value:.4f}|{sec * 1e3:.1f}",
                  flush=True)  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model (vocabulary 4096)")
    parser.add_argument("--accelerate", action="store_true", help="accelerate's FSDP2 plugin prepares the model")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (GPUs on CUDA)")
    parser.add_argument("--rank-config", help=argparse.SUPPRESS)  # set for the torchrun children
    args = parser.parse_args()
    if args.rank_config:
        rank_main(args.rank_config, args.quick, args.accelerate)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for name in CONFIGS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               __file__, "--rank-config", name]  # fmt: skip
        cmd += [flag for flag, on in (("--quick", args.quick), ("--accelerate", args.accelerate)) if on]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [line[4:].split("|") for line in run.stdout.splitlines() if line.startswith("ROW ")]
        if run.returncode or not found:
            sys.exit(f"{name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        rows[name] = found
    memory = "allocated" if "nan" not in found[0][6] else "RSS"
    print(f"| config | rank | {memory} before step (MiB) | step peak (MiB) | step peak − before (MiB) | loss | step ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, found in rows.items():
        for _, rank, before, peak, step, loss, ms in found:
            print(f"| {name} | {rank} | {before} | {peak} | {step} | {loss} | {ms} |")
    for patched_name in [n for n in CONFIGS if CONFIGS[n][0]]:
        stock_name = patched_name.replace("crossent", "stock")
        ratios = [int(p[4]) / max(int(s[4]), 1) for p, s in zip(rows[patched_name], rows[stock_name])]
        print(f"{patched_name} / {stock_name}, step peak − before, per rank: "
              + ", ".join(f"{r:.2f}x" for r in ratios))  # fmt: skip


if __name__ == "__main__":
    main()
