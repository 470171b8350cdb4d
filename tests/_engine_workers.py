"""Spawn targets for tests/test_engines.py: crossent under PyTorch's training engines on 2 gloo ranks.

One job (``engines``) runs every case in one spawn (each rank imports transformers once): DDP, FSDP2 in the
layouts people use (patched before or after ``fully_shard``, the root's ``reshard_after_forward``, the head in
its own unit, bf16 ``MixedPrecisionPolicy``, accelerate's FSDP2 plugin's exact calls), tensor parallelism
(a ``ColwiseParallel`` head: ``patch``, ``token_log_probs`` and the functional API with DTensor weights). Each
case compares the patched model with the stock model under the same engine — the loss and every parameter's
gradient as full tensors — and returns a problem string, or None.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

import crossent
import crossent.transformers as ct

VOCAB = 37  # odd: tensor parallelism's Shard(0) gives the ranks 19 + 18 rows
BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
# accelerate 1.15's FSDP2 plugin with mixed_precision="bf16" (FullyShardedDataParallelPlugin.set_mixed_precision)
ACCELERATE_BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
                                       output_dtype=torch.bfloat16)  # fmt: skip


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    return transformers.LlamaForCausalLM(config).train()


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 10), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    return ids, labels


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


_crossent_losses = []  # one entry per loss crossent's patched forward computed (this spawned process only)


def _counted(head_loss):
    def counted(*args, **kwargs):
        _crossent_losses.append(1)
        return head_loss(*args, **kwargs)

    return counted


ct._head_loss = _counted(ct._head_loss)


def _loss(model, ids, labels, module):
    """``model``'s loss on the batch, checked to be crossent's exactly when ``module`` (the model ``patch`` was
    given) is patched: an engine that bypassed the patched forward would compare stock with stock, and pass."""
    before = len(_crossent_losses)
    loss = model(input_ids=ids, labels=labels).loss
    ran, patched = len(_crossent_losses) - before, ct.is_patched(module)
    if ran != int(patched):
        raise AssertionError(f"crossent computed {ran} losses in one forward of a model with patched={patched}")
    return loss


def _step(model, ids, labels, params=None, context=contextlib.nullcontext):
    """One forward + backward: (loss, {name: full gradient}) — every rank gathers every gradient alike."""
    params = params or model
    with context():
        loss = _loss(model, ids, labels, params)
        loss.backward()
    return _full(loss.detach()).float(), {n: _full(p.grad).float() for n, p in params.named_parameters()}


def _problem(fn):
    """None if ``fn()`` raises nothing, else the comparator's message (first lines)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message goes back to the parent test
        return f"{type(e).__name__}: {str(e)[:600]}"
    return None


