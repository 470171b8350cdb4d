"""crossent for Hugging Face transformers causal LMs: the training loss without the (N, V) logits.

``patch(model)`` makes ``model(input_ids, labels=...)`` compute its loss with
:func:`crossent.linear_cross_entropy` from the hidden states the model feeds its output embedding, so the
N × V logits are never formed; ``token_log_probs(model, input_ids)`` gives per-token log-probabilities
(and entropy) for RL the same way. Generic by construction, no list of model classes and no copy of any
model's forward (house style rule 12): it uses only the model's public pieces —

- ``model.get_output_embeddings()``, which must be a plain ``torch.nn.Linear`` (weight, optional bias);
- the hidden states that head receives, whatever norm or scaling came before it, recorded by temporarily
  replacing the head's ``forward`` (for the duration of one call) with a capture that returns a (..., 0)
  placeholder instead of the logits;
- the post-head transforms named in the config: ``final_logit_softcapping`` (Gemma 2/3: ``κ tanh(z/κ)``),
  ``logit_scale`` (Cohere: ``z · s``), ``logits_scaling`` (Granite: ``z / s``), passed to crossent as its
  ``softcap`` and ``logit_scale`` options;
- the model's own forward, called without ``labels``; its ``aux_loss`` output (MoE routers) is added with
  the model's ``router_aux_loss_coef`` as the stock forward adds it.

Verified, not assumed: ``patch`` runs the unpatched model once on a small random batch (with labels, and
with ``output_router_logits=True`` where the forward takes it) and compares (1) the model's logits with
crossent's reconstruction from the captured hidden states and (2) the model's loss with the patched loss.
A mismatch raises :class:`UnsupportedModelError` naming the model class and the discrepancy, and the model
is left unpatched. See ``docs/transformers.md``.

Training engines (docs/distributed.md, "Training engines"): the loss, ``token_log_probs`` and the verification run
inside the head's call, where DDP, FSDP2 (before or after ``fully_shard``; then ``patch`` is collective), DeepSpeed
ZeRO-3 (before or after ``deepspeed.initialize``: a nested call of the head, under ZeRO-3's own hooks) and tensor
parallelism (a ``ColwiseParallel`` head: vocab-parallel, no gather) present the head.

Importing :mod:`crossent` never imports transformers; this module needs it (``pip install
"crossent[transformers]"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import transformers as _transformers  # noqa: F401  (the dependency this module integrates with)
    from transformers.utils import ModelOutput
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        'crossent.transformers needs the transformers package: pip install "crossent[transformers]"'
    ) from error

import crossent
from crossent import TokenLogProbs
from crossent._dtensor import is_dtensor
from crossent._options import LinearOptions
from crossent.functional import autocast_operands, linear_cross_entropy_with_options, logit_scaled

__all__ = ["patch", "unpatch", "is_patched", "token_log_probs", "head_transforms", "HeadTransforms",
           "TokenLogProbs", "UnsupportedModelError"]  # fmt: skip

IGNORE_INDEX = -100  # transformers' label for "no loss here" (ForCausalLMLoss's default)

# options the model decides (its reduction, its ignore label, its own post-head transforms)
_MODEL_DECIDED = ("reduction", "ignore_index", "softcap", "logit_scale", "return_stats", "weight")

# the verification batch: 2 sequences of 12 tokens (small: it runs one forward of the model)
_VERIFY_SHAPE = (2, 12)


class UnsupportedModelError(ValueError):
    """The model cannot be patched: its head is not a plain linear layer, or crossent's loss would not equal
    the stock one (the message names the model class and the discrepancy). The model is left unpatched."""


@dataclasses.dataclass(frozen=True)
class HeadTransforms:
    """What a model does to its head's output before the loss: ``softcap(logit_scale · (X Wᵀ + b))``.

    ``logit_scale`` None means 1, ``softcap`` None means no cap; they are crossent's options of the same name.
    """

    logit_scale: Optional[float] = None
    softcap: Optional[float] = None

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)!r}" for name in ("logit_scale", "softcap") if getattr(self, name)]
        return ", ".join(parts) or "none"


@dataclasses.dataclass
class _Patch:
    """What a patched model carries (``model._crossent_patch``): the loss options, built and validated once."""

    options: LinearOptions  # reduction "sum"; the model's transforms; the user's smoothing, z-loss, chunking
    transforms: HeadTransforms
    keep_logits: bool
    previous_forward: Any  # the instance attribute ``forward`` before patching (None: the class's)
    signature: inspect.Signature


def head_transforms(model: nn.Module) -> HeadTransforms:
    """The post-head transforms a model's config names (the text config's, for multimodal configs).

    ``final_logit_softcapping`` → ``softcap``; ``logit_scale`` multiplies and ``logits_scaling`` divides the
    logits → their product is ``logit_scale``. Only a claim: :func:`patch` verifies it against the model.

    Example:
        >>> import transformers
        >>> cfg = transformers.GraniteConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                                  num_key_value_heads=2, intermediate_size=32, logits_scaling=4.0)
        >>> head_transforms(transformers.GraniteForCausalLM(cfg))
        HeadTransforms(logit_scale=0.25, softcap=None)
    """
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: κ tanh(z / κ)
    return HeadTransforms(None if scale == 1.0 else scale, float(softcap) if softcap else None)


def patch(model: nn.Module, *, label_smoothing: float = 0.0, z_loss: float = 0.0, keep_logits: bool = False,
          **options) -> nn.Module:  # fmt: skip
    """Make ``model(..., labels=...)`` compute its causal-LM loss with crossent, in place; returns ``model``.

    With labels, the patched forward runs the model's own forward without them, records the hidden states
    its head receives (the head returns a (..., 0) placeholder: the (N, V) logits are never formed) and
    returns the model's usual output class with ``loss`` =
    ``linear_cross_entropy(hidden, head.weight, shifted labels, linear_bias=head.bias, ...)``: labels shifted
    as transformers' ``ForCausalLMLoss`` shifts them (or ``shift_labels=`` as given), ignore index -100, the
    mean over valid labels, or the sum divided by ``num_items_in_batch`` when given (as transformers does,
    so ``Trainer`` with gradient accumulation trains identically), plus ``router_aux_loss_coef · aux_loss``
    when the model returns an ``aux_loss`` (MoE). ``logits`` is None unless ``keep_logits=True`` (then the
    head runs as usual, which costs the logits' memory again). Without labels the original forward runs
    untouched (``generate()``). Differences from stock: a mean over zero valid labels is 0, not NaN; the
    loss of a 16-bit model is computed from fp32 logits (stock rounds the logits to the model's dtype first).

    Before patching, the unpatched model runs once on a random (2, 12) batch; crossent's reconstruction of
    its logits and of its loss must match (see the module docstring), else nothing is changed.

    Args:
        model: a transformers causal LM (``PreTrainedModel`` with a linear ``get_output_embeddings()``).
        label_smoothing, z_loss: crossent's options, applied to the patched loss (0: the stock loss).
        keep_logits: also return the logits (computed by the model's head as usual).
        **options: crossent's ``chunk_size``, ``memory_budget``, ``accumulate_dtype``, ``impl``.

    Returns:
        ``model``, patched (patching a patched model replaces its options).

    Raises:
        UnsupportedModelError: no linear head, a PEFT adapter or another module on the head, a DTensor head placed
            other than FSDP2's shards, ``Replicate()`` or ``Shard(0)`` over the vocabulary, a forward that fails on
            random input_ids, logits or loss that crossent does not reproduce.
        TypeError/ValueError: a bad option, or one the model decides (``reduction``, ``ignore_index``,
            ``softcap``, ``logit_scale``, ``return_stats``, ``weight``).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "get_output_embeddings") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(keep_logits, bool):
        raise TypeError(f"keep_logits must be a bool, got {keep_logits!r} of type {type(keep_logits).__name__}")
    decided = sorted(set(options) & set(_MODEL_DECIDED))
    if decided:
        raise TypeError(f"patch() does not take {', '.join(decided)}: the model decides them (its loss's reduction, "
                        f"ignore index -100, its own post-head transforms)")  # fmt: skip
    transforms = head_transforms(model)
    opts = LinearOptions.build(
        reduction="sum", ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=transforms.softcap, logit_scale=transforms.logit_scale, **options,
    )  # fmt: skip
    unpatch(model)
    _verify(model, _linear_head(model), transforms, opts)
    previous = model.__dict__.get("forward")
    original = previous.__func__ if isinstance(previous, types.MethodType) else type(model).forward

    @functools.wraps(original)  # the stock signature: Trainer and generate() inspect it
    def forward(self, *args, **kwargs):
        return _patched_forward(self, args, kwargs)

    signature = inspect.signature(_original_forward(model, previous))
    model._crossent_patch = _Patch(opts, transforms, keep_logits, previous, signature)
    # a method bound to this model: copy.deepcopy(model) binds the copy's forward to the copy
    model.forward = types.MethodType(forward, model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (the forward the model had before it); a model that is not patched is returned as is."""
    state = model.__dict__.pop("_crossent_patch", None)
    if state is not None:
        del model.__dict__["forward"]
        if state.previous_forward is not None:
            model.forward = state.previous_forward
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model``."""
    return "_crossent_patch" in model.__dict__


def token_log_probs(model: nn.Module, input_ids: Tensor, *, attention_mask: Optional[Tensor] = None,
                    temperature: float = 1.0, entropy: bool = False, **model_kwargs) -> TokenLogProbs:  # fmt: skip
    """Log-probabilities of each next token of ``input_ids`` under the model, without the (B, T, V) logits.

    Position ``t`` scores token ``t + 1``: ``log_probs[b, t] = log softmax(x_{b,t})[input_ids[b, t + 1]]`` with
    ``x = softcap(logit_scale · (h Wᵀ + b)) / temperature`` (the model's own head transforms, then the
    temperature), ``h`` the hidden states the model feeds its head. 0 (and entropy 0) where ``attention_mask``
    masks token ``t + 1``. Gradients flow to the model's parameters (for policy-gradient losses).

    Computed by :func:`crossent.linear_token_log_probs` on the hidden states, inside the head's call (where
    FSDP has unsharded it; a tensor-parallel head sharded over the vocabulary runs vocab-parallel, see
    ``docs/distributed.md``).

    Args:
        model: a causal LM; patched or not (an unpatched one is verified as :func:`patch` does, each call).
        input_ids: (B, T) integer token ids, T ≥ 2.
        attention_mask: None or (B, T), 0 at padding; passed to the model as well.
        temperature: T > 0.
        entropy: also return the entropy of each position's distribution.
        **model_kwargs: passed to the model's forward (not ``labels``); ``use_cache`` defaults to False.

    Returns:
        ``TokenLogProbs(log_probs, entropy)``: (B, T − 1) float32 (float64 for a float64 model) each;
        ``entropy`` None unless asked for.

    Example:
        >>> import torch, transformers, crossent.transformers as ct
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                                num_key_value_heads=2, intermediate_size=32)
        >>> out = ct.token_log_probs(transformers.LlamaForCausalLM(cfg), torch.randint(0, 64, (2, 9)), entropy=True)
        >>> out.log_probs.shape, out.entropy.shape
        (torch.Size([2, 8]), torch.Size([2, 8]))
    """
    if "labels" in model_kwargs:
        raise TypeError("token_log_probs() does not take labels: it scores the next tokens of input_ids")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (B, T) tensor with T >= 2, got {shape}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be None or of input_ids' shape {tuple(input_ids.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    head = _linear_head(model)
    state = model.__dict__.get("_crossent_patch")
    transforms = state.transforms if state is not None else _verified_transforms(model, head)
    if _accepts(inspect.signature(model.forward), "use_cache"):
        model_kwargs.setdefault("use_cache", False)
    ids = input_ids[:, 1:]
    if attention_mask is not None:
        ids = ids.masked_fill(attention_mask[:, 1:].to(ids.device) == 0, IGNORE_INDEX)

    def scored(hidden):  # in the head's call, the head as the engine holds it for the forward
        return _linear_token_log_probs(hidden[:, :-1], head, ids.to(hidden.device), transforms, float(temperature),
                                       entropy)  # fmt: skip

    with _HeadCapture(head, keep_logits=False, inside=scored) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    return capture.result_for(model)


# ---------------------------------------------------------------------------------------------- the forward


def _patched_forward(model: nn.Module, args: tuple, kwargs: dict):
    """The patched ``model.forward``: the original forward without labels, then crossent's loss."""
    state: _Patch = model.__dict__["_crossent_patch"]
    original = _original_forward(model, state.previous_forward)
    arguments = _keywords(state.signature, args, kwargs)
    labels = arguments.pop("labels", None)
    if labels is None:
        return original(*args, **kwargs)
    head = _linear_head(model)  # again each call: a PEFT adapter or a sharding may have come since patch()
    want_tuple = arguments.pop("return_dict", None)
    want_tuple = not (want_tuple if want_tuple is not None else getattr(model.config, "return_dict", True))
    if want_tuple or "return_dict" in state.signature.parameters:
        arguments["return_dict"] = True

    def head_loss(hidden):  # in the head's call, the head as the engine holds it for the forward
        return _head_loss(model, hidden, head, labels, arguments, state.options)

    with _HeadCapture(head, state.keep_logits, inside=head_loss) as capture:
        out = original(**arguments)
    if not isinstance(out, ModelOutput):
        raise UnsupportedModelError(f"{type(model).__name__}'s forward returned {type(out).__name__}, not a "
                                    f"transformers ModelOutput: crossent cannot set its loss")  # fmt: skip
    loss = _with_aux_loss(model, capture.result_for(model), out)
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    fields["loss"] = loss
    if not state.keep_logits:
        fields["logits"] = None
    out = type(out)(**fields)
    return out.to_tuple() if want_tuple else out


def _head_loss(model, hidden: Tensor, head: nn.Linear, labels: Tensor, arguments: dict, opts: LinearOptions) -> Tensor:
    """The stock causal-LM loss from the head's input: ``ForCausalLMLoss``'s shift and normalisation (the sum
    over ``num_items_in_batch`` when given, else the mean over valid labels). Runs inside the head's call."""
    target = arguments.get("shift_labels")
    if target is None:  # token t predicts t + 1; the last position has no target
        target = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    target = target.to(hidden.device)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{type(model).__name__}: the labels' shape {tuple(target.shape)} does not match the "
                         f"{tuple(hidden.shape[:-1])} positions the head received (logits_to_keep with labels?)")  # fmt: skip
    num_items = arguments.get("num_items_in_batch")
    if num_items is None:
        opts = dataclasses.replace(opts, reduction="mean")
    loss = linear_cross_entropy_with_options(hidden, head.weight, target, head.bias, None, opts)
    if num_items is not None:  # transformers' fixed_cross_entropy: the sum over the accumulation's token count
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss


def _with_aux_loss(model, loss: Tensor, out) -> Tensor:
    """The MoE term the stock forward adds (``router_aux_loss_coef · aux_loss``, when the output has one)."""
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        coef = getattr(model, "router_aux_loss_coef", getattr(model.config, "router_aux_loss_coef", None))
        if coef is None:
            raise UnsupportedModelError(f"{type(model).__name__} returns an aux_loss but has no router_aux_loss_coef")
        loss = loss + coef * aux.to(loss.device)
    return loss


class _HeadCapture:
    """For one call: the head's ``forward`` replaced by one that runs ``inside(hidden)`` on its input (the
    hidden states) and returns a (..., 0) placeholder (or, with ``keep_logits``, the real logits).
    Restored on exit.

    ``inside`` runs within the head's call because that is where every engine presents the head whole or as
    its vocabulary shard: FSDP2 has unsharded it (the root's unit, or the head's own, whose forward hooks run
    around the call) and tensor parallelism has made the hidden states a replicated DTensor. A head with its
    own FSDP unit runs ``inside`` as a registered FSDP forward method (``register_fsdp_forward_method``,
    nested in the head's forward, so no second all-gather), which ties its result's backward to FSDP's
    pre-backward unsharding. A DeepSpeed ZeRO-3 head runs ``inside`` in a nested call of the head module, whose
    ZeRO-3 hooks gather it again before the result's backward (see ``_in_engine_unit``).
    """

    def __init__(self, head: nn.Module, keep_logits: bool, inside: Callable[[Tensor], Any]):
        self.head, self.keep_logits, self.inside, self.result, self.calls = head, keep_logits, inside, None, 0

    def __enter__(self):
        self.previous = self.head.__dict__.get("forward")
        self.head.forward = self._forward
        return self

    def __exit__(self, *exc):
        del self.head.__dict__["forward"]
        if self.previous is not None:
            self.head.forward = self.previous

    def _forward(self, input, *args, **kwargs):
        self.calls += 1
        run = self.previous if self.previous is not None else types.MethodType(type(self.head).forward, self.head)

        def both(hidden):  # ``inside`` first: its errors name what crossent refuses (a DTensor placement)
            result = self.inside(hidden)
            if self.keep_logits:
                return result, run(hidden, *args, **kwargs)
            return result, hidden.new_empty(hidden.shape[:-1] + (0,))

        self.result, out = _in_engine_unit(self.head, both, input)
        return out

    def result_for(self, model):
        """What ``inside`` returned; the head must have been called exactly once."""
        if self.calls != 1:
            raise UnsupportedModelError(f"{type(model).__name__}'s forward called its output embedding {self.calls} "
                                        f"times (crossent.transformers needs exactly one call)")  # fmt: skip
        return self.result


def _in_engine_unit(head: nn.Module, fn: Callable[[Tensor], Any], hidden: Tensor):
    """``fn(hidden)``, run where the head's engine covers it for forward and backward:

    - a head that is its own FSDP2 unit: as a forward method of that unit (its pre-forward finds the head
      unsharded already; its post-forward registers FSDP's pre-backward hook on the result);
    - a DeepSpeed ZeRO-3 head (partitioned parameters): as a nested call of the head module, so ZeRO-3's module
      hooks run around ``fn`` — the pre-forward fetch (the head is gathered already), the post-forward release,
      and on ``fn``'s result the pre-backward hook that gathers the head again before its backward (ZeRO-3
      gathers a module for backward only through hooks on that module's outputs);
    - otherwise: a plain call.
    """
    if hasattr(head.weight, "ds_status"):  # ZeRO-3 marks its partitioned parameters
        outer = head.__dict__["forward"]
        head.forward = fn
        try:
            return head(hidden)
        finally:
            head.forward = outer
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not isinstance(head, fsdp.FSDPModule):
        return fn(hidden)
    head._crossent_inside = types.MethodType(lambda self, h: fn(h), head)
    try:
        fsdp.register_fsdp_forward_method(head, "_crossent_inside")
        return head._crossent_inside(hidden)
    finally:
        del head._crossent_inside  # the registered wrapper, an instance attribute


def _full(t):
    """A DTensor's whole value on every rank (the verification's small logits and loss); other values as they are."""
    return t.full_tensor() if is_dtensor(t) else t


def _linear_head(model: nn.Module) -> nn.Linear:
    """The model's output embedding, checked to be a plain ``nn.Linear`` (its weight may be a DTensor: FSDP2's
    shard outside the forward, or tensor parallelism's; ``crossent`` reads it inside the head's call)."""
    name = type(model).__name__
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedModelError(f"{name}.get_output_embeddings() is None: no LM head for crossent to fuse")
    if hasattr(head, "lora_A") or hasattr(head, "base_layer") or type(head).__module__.split(".")[0] == "peft":
        raise UnsupportedModelError(
            f"{name}'s output embedding carries a PEFT adapter ({type(head).__name__}): crossent fuses a plain "
            f"linear head only; merge the adapter, or leave the head out of the adapter's target_modules"
        )
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise UnsupportedModelError(f"{name}'s output embedding is a {type(head).__name__}, not a plain torch.nn.Linear")
    return head


def _original_forward(model: nn.Module, previous):
    """The forward the model had before patching, bound to it."""
    return previous if previous is not None else types.MethodType(type(model).forward, model)


def _keywords(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """A call's arguments as keywords (positional ones named by the forward's signature)."""
    if not args:
        return dict(kwargs)
    bound = signature.bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"crossent.transformers: pass the forward's extra positional arguments by keyword ({name})")
        else:
            out[name] = value
    return out


def _accepts(signature: inspect.Signature, name: str) -> bool:
    return name in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )


# ---------------------------------------------------------------------------------------------- verification


def _verify(model: nn.Module, head: nn.Linear, transforms: HeadTransforms, opts: LinearOptions) -> None:
    """Run the unpatched model once on a random batch with labels; raise :class:`UnsupportedModelError` unless
    (1) its logits equal ``softcap(logit_scale · (h Wᵀ + b))`` of the hidden states ``h`` its head received and
    (2) its loss equals the patched loss (the model's transforms, without the user's smoothing and z-loss).

    Tolerances scale with the logits' dtype: 16 ulps of the largest logit (fp32: ~2e-6 relative), far below
    any transform crossent does not know (a factor, a shift, a cap). The RNG state is restored afterwards.
    """
    name = type(model).__name__
    vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3: (0,) outside the head's forward
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab_in = getattr(embeddings, "num_embeddings", vocab)
    device = head.weight.device
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, min(vocab, vocab_in), _VERIFY_SHAPE, generator=generator).to(device)
    labels = input_ids.clone()
    labels[0, : _VERIFY_SHAPE[1] // 3] = IGNORE_INDEX  # some ignored labels, as a padded batch has
    signature = inspect.signature(model.forward)
    kwargs = {"input_ids": input_ids, "labels": labels}
    for key, value in (("output_router_logits", True), ("use_cache", False), ("return_dict", True)):
        if key in signature.parameters or (key == "return_dict" and _accepts(signature, key)):
            kwargs[key] = value
    devices = [device.index or 0] if device.type == "cuda" else []
    plain = dataclasses.replace(opts, row=dataclasses.replace(opts.row, label_smoothing=0.0, z_loss=0.0))

    def rebuilt(hidden):  # in the head's call, where the engine (FSDP2, tensor parallelism) presents the head
        loss = _head_loss(model, hidden, head, labels, {}, plain)  # first: it names a placement crossent refuses
        return _full(_head_logits(hidden, head, transforms)), loss

    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), _stock_loss_context(head), \
                _HeadCapture(head, keep_logits=True, inside=rebuilt) as capture:  # fmt: skip
            out = model(**kwargs)
    except Exception as error:  # the model's own error, re-raised with what crossent was doing
        raise UnsupportedModelError(f"{name}: the verification forward on random input_ids {_VERIFY_SHAPE} failed "
                                    f"({type(error).__name__}: {error})") from error  # fmt: skip
    _reshard(model)
    ours, loss = capture.result_for(model)
    logits, stock_loss = getattr(out, "logits", None), getattr(out, "loss", None)
    if not isinstance(logits, Tensor) or not isinstance(stock_loss, Tensor):
        raise UnsupportedModelError(f"{name}'s forward with labels returned no logits or no loss to verify against")
    logits, stock_loss = _full(logits), _full(stock_loss)
    _check_close(name, "logits", logits, ours, transforms, logits.dtype)
    _check_close(name, "loss", stock_loss, _with_aux_loss(model, loss, out), transforms, logits.dtype)


