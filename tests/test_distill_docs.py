"""docs/distillation.md's examples run, and the materialized variant equals the fused one."""

from __future__ import annotations

import pathlib
import re

import torch

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "distillation.md"


def test_distillation_doc_examples_run_and_agree():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[1], "distillation.md[step]", "exec"), namespace)  # the complete training step
    exec(compile(blocks[2], "distillation.md[materialized]", "exec"), namespace)
    crossent, ns = namespace["crossent"], namespace
    fused = crossent.linear_distill_loss(
        ns["student"].hidden_states(ns["inputs"]), ns["student"].lm_head.weight, ns["teacher_hidden"],
        ns["teacher"].lm_head.weight, beta=0.5, temperature=2.0, target=ns["labels"], hard_weight=0.1,
    )  # fmt: skip
    torch.testing.assert_close(fused, ns["loss"], rtol=1e-5, atol=1e-6)
