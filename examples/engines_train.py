"""Train a tiny Llama with crossent.transformers.patch under DDP, FSDP2 or tensor parallelism (2+ ranks).

    torchrun --standalone --nproc-per-node 2 examples/engines_train.py --engine ddp
    torchrun --standalone --nproc-per-node 2 examples/engines_train.py --engine fsdp2
    torchrun --standalone --nproc-per-node 2 examples/engines_train.py --engine fsdp2 --patch-after
    torchrun --standalone --nproc-per-node 2 examples/engines_train.py --engine tp

gloo on CPU, nccl where CUDA is present. Each step's loss is printed by rank 0 next to the stock model's
(the same model without crossent, under the same engine): they agree to fp32 rounding.
"""

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import loss_parallel

import crossent.transformers as ct


def build(engine: str, patched: bool, patch_after: bool, mesh):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(mesh.device_type)
    if patched and not patch_after:
        ct.patch(model)
    if engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:  # tensor parallelism: the head's vocabulary rows split over the ranks
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        plan = {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
        wrapped = parallelize_module(model, mesh, plan)
    if patched and patch_after:
        ct.patch(model)  # every rank: the verification forward runs under the engine
    return wrapped, model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["ddp", "fsdp2", "tp"], required=True)
    parser.add_argument("--patch-after", action="store_true", help="patch after wrapping (default: before)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    mesh = init_device_mesh("cuda" if backend == "nccl" else "cpu", (dist.get_world_size(),))
    losses = {}
    for patched in (False, True):
        wrapped, model = build(args.engine, patched, args.patch_after, mesh)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        # tensor parallelism: every rank the same batch; the data-parallel engines: each rank its own
        g = torch.Generator().manual_seed(0 if args.engine == "tp" else dist.get_rank())
        losses[patched] = []
        for _ in range(args.steps):
            ids = torch.randint(0, 1000, (4, 64), generator=g).to(mesh.device_type)
            stock_tp = args.engine == "tp" and not patched  # the stock loss of a vocabulary-sharded head needs it
            with loss_parallel() if stock_tp else contextlib.nullcontext():
                loss = wrapped(input_ids=ids, labels=ids).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[patched].append(float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss))
    if dist.get_rank() == 0:
        for step, (stock, ours) in enumerate(zip(losses[False], losses[True])):
            print(f"{args.engine} step {step}: stock {stock:.6f}  crossent {ours:.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
