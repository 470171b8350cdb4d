"""crossent under PyTorch's training engines, on 2 gloo ranks: DDP, FSDP2, tensor parallelism, HF Trainer.

One spawn runs every engine case (tests/_engine_workers.py: each compares the patched model with the stock
model under the same engine, loss and every gradient as full tensors); one torchrun runs ``Trainer`` under DDP
(tests/_trainer_ddp.py). Bounded in time: gloo collectives time out after 30 s, the parent waits at most 300 s.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _dist_workers as workers

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
_results = {}


def _engines():
    if "engines" not in _results:
        _results["engines"] = workers.run_world(2, "_engine_workers:engines_job", timeout_s=300)
    return _results["engines"]


def _failures(group):
    res = _engines()
    names = list(res[0][group])
    assert names == list(res[1][group]), "ranks ran different cases"
    return names, [f"rank {r} {n}: {res[r][group][n]}" for n in names for r in res
                   if not n.startswith("error") and res[r][group][n]]  # fmt: skip


@pytest.mark.timeout(330)
def test_ddp_patched_equals_stock():
    names, failures = _failures("ddp")
    assert len(names) == 2 and not failures, "\n".join(failures)


@pytest.mark.timeout(330)
def test_fsdp2_patched_equals_stock_in_every_layout():
    """Patched before or after fully_shard, the root resharding or not, the head in its own resharding unit,
    bf16 mixed precision (crossent no further from the fp32 run than stock), accelerate's FSDP2 calls; the
    step after an optimizer step (the verification leaves the units sharded);
    token_log_probs through a head unit that reshards after forward."""
    names, failures = _failures("fsdp")
    assert len(names) == 11 and not failures, "\n".join(failures)


@pytest.mark.timeout(330)
def test_tensor_parallel_head_runs_vocab_parallel():
    """A ColwiseParallel head (Shard(0) over the vocabulary): patch before or after parallelize_module equals the
    stock TP model under loss_parallel; token_log_probs and the three fused functions with DTensor weights
    (Shard(0), Replicate()) equal the full tensors, plain results; other placements raise on every rank."""
    names, failures = _failures("tp")
    assert not failures, "\n".join(failures)
    assert sum(n.startswith("functional") for n in names) == 6, names
    for r in (0, 1):
        kind, message = _engines()[r]["tp"]["error: Shard(1) weight"]
        assert kind == "ValueError" and "Shard(dim=1)" in message and "Shard(0)" in message, message
        kind, message = _engines()[r]["tp"]["error: sharded input"]
        assert kind == "ValueError" and "input is a DTensor placed (Shard(dim=0),)" in message, message


@pytest.mark.timeout(330)
def test_trainer_under_ddp_trains_as_stock():
    """Trainer wraps the model in DistributedDataParallel on 2 CPU ranks; two steps with gradient accumulation:
    the same step losses and parameters as stock, crossent computing every patched loss."""
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "_trainer_ddp.py")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["engine"] == "DistributedDataParallel" and result["world"] == 2, result
    assert len(result["stock"]) == 2, result
    torch.testing.assert_close(result["patched"], result["stock"], rtol=1e-5, atol=0, msg=lambda m: f"{m}\n{result}")
    assert result["param_diff"] <= 1e-5, result
    # crossent computed the patched run's losses (2 steps × 2 accumulated micro-batches on the rank), none of stock's
    assert result["crossent_losses"] == {"stock": 0, "patched": 4}, result


@pytest.mark.timeout(330)
def test_2d_mesh_fsdp_and_tensor_parallel():
    """4 ranks, mesh (dp 2, tp 2): FSDP2 over dp, the ColwiseParallel head over tp; patched before or after
    equals stock (loss, every gradient)."""
    res = workers.run_world(4, "_engine_workers:mesh2d_job", timeout_s=300)
    failures = [f"rank {r} {n}: {v}" for r in res for n, v in res[r].items() if v]
    assert len(res[0]) == 2 and not failures, "\n".join(failures)
