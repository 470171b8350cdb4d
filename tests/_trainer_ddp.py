"""HF ``Trainer`` under DDP, stock and patched: run by tests/test_engines.py as
``torchrun --standalone --nproc-per-node 2 tests/_trainer_ddp.py``.

Two optimizer steps of a tiny random Llama on 2 CPU ranks (``Trainer`` wraps it in DistributedDataParallel over
gloo; each rank its half of the batches), once stock and once with ``crossent.transformers.patch``. Rank 0
prints one line ``RESULT {json}``: both runs' step losses, the largest parameter difference after training, and
how many losses crossent computed in each run on that rank.
"""

import json
import sys
import tempfile

import torch
import torch.distributed as dist
import transformers

import crossent.transformers as ct
from _engine_workers import _crossent_losses  # counts crossent's losses in this process
from _helpers import padded_lm_rows  # tests/ is this script's directory: on sys.path

VOCAB, SEQ = 37, 10


def train(patched: bool, out_dir: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    if patched:
        ct.patch(model)
    rows = padded_lm_rows(VOCAB, SEQ, 8)
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        ddp_backend="gloo",
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    before = len(_crossent_losses)
    trainer.train()
    engine = type(trainer.model_wrapped).__name__
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    ran = len(_crossent_losses) - before
    return engine, losses, {n: p.detach().clone() for n, p in model.named_parameters()}, ran


def main():
    with tempfile.TemporaryDirectory() as tmp:
        engine, stock_losses, stock, stock_ran = train(False, tmp + "/stock")
        _, losses, params, ran = train(True, tmp + "/patched")
    drift = max((params[n] - stock[n]).abs().max().item() for n in stock)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"engine": engine, "world": dist.get_world_size(), "stock": stock_losses,
                                      "patched": losses, "param_diff": drift,
                                      "crossent_losses": {"stock": stock_ran, "patched": ran}}))  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
