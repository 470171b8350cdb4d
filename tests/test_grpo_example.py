"""examples/grpo_step.py runs (CI), and its loss equals the same GRPO loss built on the materializing recipe."""

import math
import subprocess
import sys
from pathlib import Path

import torch
from _helpers import load_example

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo_step.py"


def _load():
    return load_example("grpo_step")


def test_example_runs():
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step=")]
    assert len(lines) == 3
    for line in lines:
        values = dict(part.split("=") for part in line.split())
        assert all(math.isfinite(float(v)) for v in values.values()), line


def test_example_loss_and_gradient_equal_the_materializing_recipe(monkeypatch):
    grpo = _load()
    torch.manual_seed(0)
    policy = grpo.TinyLM().double()
    tokens = torch.randint(0, grpo.VOCAB, (4, 12))
    mask = torch.zeros(4, 11, dtype=torch.bool)
    mask[:, 5:] = True
    advantages = torch.randn(4, dtype=torch.float64)
    old_lp = torch.randn(4, 11, dtype=torch.float64) * 0.1 - 4.0
    ref_lp = torch.randn(4, 11, dtype=torch.float64) * 0.1 - 4.0
    ours, _ = grpo.grpo_loss(policy, old_lp, ref_lp, tokens, advantages, mask)
    ours_grads = torch.autograd.grad(ours, list(policy.parameters()))

    def materialized(model, toks, completion_mask, entropy=False):
        logits = model.lm_head(model.hidden(toks[:, :-1])) / grpo.TEMPERATURE
        logp = torch.log_softmax(logits, -1)
        lp = torch.where(completion_mask, logp.gather(-1, toks[:, 1:, None]).squeeze(-1), 0.0)
        h = torch.where(completion_mask, -(logp.exp() * logp).sum(-1), 0.0)
        return crossent_result(lp, h if entropy else None)

    from crossent import TokenLogProbs as crossent_result

    monkeypatch.setattr(grpo, "token_log_probs", materialized)
    theirs, _ = grpo.grpo_loss(policy, old_lp, ref_lp, tokens, advantages, mask)
    theirs_grads = torch.autograd.grad(theirs, list(policy.parameters()))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
