"""crossent.transformers against the stock transformers forward: the same loss, gradients and training.

Tiny random-init models (hidden 32, 1 layer, vocabulary 96 — not a power of two —, sequences of 11), fp32:
the patched loss equals the stock loss and every parameter's gradient equals the stock one to
``1e-5 × max |stock gradient|`` per parameter. ``initializer_range=0.2`` gives logits of a few units, so
the softcap, scales and smoothing terms are far from their small-logit linear regime.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
import crossent.transformers as ct  # noqa: E402
from _helpers import padded_lm_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 96, 11
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2)  # fmt: skip

# one tiny config per model family, each covering what the integration must get right for it
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),  # biases in attention
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=1.5),  # softcap, tied
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                            initializer_range=0.2),  # tied embeddings, LayerNorm, no rotary  # fmt: skip
    "phi3": lambda: transformers.Phi3Config(**SMALL, pad_token_id=0),
    "cohere": lambda: transformers.CohereConfig(**SMALL, logit_scale=0.25),  # logits × 0.25
    "granite": lambda: transformers.GraniteConfig(**SMALL, logits_scaling=4.0, embedding_multiplier=2.0,
                                                  residual_multiplier=0.5),  # logits ÷ 4  # fmt: skip
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2,
                                                  output_router_logits=True, router_aux_loss_coef=0.5),  # aux loss  # fmt: skip
}


def _model(kind, seed=0, cls=None):
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    model = (cls or transformers.AutoModelForCausalLM.from_config)(config)
    return model.float().train()


def _batch(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return ids, labels


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks (GPT-2's 0.1) in the stock and the patched forward
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_match(got, want):
    assert got.keys() == want.keys()
    for name, g in want.items():
        scale = g.abs().max().item()
        worst = (got[name] - g).abs().max().item()
        assert worst <= 1e-5 * scale + 1e-12, f"{name}: max |diff| {worst:.3g}, max |stock grad| {scale:.3g}"


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_loss_and_every_gradient_equal_stock(kind):
    model = _model(kind)
    ids, labels = _batch()
    stock, stock_grads = _loss_and_grads(model, input_ids=ids, labels=labels)
    assert ct.patch(model) is model
    out, grads = _loss_and_grads(model, input_ids=ids, labels=labels)
    assert type(out) is type(stock) and out.logits is None
    torch.testing.assert_close(out.loss, stock.loss, rtol=1e-6, atol=1e-6)
    assert out.loss.dtype == torch.float32
    _assert_grads_match(grads, stock_grads)
    if kind == "mixtral":  # the router term is really there
        assert out.aux_loss is not None and abs(out.aux_loss.item()) > 0


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_num_items_in_batch_and_shift_labels_as_stock(kind):
    model = _model(kind)
    ids, labels = _batch()
    shifted = torch.randint(0, VOCAB, labels.shape)
    shifted[2, :5] = -100
    cases = [dict(labels=labels, num_items_in_batch=torch.tensor(40)), dict(labels=labels, shift_labels=shifted),
             dict(labels=labels, shift_labels=shifted, num_items_in_batch=17)]  # fmt: skip
    stock = [_loss_and_grads(model, input_ids=ids, **case) for case in cases]
    ct.patch(model)
    for case, (want, want_grads) in zip(cases, stock):
        got, grads = _loss_and_grads(model, input_ids=ids, **case)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
        _assert_grads_match(grads, want_grads)


def test_options_keep_logits_positional_labels_and_tuples():
    model = _model("cohere")
    ids, labels = _batch()
    stock = model(input_ids=ids, labels=labels)
    ct.patch(model, keep_logits=True)
    out = model(ids, None, None, None, None, labels)  # labels by position
    torch.testing.assert_close(out.logits, stock.logits)
    torch.testing.assert_close(out.loss, stock.loss, rtol=1e-6, atol=1e-6)
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], stock.loss, rtol=1e-6, atol=1e-6)
    # the user's options reach crossent: smoothing and z-loss as crossent.cross_entropy defines them
    ct.patch(model, label_smoothing=0.1, z_loss=1e-3, chunk_size=5)
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    want = crossent_loss(stock.logits, target, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want, rtol=1e-6, atol=1e-6)


def crossent_loss(logits, target, **options):
    import crossent

    return crossent.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), **options)


def test_without_labels_the_original_forward_runs_and_generate_is_unchanged():
    model = _model("llama").eval()
    ids, _ = _batch()
    want_logits = model(input_ids=ids).logits
    want = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    ct.patch(model)
    torch.testing.assert_close(model(input_ids=ids).logits, want_logits)
    assert torch.equal(model.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0), want)


def test_unpatch_restores_and_deepcopy_binds_the_copy():
    model = _model("llama")
    ids, labels = _batch()
    ct.patch(model)
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin and ct.is_patched(twin)
    assert twin(input_ids=ids, labels=labels).logits is None
    ct.unpatch(model)
    assert not ct.is_patched(model) and "forward" not in model.__dict__
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (3, SEQ, VOCAB)
    assert ct.unpatch(model) is model  # unpatching twice is harmless


def test_gradient_checkpointing_and_tied_embeddings():
    model = _model("gpt2")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.gradient_checkpointing_enable()
    ids, labels = _batch()
    stock, stock_grads = _loss_and_grads(model, input_ids=ids, labels=labels)
    ct.patch(model)
    out, grads = _loss_and_grads(model, input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, stock.loss, rtol=1e-6, atol=1e-6)
    _assert_grads_match(grads, stock_grads)


@pytest.mark.parametrize("mode", ["bf16 weights", "autocast"])
def test_bf16_weights_and_autocast(mode):
    # the reference is the fp32 loss of the same weights; crossent's 16-bit loss comes from fp32 logits, so its
    # error is at most the stock 16-bit forward's (which rounds the logits to bf16) plus a small tolerance
    model = _model("llama")
    ids, labels = _batch()
    if mode == "bf16 weights":
        model = model.to(torch.bfloat16)
    exact = copy.deepcopy(model).float()(input_ids=ids, labels=labels).loss

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        return out.loss, model.lm_head.weight.grad

    stock, stock_grad = run()
    ct.patch(model)
    got, grad = run()
    assert got.dtype == torch.float32 and grad.dtype == model.lm_head.weight.dtype
    assert abs(got.item() - exact.item()) <= abs(stock.item() - exact.item()) + 2e-2
    torch.testing.assert_close(grad.float(), stock_grad.float(), rtol=0.05, atol=0.05 * stock_grad.abs().max().item())


class _Doubled(transformers.LlamaForCausalLM):
    """A model that transforms its logits after the head in a way no config names."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        logits = out.logits * 2
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def test_an_unrecognised_post_head_transform_is_refused_and_the_model_left_alone():
    model = _model("llama", cls=_Doubled)
    with pytest.raises(ct.UnsupportedModelError, match=r"_Doubled.*logits differ.*max \|difference\|"):
        ct.patch(model)
    assert not ct.is_patched(model) and "forward" not in model.__dict__
    with pytest.raises(ct.UnsupportedModelError, match="_Doubled"):  # token_log_probs verifies as well
        ct.token_log_probs(model, _batch()[0])