def _same(got, want, rtol=1e-5, atol=1e-6):
    """Loss and every gradient of two ``_step`` results, fp32 (tolerance: ~10 fp32 ulps of the values)."""
    (loss, grads), (want_loss, want_grads) = got, want

    def check():
        torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=atol)
        assert sorted(grads) == sorted(want_grads), (sorted(grads), sorted(want_grads))
        for name in grads:
            scale = want_grads[name].abs().max().item()
            torch.testing.assert_close(grads[name], want_grads[name], rtol=rtol, atol=atol * max(scale, 1.0),
                                       msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip

    return _problem(check)


def _no_worse(got, stock, exact):
    """A 16-bit run: crossent's distance to the fp32 run ``exact`` is at most twice stock's (its own 16-bit
    rounding) plus 1e-3 of the values' scale — loss and every gradient."""
    (loss, grads), (s_loss, s_grads), (e_loss, e_grads) = got, stock, exact
    bad = []
    for name, g, s, e in [("loss", loss, s_loss, e_loss)] + [(n, grads[n], s_grads[n], e_grads[n]) for n in e_grads]:
        mine, theirs = (g - e).abs().max().item(), (s - e).abs().max().item()
        if not mine <= 2 * theirs + 1e-3 * max(e.abs().max().item(), 1e-3):
            bad.append(f"{name}: |crossent − fp32| {mine:.3g} > 2 × |stock − fp32| {theirs:.3g} + tol")
    return "; ".join(bad) or None


# --- DDP -----------------------------------------------------------------------------------------------


def ddp_cases(rank):
    ids, labels = _batch(10 + rank)  # each rank its own data; DDP averages the gradients
    stock = DistributedDataParallel(_model())
    want = _step(stock, ids, labels, stock.module)
    out = {}
    for when in ("before", "after"):
        model = _model()
        if when == "before":
            ct.patch(model)
        wrapped = DistributedDataParallel(model)
        if when == "after":
            ct.patch(wrapped.module)
        out[f"DDP, patch {when} wrapping"] = _same(_step(wrapped, ids, labels, model), want)
    return out


# --- FSDP2 ---------------------------------------------------------------------------------------------


def _shard(model, mp=None, root_reshard=None, head_unit=False, accelerate=False):
    kw = {} if mp is None else {"mp_policy": mp}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    if accelerate:  # accelerate 1.15 fsdp2_prepare_model: layers, the input embedding, [final norm, head], root
        fully_shard(model.model.embed_tokens, **kw)
        fully_shard([model.model.norm, model.lm_head], **kw, reshard_after_forward=False)
    if head_unit:
        fully_shard(model.lm_head, **kw, reshard_after_forward=True)
    fully_shard(model, **kw, **({} if root_reshard is None else {"reshard_after_forward": root_reshard}))
    return model


FSDP_CASES = {
    "patch before fully_shard": dict(patch="before"),
    "patch after fully_shard": dict(patch="after"),
    "root reshard_after_forward=False": dict(patch="after", root_reshard=False),
    "root reshard_after_forward=True": dict(patch="after", root_reshard=True),
    "head in its own unit, reshard_after_forward=True": dict(patch="after", head_unit=True),
    "bf16 MixedPrecisionPolicy, patch before": dict(patch="before", mp=BF16),
    "bf16 MixedPrecisionPolicy, patch after": dict(patch="after", mp=BF16),
    "accelerate's FSDP2 plugin (bf16)": dict(patch="after", mp=ACCELERATE_BF16, accelerate=True),
    "accelerate's FSDP2 plugin (fp32)": dict(patch="after", accelerate=True),
}


def fsdp_cases(rank):
    ids, labels = _batch(20 + rank)
    exact = _step(_shard(_model()), ids, labels)
    stock, out = {}, {}
    for name, case in FSDP_CASES.items():
        layout = {k: v for k, v in case.items() if k != "patch"}
        key = repr(sorted(layout.items(), key=lambda kv: kv[0]))
        if key not in stock:
            stock[key] = _step(_shard(_model(), **layout), ids, labels)
        model = _model()
        if case["patch"] == "before":
            ct.patch(model)
        _shard(model, **layout)
        if case["patch"] == "after":
            ct.patch(model)  # collective: the verification forward runs under FSDP2 on every rank
        got = _step(model, ids, labels)
        out["FSDP2, " + name] = _no_worse(got, stock[key], exact) if "mp" in case else _same(got, stock[key])
    # the verification forward (no_grad, under FSDP) leaves the units as it found them: the optimizer made after
    # patch() holds FSDP's sharded parameters (not the unsharded root's, whose updates would be lost) and the
    # step after its step equals stock's
    second = [_second_step(_shard(_model()), ids, labels, patch) for patch in (False, True)]
    out["FSDP2, patch after fully_shard, the step after an optimizer step"] = _same(second[1], second[0])
    # token_log_probs with the head in its own resharding unit: backward recomputes the logits, so it needs the
    # head unsharded again (FSDP's pre-backward hook, registered on the result). Against the unsharded model, on
    # the same ids on both ranks (FSDP averages the ranks' gradients): values and every gradient
    same_ids, _ = _batch(50)
    results = [_scored(m, same_ids) for m in (_shard(_model(), head_unit=True), _model())]
    out["FSDP2, token_log_probs, head in its own unit"] = _same(*results)
    return out


def _second_step(model, ids, labels, patch):
    if patch:
        ct.patch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # as users do: after patch, before training
    _step(model, ids, labels)
    optimizer.step()
    model.zero_grad()
    return _step(model, ids, labels)


def _scored(model, ids, **kw):
    """token_log_probs and entropy (stacked) and every full gradient of ``Σ log p + ½ Σ H``."""
    lp = ct.token_log_probs(model, ids, entropy=True, **kw)
    (lp.log_probs.sum() + 0.5 * lp.entropy.sum()).backward()
    return torch.stack([lp.log_probs, lp.entropy]).detach(), {n: _full(p.grad) for n, p in model.named_parameters()}


# --- tensor parallelism --------------------------------------------------------------------------------


def _tp(model, mesh):
    plan = {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    return parallelize_module(model, mesh, plan)


def tp_cases(rank):
    mesh = init_device_mesh("cpu", (2,))
    ids, labels = _batch(30)  # the same batch on both ranks: tensor parallelism replicates the data
    stock = _step(_tp(_model(), mesh), ids, labels, context=loss_parallel)
    out = {"TP, the stock model equals the unsharded one": _same(stock, _step(_model(), ids, labels))}
    for when in ("before", "after"):
        model = _model()
        if when == "before":
            ct.patch(model)
        _tp(model, mesh)
        if when == "after":
            ct.patch(model)
        out[f"TP (ColwiseParallel head), patch {when} parallelize_module"] = _same(_step(model, ids, labels), stock)
    # token_log_probs on the TP model against the unsharded model: values and every gradient
    out["TP, token_log_probs"] = _same(*[_scored(m, ids, temperature=0.7) for m in (_tp(_model(), mesh), _model())])
    out.update(_functional_cases(mesh))
    return out


def _functional_cases(mesh):
    """linear_cross_entropy / linear_token_log_probs / linear_distill_loss with DTensor weights (Shard(0), and
    Replicate()) against the full tensors: a plain result, equal values, gradients equal to the full ones."""
    g = torch.Generator().manual_seed(40)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    w, b = torch.randn(VOCAB, 8, generator=g, dtype=torch.float64), torch.randn(VOCAB, generator=g, dtype=torch.float64)
    x_t, w_t = torch.randn(3, 5, 6, generator=g, dtype=torch.float64), torch.randn(VOCAB, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, VOCAB, (3, 5), generator=g)
    target[0, :2] = -100
    ids = torch.randint(0, VOCAB, (3, 5, 2), generator=g)

    def fns(xx, ww, bb, teacher):
        return {
            "linear_cross_entropy": lambda: crossent.linear_cross_entropy(
                xx, ww, target, linear_bias=bb, label_smoothing=0.1, z_loss=1e-3, chunk_size=4),
            "linear_token_log_probs": lambda: sum(t.sum() * c for t, c in zip(crossent.linear_token_log_probs(
                xx, ww, ids, linear_bias=bb, entropy=True, temperature=1.3, chunk_size=4), (1.0, 0.5))),
            "linear_distill_loss": lambda: crossent.linear_distill_loss(
                xx, ww, x_t, teacher, linear_bias=bb, beta=0.5, target=target, hard_weight=0.3, chunk_size=4),
        }  # fmt: skip

    out = {}
    for placement in (Shard(0), Replicate()):
        for name in fns(x, w, b, w_t):
            full = [t.clone().requires_grad_() for t in (x, w, b)]
            want = fns(*full, w_t)[name]()
            want.backward()
            mine = [DTensor.from_local(x.clone(), mesh, [Replicate()]).requires_grad_()]
            mine += [distribute_tensor(t.clone(), mesh, [placement]).requires_grad_() for t in (w, b)]
            got = fns(*mine, distribute_tensor(w_t, mesh, [placement]))[name]()
            got.backward()

            def check(got=got, want=want, mine=mine, full=full):
                assert type(got) is torch.Tensor, f"a {type(got).__name__} result, not a plain tensor"
                torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
                for what, m, f in zip(("dX", "dW", "db"), mine, full):
                    torch.testing.assert_close(_full(m.grad), f.grad, rtol=1e-10, atol=1e-12, msg=lambda s: f"{what}: {s}")

            out[f"functional {name}, weight {placement}"] = _problem(check)
    hidden_split = distribute_tensor(w.clone(), mesh, [Shard(1)])
    out["error: Shard(1) weight"] = _error(lambda: crossent.linear_cross_entropy(x, hidden_split, target))
    seq = DTensor.from_local(x.clone(), mesh, [Shard(0)])
    out["error: sharded input"] = _error(
        lambda: crossent.linear_cross_entropy(seq, distribute_tensor(w, mesh, [Shard(0)]), target))
    return out


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, str(e))
    return None


def engines_job(rank, world):
    return {"ddp": ddp_cases(rank), "fsdp": fsdp_cases(rank), "tp": tp_cases(rank)}


# --- 2-D mesh: FSDP2 over one dim, tensor parallelism over the other (4 ranks) ---------------------------------


def mesh2d_job(rank, world):
    """A (dp 2, tp 2) mesh: a ColwiseParallel head over "tp", fully_shard per layer and on the root over "dp";
    patched before or after both, against the stock model under the same layout (loss_parallel)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def build(patch):
        model = _model()
        if patch == "before":
            ct.patch(model)
        _tp(model, mesh["tp"])
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        if patch == "after":
            ct.patch(model)
        return model

    ids, labels = _batch(60 + mesh["dp"].get_local_rank())  # the same batch within a tp group
    stock = _step(build(None), ids, labels, context=loss_parallel)
    return {f"2-D mesh, patch {when}": _same(_step(build(when), ids, labels), stock) for when in ("before", "after")}