def _reshard(model: nn.Module) -> None:
    """Leave FSDP2's units sharded after the verification forward, as before it. A root unit keeps its
    parameters unsharded after a forward under ``no_grad`` (no backward reshards them), and while it is,
    ``model.parameters()`` yields the unsharded tensors: an optimizer made after ``patch`` would update copies
    that the next reshard discards (the second step then runs on stale parameters)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    for module in model.modules() if fsdp is not None else ():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def _stock_loss_context(head: nn.Module):
    """Where the stock loss needs one: tensor parallelism's ``loss_parallel()`` for a DTensor head (the stock
    cross-entropy of vocabulary-sharded logits raises without it; plain logits, as FSDP2's, ignore it)."""
    if not is_dtensor(head.weight):
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def _verified_transforms(model: nn.Module, head: nn.Linear) -> HeadTransforms:
    transforms = head_transforms(model)
    opts = LinearOptions.build(reduction="sum", softcap=transforms.softcap, logit_scale=transforms.logit_scale)
    _verify(model, head, transforms, opts)
    return transforms


def _head_logits(hidden: Tensor, head: nn.Linear, transforms: HeadTransforms) -> Tensor:
    """``softcap(logit_scale · (h Wᵀ + b))`` in fp32 (fp64 for fp64): crossent's reading of the model's logits."""
    dtype = torch.promote_types(head.weight.dtype, torch.float32)
    bias = None if head.bias is None else head.bias.to(dtype)
    z = F.linear(hidden.to(dtype), head.weight.to(dtype), bias)
    if transforms.logit_scale is not None:
        z = z * transforms.logit_scale
    return _capped(z, transforms.softcap)