def test_a_wrong_config_claim_is_refused():
    model = _model("llama")
    model.config.logit_scale = 0.5  # the config says Cohere-like, the model does not scale
    with pytest.raises(ct.UnsupportedModelError, match="logit_scale=0.5"):
        ct.patch(model)


class _LoraLike(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base_layer, self.lora_A = base, nn.Linear(base.in_features, 2, bias=False)

    def forward(self, x):
        return self.base_layer(x)


@pytest.mark.parametrize("head, match", [
    (lambda h: _LoraLike(h), "PEFT adapter"),
    (lambda h: nn.Sequential(h), "not a plain torch.nn.Linear"),
])  # fmt: skip
def test_unsupported_heads_are_refused(head, match):
    model = _model("llama")
    model.lm_head = head(model.lm_head)
    with pytest.raises(ct.UnsupportedModelError, match=match):
        ct.patch(model)
    assert not ct.is_patched(model)


def test_a_head_adapter_added_after_patching_is_refused_at_the_call():
    model = ct.patch(_model("llama"))
    model.lm_head = _LoraLike(model.lm_head)
    ids, labels = _batch()
    with pytest.raises(ct.UnsupportedModelError, match="PEFT adapter"):
        model(input_ids=ids, labels=labels)


def test_a_head_sharded_other_than_over_its_vocabulary_is_refused():
    # Shard(0) (tensor parallelism's vocabulary shards) and FSDP2's shards run: tests/test_engines.py; Shard(1)
    # splits the hidden dim, which crossent does not run: the error names the placement
    code = (
        "import torch, torch.distributed as dist, transformers, crossent.transformers as ct\n"
        "from torch.testing._internal.distributed.fake_pg import FakeStore\n"
        "from torch.distributed.tensor import distribute_tensor, Shard, init_device_mesh\n"
        "dist.init_process_group('fake', store=FakeStore(), rank=0, world_size=2)\n"
        "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                               num_attention_heads=2, num_key_value_heads=2)\n"
        "m = transformers.LlamaForCausalLM(cfg)\n"
        "mesh = init_device_mesh('cpu', (2,))\n"
        "m.lm_head.weight = torch.nn.Parameter(distribute_tensor(m.lm_head.weight.detach(), mesh, [Shard(1)]))\n"
        "try:\n    ct.patch(m)\nexcept ct.UnsupportedModelError as e:\n    print('REFUSED', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in result.stdout and "Shard(dim=1)" in result.stdout, result.stdout + result.stderr


def test_model_decided_options_are_refused():
    model = _model("llama")
    with pytest.raises(TypeError, match="reduction"):
        ct.patch(model, reduction="mean")
    with pytest.raises(ValueError, match="label_smoothing"):
        ct.patch(model, label_smoothing=2.0)
    assert not ct.is_patched(model)


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
@pytest.mark.parametrize("patched", [False, True])
def test_token_log_probs_equal_the_stock_logits(kind, patched):
    model = _model(kind)
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    temperature = 0.7
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / temperature
    log_p = logits.log_softmax(-1)
    valid = mask[:, 1:].bool()
    want_lp = torch.where(valid, log_p.gather(-1, ids[:, 1:, None])[..., 0], 0.0)
    want_h = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    want_grad = torch.autograd.grad((want_lp.sum() + want_h.sum()), model.lm_head.weight)[0]
    if patched:
        ct.patch(model)
    got = ct.token_log_probs(model, ids, attention_mask=mask, temperature=temperature, entropy=True)
    assert got.log_probs.shape == (3, SEQ - 1) and got.log_probs.dtype == torch.float32
    torch.testing.assert_close(got.log_probs, want_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.entropy, want_h, rtol=1e-6, atol=1e-6)
    grad = torch.autograd.grad(got.log_probs.sum() + got.entropy.sum(), model.lm_head.weight)[0]
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())
    assert ct.token_log_probs(model, ids).entropy is None


def _trainer_params(patched, tmp_path):
    pytest.importorskip("accelerate")
    model = _model("llama")
    if patched:
        ct.patch(model)
    rows = padded_lm_rows(VOCAB, SEQ, 12)  # uneven padding
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("patched" if patched else "stock")), per_device_train_batch_size=2,
        gradient_accumulation_steps=3, max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_with_gradient_accumulation_trains_as_stock(tmp_path):
    start = {n: p.detach().clone() for n, p in _model("llama").named_parameters()}
    stock = _trainer_params(False, tmp_path)
    patched = _trainer_params(True, tmp_path)
    for name, want in stock.items():
        step = (want - start[name]).abs().max().item()
        worst = (patched[name] - want).abs().max().item()
        assert worst <= 1e-5 * step + 1e-7, f"{name}: max |diff| {worst:.3g}, max |stock update| {step:.3g}"
    assert any((stock[n] - start[n]).abs().max() > 0 for n in stock)


def test_importing_crossent_does_not_import_transformers():
    code = "import sys, crossent; assert 'transformers' not in sys.modules, 'imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_example_runs(tmp_path):
    pytest.importorskip("accelerate")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_finetune.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "saved" in result.stdout
