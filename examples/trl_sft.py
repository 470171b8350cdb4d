"""TRL's SFTTrainer with its fused LM head on crossent: one call, ``crossent.trl.patch()``.

Every TRL trainer (SFT, DPO, GRPO, RLOO, KTO, ...) scores tokens through one fused-head function; ``patch()``
checks crossent's against TRL's on a probe and swaps it in, process-wide. Nothing else changes: same config,
same model, same logs. This script builds everything locally (a character tokenizer, a tiny random Llama, an
in-memory dataset: no downloads), trains a few SGD steps with TRL's own head and again with crossent's, and prints
each step's loss, entropy and token accuracy side by side.

    python examples/trl_sft.py               # 3 steps (the test suite runs this)
    python examples/trl_sft.py --steps 10
"""

from __future__ import annotations

import argparse
import os
import string
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402  (after the offline switch)
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

import crossent.trl  # noqa: E402

SPECIALS = ["<pad>", "<eos>"]
CHARS = string.ascii_lowercase + string.digits + " .,!?+-=*/"
VOCAB = 64  # the specials, the characters and unused ids up to a round size
TEXTS = ["two plus two is four.", "the cat sat on the mat.", "abc abc abc.", "hello, world!", "seven eight nine.",
         "one, two, three.", "red green blue.", "yes or no?"]  # fmt: skip


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character, built locally: a ``tokenizers`` WordLevel model over single characters."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARS))}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), VOCAB)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama of width 32 over the tokenizer's 64 ids, random weights from ``seed``."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def train(steps: int, output_dir: str) -> list:
    """SFT from the same seed; the logged history (one dict per step)."""
    args = trl.SFTConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=0.1,
                         optim="sgd", logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                         bf16=False, disable_tqdm=True, max_length=32)  # fmt: skip
    data = datasets.Dataset.from_dict({"text": TEXTS})
    trainer = trl.SFTTrainer(model=tiny_model(), args=args, train_dataset=data, processing_class=tiny_tokenizer())
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        stock = train(args.steps, out)
        crossent.trl.patch()  # verified against TRL's own function; crossent.trl.unpatch() undoes it
        try:
            ours = train(args.steps, out)
        finally:
            crossent.trl.unpatch()
    for i, (a, b) in enumerate(zip(stock, ours)):
        print(f"step={i + 1} loss_trl={a['loss']:.6f} loss_crossent={b['loss']:.6f} entropy_trl={a['entropy']:.6f} "
              f"entropy_crossent={b['entropy']:.6f} accuracy_trl={a['mean_token_accuracy']:.4f} "
              f"accuracy_crossent={b['mean_token_accuracy']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