def _capped(z: Tensor, softcap: Optional[float]) -> Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _check_close(name: str, what: str, stock: Tensor, ours: Tensor, transforms: HeadTransforms, dtype) -> None:
    stock, ours = stock.detach().double(), ours.detach().to(stock.device).double()
    if stock.shape != ours.shape:
        raise UnsupportedModelError(f"{name}: the model's {what} have shape {tuple(stock.shape)}, crossent's "
                                    f"reconstruction {tuple(ours.shape)}; the model is left unpatched")  # fmt: skip
    diff = (stock - ours).abs()
    tolerance = 16 * torch.finfo(dtype).eps * (1.0 + stock.abs().max().item())
    worst = diff.max().item() if diff.numel() else 0.0
    if not worst <= tolerance:  # NaN fails too
        index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.dim() else ()
        cause = ("the model transforms its logits in a way crossent does not recognise" if what == "logits" else
                 "the model's loss is not transformers' ForCausalLMLoss (plus router_aux_loss_coef · aux_loss)")
        raise UnsupportedModelError(
            f"{name}: the model's {what} differ from crossent's reconstruction from the hidden states its head "
            f"receives (head weight, bias, post-head transforms from the config: {transforms.describe()}): max "
            f"|difference| {worst:.3g} at {index} (model {stock[index].item():.6g}, crossent "
            f"{ours[index].item():.6g}), tolerance {tolerance:.3g}: {cause}. The model is left unpatched."
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- log-probs


def _linear_token_log_probs(hidden: Tensor, head: nn.Linear, ids: Tensor, transforms: HeadTransforms,
                            temperature: float, entropy: bool):  # fmt: skip
    """Per-token log-probs of ``ids`` (and entropy) of ``softcap(s · (h Wᵀ + b)) / T``; ``ids`` -100 give 0.

    The logit scale is folded into the operands (``(s h) Wᵀ + s b``), as :func:`crossent.linear_cross_entropy`
    does; the rest is ``crossent.linear_token_log_probs``'s contract (softcap, then temperature).
    """
    hidden, weight, bias = autocast_operands(hidden, head.weight, head.bias)
    hidden, bias = logit_scaled(hidden, bias, transforms.logit_scale)
    return crossent.linear_token_log_probs(hidden, weight, ids, linear_bias=bias, temperature=temperature,
                                           entropy=entropy, softcap=transforms.softcap, ignore_index=IGNORE_INDEX)  # fmt: skip
