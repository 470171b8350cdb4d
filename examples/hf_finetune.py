"""Fine-tune a small random-init Llama-style model with transformers' ``Trainer`` and crossent's loss.

One line turns crossent on: ``crossent.transformers.patch(model)``. The script trains the same model twice,
stock and patched, each in its own subprocess (so each peak RSS is its own), on the same synthetic data,
and prints both runs' losses and the memory crossent saved (the (tokens × vocabulary) logits, their
log-softmax and their gradient never exist in the patched run).

    python examples/hf_finetune.py            # vocabulary 32000, 4 × 256 tokens per step, 6 steps
    python examples/hf_finetune.py --tiny     # a smoke run (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile


def train(variant: str, args) -> dict:
    import torch
    import transformers

    import crossent.transformers as ct

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    if variant == "crossent":
        ct.patch(model)  # the whole integration; ct.unpatch(model) undoes it

    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(args.batch * args.accumulate * args.steps):
        ids = torch.randint(0, args.vocab, (args.seq,), generator=g)
        mask = (torch.arange(args.seq) < args.seq - (i % 4) * args.seq // 8).long()  # some right padding
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    training = transformers.TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accumulate,
        max_steps=args.steps, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=training, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"variant": variant, "losses": losses, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: vocabulary 512, 2 × 32 tokens, 2 steps")
    parser.add_argument("--out", default=None, help="Trainer's output_dir (nothing is saved there)")
    parser.add_argument("--variant", choices=["stock", "crossent"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = dict(vocab=512, hidden=32, batch=2, seq=32, accumulate=2, steps=2) if args.tiny else \
        dict(vocab=32000, hidden=128, batch=4, seq=256, accumulate=2, steps=6)  # fmt: skip
    for key, value in sizes.items():
        setattr(args, key, value)
    args.out = args.out or tempfile.mkdtemp(prefix="hf_finetune_")
    if args.variant:
        print(json.dumps(train(args.variant, args)))
        return

    results = {}
    for variant in ("stock", "crossent"):
        cmd = [sys.executable, __file__, "--variant", variant, "--out", args.out] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        losses = ", ".join(f"{x:.4f}" for x in results[variant]["losses"])
        print(f"{variant:8s} losses per step: {losses}   peak RSS {results[variant]['peak_rss'] / 2**20:.0f} MiB")
    saved = results["stock"]["peak_rss"] - results["crossent"]["peak_rss"]
    print(f"crossent saved {saved / 2**20:.0f} MiB of peak RSS "
          f"({results['crossent']['peak_rss'] / results['stock']['peak_rss']:.2f}× the stock run's)")  # fmt: skip


if __name__ == "__main__":
    main()
