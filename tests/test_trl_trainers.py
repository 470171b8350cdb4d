"""TRL's trainers end to end with ``crossent.trl.patch()``: the same logs and final parameters as TRL alone.

A tiny random Llama (2 layers, width 32, vocabulary 64 characters) and a character tokenizer built locally, both
from examples/trl_sft.py (no hub: ``HF_HUB_OFFLINE=1``), datasets built in memory, CPU, fp32 (``bf16=False``: TRL's configs default to bf16 autocast, where TRL rounds each logits tile to bf16 and
crossent does not, so the two differ at bf16 rounding — benchmarks/trl_head.py measures which is closer to float64),
2 optimizer steps; each trainer runs twice, from the
same seed, once on TRL's fused head and once on crossent's. Their fused head is on by construction: every TRL
≥ 1.14 trainer calls ``add_fused_lm_head`` (no flag). Equal means fp32 rounding: the two heads sum the vocabulary
in different orders. Plain SGD: Adam's first step, ``lr · g / (|g| + ε)``, turns the rounding noise of a
near-zero gradient entry into a full ``± lr`` update, which would test Adam, not the head.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import transformers  # noqa: E402  (after the skips: optional dependencies)
import trl  # noqa: E402

import crossent.trl  # noqa: E402
from _helpers import load_example  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_sft.py"


def _example():
    """examples/trl_sft.py as a module: its local tokenizer and tiny model serve these tests too."""
    return load_example("trl_sft")


example = _example()
tiny_model, tiny_tokenizer = example.tiny_model, example.tiny_tokenizer
WORDS = ["two plus two", "the cat sat", "abc abc abc", "hello world", "seven eight", "one, two, three",
         "red green blue", "yes or no?"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved locally: GRPO and DPO build their reference model from the policy's path."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def common_args(tmp_path, **extra) -> dict:
    return dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=0.1, optim="sgd",
                logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True, bf16=False, **extra)  # fmt: skip


def run(make_trainer, patched: bool):
    """Train from the same seed with TRL's head or crossent's; the logged history and the final parameters."""
    crossent.trl.patch() if patched else crossent.trl.unpatch()
    calls = []
    real = crossent.trl._crossent_call

    def counted(*args):
        calls.append(len(args))
        return real(*args)

    crossent.trl._crossent_call = counted
    try:
        trainer = make_trainer()
        trainer.train()
    finally:
        crossent.trl._crossent_call = real
        crossent.trl.unpatch()
    assert bool(calls) == patched, f"crossent ran {len(calls)} times, patched={patched}"
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return trainer.state.log_history, params


def assert_same_training(make_trainer, logged):
    """Both runs log the same keys; ``logged`` (each logged at least once) agree step by step, and so do the
    final parameters. Times (``step_time``, ...) differ, of course, and are not compared."""
    history, params = run(make_trainer, patched=False)
    history_ct, params_ct = run(make_trainer, patched=True)
    steps = [h for h in history if "loss" in h]
    steps_ct = [h for h in history_ct if "loss" in h]
    assert len(steps) == len(steps_ct) == 2
    assert all(any(key in stock for stock in steps) for key in logged), (logged, steps)
    for step, (stock, ours) in enumerate(zip(steps, steps_ct)):
        assert stock.keys() == ours.keys()
        for key in (k for k in logged if k in stock):
            assert math.isfinite(stock[key]), (step, key, stock[key])
            torch.testing.assert_close(ours[key], stock[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {key}: {m}")
    for name, p in params.items():
        torch.testing.assert_close(params_ct[name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_sft_trainer(tmp_path):
    data = datasets.Dataset.from_dict({"text": [w + "." for w in WORDS]})
    tok = tiny_tokenizer()

    def make():
        args = trl.SFTConfig(**common_args(tmp_path), max_length=24)
        return trl.SFTTrainer(model=tiny_model(), args=args, train_dataset=data, processing_class=tok)

    assert_same_training(make, ["loss", "entropy", "mean_token_accuracy"])


def test_dpo_trainer(tmp_path, model_dir):
    data = datasets.Dataset.from_dict({"prompt": WORDS, "chosen": [" yes."] * 8, "rejected": [" no!"] * 8})
    tok = tiny_tokenizer()

    def make():
        args = trl.DPOConfig(**common_args(tmp_path), max_length=32)
        return trl.DPOTrainer(model=model_dir, args=args, train_dataset=data, processing_class=tok)

    assert_same_training(make, ["loss", "entropy", "mean_token_accuracy", "logps/chosen", "logits/chosen",
                                "rewards/margins"])  # fmt: skip


def _reward_length(completions, **kwargs):
    return [float(len(c)) / 8 for c in completions]


def test_grpo_trainer(tmp_path, model_dir):
    data = datasets.Dataset.from_dict({"prompt": WORDS})
    tok = tiny_tokenizer()

    def make():
        args = trl.GRPOConfig(**common_args(tmp_path), num_generations=4, max_completion_length=8,
                              generation_batch_size=8, beta=0.1, temperature=0.9)  # fmt: skip
        return trl.GRPOTrainer(model=model_dir, reward_funcs=_reward_length, args=args, train_dataset=data,
                               processing_class=tok)  # fmt: skip

    assert_same_training(make, ["loss", "entropy", "reward", "kl"])


def test_example_runs():
    """examples/trl_sft.py trains with TRL's head and with crossent's and prints the same numbers."""
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step=")]
    assert len(lines) == 2
    for line in lines:
        values = {k: float(v) for k, v in (part.split("=") for part in line.split()) if k != "step"}
        for what in ("loss", "entropy", "accuracy"):
            assert math.isfinite(values[f"{what}_trl"]), line
            torch.testing.assert_close(values[f"{what}_crossent"], values[f"{what}_trl"], rtol=1e-5, atol=1e-6)
