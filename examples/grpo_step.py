"""One GRPO-style policy update on a tiny language model, with crossent.linear_token_log_probs as the only
log-probability primitive (docs/log_probs.md walks through it).

Per sampled completion token: the policy's log-probability and entropy (fused with the LM head: the N×V logits
never exist), the old policy's log-probability (sampling time, no grad) and a frozen reference policy's
(no grad: only the forward product runs). The loss: the clipped importance ratio times the group-normalized
advantage, a k3 KL estimate to the reference policy, and an entropy bonus, averaged over the completion tokens.

Run:  python examples/grpo_step.py  (CPU, a few seconds; prints the loss terms of each step)
"""

from __future__ import annotations

import copy

import torch

import crossent

VOCAB, DIM, PROMPT, COMPLETION, GROUP = 101, 32, 6, 10, 4
CLIP, KL_COEF, ENTROPY_COEF, TEMPERATURE = 0.2, 0.04, 0.01, 1.0


class TinyLM(torch.nn.Module):
    """Embedding → one GRU layer → LM head: the hidden states and the head weight are what crossent needs."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.body = torch.nn.GRU(DIM, DIM, batch_first=True)
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)

    def hidden(self, tokens):
        return self.body(self.embed(tokens))[0]  # (B, T, D)


def token_log_probs(model, tokens, completion_mask, entropy=False):
    """log π(token_t | tokens_<t) of every completion token (B, T − 1), and the entropy of each position."""
    hidden = model.hidden(tokens[:, :-1])  # position t predicts token t + 1
    targets = tokens[:, 1:].masked_fill(~completion_mask, -100)  # prompt and padding: ignored (0, no gradient)
    return crossent.linear_token_log_probs(hidden, model.lm_head.weight, targets, temperature=TEMPERATURE,
                                           entropy=entropy)  # fmt: skip


def sample(model, prompts):
    tokens = prompts
    with torch.no_grad():
        for _ in range(COMPLETION):
            logits = model.lm_head(model.hidden(tokens)[:, -1]) / TEMPERATURE
            tokens = torch.cat([tokens, torch.multinomial(torch.softmax(logits, -1), 1)], 1)
    return tokens


def reward(tokens):
    """A toy verifiable reward: the share of completion tokens below VOCAB / 4."""
    return (tokens[:, PROMPT:] < VOCAB // 4).float().mean(1)


def grpo_loss(policy, old_lp, ref_lp, tokens, advantages, completion_mask):
    out = token_log_probs(policy, tokens, completion_mask, entropy=True)
    ratio = torch.exp(out.log_probs - old_lp)
    clipped = torch.clamp(ratio, 1 - CLIP, 1 + CLIP)
    policy_term = -torch.minimum(ratio * advantages[:, None], clipped * advantages[:, None])
    log_r = ref_lp - out.log_probs
    kl = torch.exp(log_r) - log_r - 1  # k3 estimate of KL(π ‖ π_ref), ≥ 0
    per_token = policy_term + KL_COEF * kl - ENTROPY_COEF * out.entropy
    mask = completion_mask.float()
    loss = (per_token * mask).sum() / mask.sum()
    stats = {name: float((t.detach() * mask).sum() / mask.sum()) for name, t in
             (("ratio", ratio), ("kl", kl), ("entropy", out.entropy))}  # fmt: skip
    return loss, stats


def main(steps=3, seed=0):
    torch.manual_seed(seed)
    policy = TinyLM()
    reference_policy = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    prompts = torch.randint(0, VOCAB, (2, PROMPT)).repeat_interleave(GROUP, 0)  # 2 prompts × a group of 4
    history = []
    for step in range(steps):
        tokens = sample(policy, prompts)
        completion_mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
        completion_mask[:, PROMPT - 1 :] = True
        rewards = reward(tokens).view(-1, GROUP)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
        with torch.no_grad():  # forward product only
            old_lp = token_log_probs(policy, tokens, completion_mask).log_probs
            ref_lp = token_log_probs(reference_policy, tokens, completion_mask).log_probs
        loss, stats = grpo_loss(policy, old_lp, ref_lp, tokens, advantages, completion_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(dict(step=step, loss=float(loss), reward=float(rewards.mean()), **stats))
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in history[-1].items()))
    return history


if __name__ == "__main__":
    main()
