"""Spawn targets for tests/test_deepspeed.py: crossent under DeepSpeed ZeRO on 2 gloo ranks (CPU accelerator).

One job runs every case in one spawn: the same tiny Llama under the same ZeRO engine, stock and patched (before
or after ``deepspeed.initialize``; fp32, and bf16 against the fp32 run), two optimizer steps; each case compares
the loss and every parameter's full gradient (``safe_get_full_grad``) at both steps and returns a problem string,
or None.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported (the spawn imports this module first)

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

import crossent.transformers as ct  # noqa: E402
from _engine_workers import VOCAB, _batch, _loss, _model, _no_worse, _same  # noqa: E402


def _config(stage, bf16):
    """ZeRO ``stage``; every parameter partitioned (no persistence threshold: the tiny head would stay whole)."""
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": bf16},  # bf16 parameters and activations, fp32 master weights
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


def _engine(model, stage, bf16):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_config(stage, bf16))
    return engine


def _steps(engine, rank, loss_fn, n=2):
    """``n`` steps on this rank's batches: [(loss, {name: full gradient})] before each optimizer step."""
    out = []
    for step in range(n):
        ids, labels = _batch(10 + 2 * step + rank)
        loss = loss_fn(engine, ids, labels)
        engine.backward(loss)
        grads = {name: safe_get_full_grad(p).float().clone() for name, p in engine.module.named_parameters()}
        out.append((loss.detach().float(), grads))
        engine.step()
    return out


def _lm_loss(engine, ids, labels):
    return _loss(engine, ids, labels, engine.module)


def _policy_loss(engine, ids, labels, stock=False):
    """A policy-gradient-shaped loss of the per-token log-probs and entropy (fixed advantages)."""
    advantages = torch.linspace(-1.0, 1.0, ids[:, 1:].numel()).view(ids[:, 1:].shape)
    if stock:
        logp = torch.log_softmax(engine(input_ids=ids).logits[:, :-1].float(), dim=-1)
        log_probs, entropy = logp.gather(-1, ids[:, 1:, None])[..., 0], -(logp.exp() * logp).sum(-1)
    else:
        out = ct.token_log_probs(engine.module, ids, entropy=True)
        log_probs, entropy = out.log_probs, out.entropy
    return -(advantages * log_probs).sum() - 0.1 * entropy.sum()


def _tied_model():
    """``_model()`` with its head's weight tied to the input embedding (one parameter, two modules)."""
    model = _model()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _run(stage, rank, when=None, loss_fn=_lm_loss, make=_model, bf16=False, **patch_options):
    model = make()
    if when == "before":
        ct.patch(model, **patch_options)
    engine = _engine(model, stage, bf16)
    if stage == 3:  # ZeRO-3 partitions the head: outside its forward each rank holds a (0,) placeholder
        head = engine.module.get_output_embeddings().weight
        assert head.shape == (0,) and tuple(head.ds_shape) == (VOCAB, 16), (head.shape, head.ds_shape)
    if when == "after":
        ct.patch(engine.module, **patch_options)
    return _steps(engine, rank, loss_fn)


def _compare(got, want):
    """Both steps' loss and gradients equal; the second step's loss differs from the first (the step ran)."""
    if not got[0][0] != got[1][0]:
        return f"the optimizer step changed nothing: losses {got[0][0]}, {got[1][0]}"
    return "; ".join(p for p in (_same(g, w) for g, w in zip(got, want)) if p) or None


def _compare_bf16(got, stock, exact):
    """Each step: crossent's distance to the fp32 run at most twice stock's (``_no_worse``)."""
    return "; ".join(p for p in (_no_worse(*steps) for steps in zip(got, stock, exact)) if p) or None


def _case(out, name, fn, *want, compare=_compare):
    try:
        out[name] = compare(fn(), *want)
    except Exception as e:  # noqa: BLE001 - the message goes back to the parent test
        out[name] = f"{type(e).__name__}: {str(e)[:800]}"


def zero_job(rank, world):
    for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank), ("LOCAL_SIZE", world)):
        os.environ[key] = str(value)
    # DeepSpeed's CPU communication backend JIT-compiles its shared-memory all-reduce (used for inference only)
    # when the op is marked compatible: minutes of C++ build on a cold cache, and a compiler. Training uses gloo.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for stage in (2, 3):
        want = _run(stage, rank)
        for when in ("before", "after"):
            _case(out, f"ZeRO-{stage}, patch {when} initialize", lambda: _run(stage, rank, when), want)
        if stage == 3:
            _case(out, "ZeRO-3, patch before initialize, keep_logits",
                  lambda: _run(3, rank, "before", keep_logits=True), want)  # fmt: skip
    exact, stock = want, _run(3, rank, bf16=True)
    for when in ("before", "after"):
        _case(out, f"ZeRO-3, patch {when} initialize, bf16", lambda: _run(3, rank, when, bf16=True), stock, exact,
              compare=_compare_bf16)  # fmt: skip
    want = _run(3, rank, make=_tied_model)  # the head's weight is the input embedding's, fetched twice a forward
    _case(out, "ZeRO-3, patch before initialize, tied embeddings", lambda: _run(3, rank, "before", make=_tied_model),
          want)  # fmt: skip
    want = _run(3, rank, loss_fn=functools.partial(_policy_loss, stock=True))
    _case(out, "ZeRO-3, token_log_probs", lambda: _run(3, rank, loss_fn=_policy_loss), want)
    dist.barrier()
    return out
