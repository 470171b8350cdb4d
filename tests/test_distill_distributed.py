"""Vocab-parallel fused distillation on 2 and 3 gloo ranks (tests/_dist_workers.py, ``distill_job``) against
single-process crossent.linear_distill_loss on the full heads, float64: loss, dX (full on every rank), the
rank's dW and db rows; a bad shard on one rank raises on every rank."""

from __future__ import annotations

import _dist_workers as workers
import pytest


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_linear_distill_matches_single_process(world):
    res = workers.run_world(world, "distill", timeout_s=180)
    names = [n for n in res[0] if not n.startswith("error:")]
    assert len(names) == 2 * len(workers.DISTILL_OPTIONS)
    failures = [f"rank {r} {n}: {res[r][n]}" for n in names for r in res if res[r][n]]
    assert not failures, "\n".join(failures[:10])
    errors = {res[r]["error: vocabulary"] for r in res}
    assert len(errors) == 1, f"ranks raised different errors: {errors}"
    (kind, message), = errors
    assert kind == "ValueError" and "share the vocabulary" in message, message
