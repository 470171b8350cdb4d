"""crossent.kernels.scratch: chunk buffers handed out again within one fused call, dropped after it."""

import torch

import crossent
from crossent.kernels import cpu_rows, scratch


def test_take_hands_out_what_was_given_back_only_inside_reuse():
    cpu = torch.device("cpu")
    a = scratch.take(100, torch.float32, cpu)
    scratch.give_back(a)  # outside reuse: ignored, nothing is kept
    assert getattr(scratch._STATE, "free", None) is None
    with scratch.reuse():
        b = scratch.take(100, torch.float32, cpu)
        scratch.give_back(b)
        with scratch.reuse():  # nested: the same pool
            assert scratch.take(50, torch.float32, cpu) is b  # fits: handed out again
        scratch.give_back(b)
        assert scratch.take(100, torch.float64, cpu) is not b  # another dtype: a new one
        assert scratch.take(101, torch.float32, cpu) is not b  # too small: a new one
        assert scratch.take(10, torch.float32, cpu) is b
    scratch.give_back(b)  # the pool is gone: nothing kept between calls
    assert getattr(scratch._STATE, "free", None) is None


def test_a_fused_call_allocates_chunk_buffers_once_not_per_block(monkeypatch):
    made = []

    def counting_new(numel, dtype, device):
        made.append(numel)
        return torch.empty(numel, dtype=dtype, device=device)

    monkeypatch.setattr(scratch, "_new", counting_new)
    monkeypatch.setattr(cpu_rows, "ENABLED", False)  # the torch-ops row kernels (the C ones take no chunk buffers)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 8, generator=g), torch.randn(50, 8, generator=g)
    ids = torch.randint(0, 50, (40,), generator=g)
    out = crossent.linear_token_log_probs(x, w, ids, entropy=True, chunk_size=8)  # 5 blocks
    assert len(made) == 2  # the chunk and the softmax scratch, taken again by blocks 2-5
    ref = torch.log_softmax(x @ w.T, -1)
    torch.testing.assert_close(out.log_probs, ref.gather(-1, ids[:, None]).squeeze(-1))
    torch.testing.assert_close(out.entropy, -(ref.exp() * ref).sum(-1))
