"""crossent under DeepSpeed ZeRO on 2 gloo ranks (DeepSpeed's CPU accelerator): ``patch`` and ``token_log_probs``.

One spawn runs every case (tests/_deepspeed_workers.py): the patched model against the stock model under the same
ZeRO engine, two optimizer steps, the loss and every parameter's full gradient at each. Skipped without
``deepspeed`` (``pip install "crossent[deepspeed]"``). Bounded in time: gloo collectives time out after 30 s, the
parent waits at most 300 s.
"""

import importlib.util

import pytest

import _dist_workers as workers

pytest.importorskip("transformers")
if importlib.util.find_spec("deepspeed") is None:  # found, not imported: only the spawned ranks import deepspeed
    pytest.skip("deepspeed is not installed", allow_module_level=True)

_results = {}


def _zero():
    if "zero" not in _results:
        _results["zero"] = workers.run_world(2, "_deepspeed_workers:zero_job", timeout_s=300)
    return _results["zero"]


def _failures(prefix):
    res = _zero()
    names = [n for n in res[0] if n.startswith(prefix)]
    assert names == [n for n in res[1] if n.startswith(prefix)], "ranks ran different cases"
    return names, [f"rank {r} {n}: {res[r][n]}" for n in names for r in res if res[r][n]]


@pytest.mark.timeout(330)
def test_zero3_patched_equals_stock():
    """The head partitioned to (0,) outside its forward; patch before or after deepspeed.initialize, with
    keep_logits, with the head tied to the input embedding: the loss runs in a nested call of the head, under
    ZeRO-3's own fetch, release and pre-backward hooks — the same losses and gradients as stock over two steps;
    with bf16 (before or after), crossent's distance to the fp32 run at most twice stock's."""
    names, failures = _failures("ZeRO-3, patch")
    assert len(names) == 6 and not failures, "\n".join(failures)


@pytest.mark.timeout(330)
def test_zero3_token_log_probs_equals_stock():
    """token_log_probs (with entropy) of an unpatched ZeRO-3 model: a policy-gradient loss's value and gradients
    equal stock's log-softmax of the logits."""
    names, failures = _failures("ZeRO-3, token_log_probs")
    assert len(names) == 1 and not failures, "\n".join(failures)


@pytest.mark.timeout(330)
def test_zero2_patched_equals_stock():
    """ZeRO-2 keeps the parameters whole: patch before or after initialize behaves as under DDP."""
    names, failures = _failures("ZeRO-2")
    assert len(names) == 2 and not failures, "\n".join(failures)
