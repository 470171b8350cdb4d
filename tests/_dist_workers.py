"""Spawn targets for tests/test_distributed.py: gloo ranks on 127.0.0.1 that run many cases per spawn.

``run_world(world, job)`` starts ``world`` processes, each runs ``JOBS[job](rank, world)`` (a dict of
case name → result) and sends it back; the parent gets ``{rank: results}`` or a clear failure, never a
hang (collectives time out after ``COLLECTIVE_TIMEOUT_S``, the parent waits at most ``timeout_s``).
Cases compare each rank's loss and gradient with single-process ``crossent`` on the full data, built
from the same seed on every rank.
"""

from __future__ import annotations

import datetime
import importlib
import itertools
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

import crossent
from crossent import distributed as cd
from crossent.kernels import linear_plan

COLLECTIVE_TIMEOUT_S = 30
C = 23  # global vocabulary: not a power of two, split unequally below
SIZES = {1: [23], 2: [10, 13], 3: [7, 11, 5]}  # V_local per rank; 3 ranks also give a 5-wide shard


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, job: str, timeout_s: float = 120.0) -> dict:
    """Run ``job`` on ``world`` gloo ranks; return ``{rank: results}``; raise on crash or timeout."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, job, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world):
            rank, payload = results.get(timeout=timeout_s)
            if isinstance(payload, str):
                raise RuntimeError(f"rank {rank} crashed:\n{payload}")
            out[rank] = payload
    except queue.Empty:
        raise TimeoutError(f"job {job!r} on {world} ranks gave no result within {timeout_s} s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return out


def _worker(rank, world, port, job, results):
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )  # fmt: skip
        try:
            payload = _job(job)(rank, world)
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report anything to the parent instead of hanging it
        payload = traceback.format_exc()
    results.put((rank, payload))


def _job(job: str):
    """``JOBS[job]``, or ``"module:function"`` of another test module (tests/_engine_workers.py)."""
    if ":" not in job:
        return JOBS[job]
    module, name = job.split(":")
    return getattr(importlib.import_module(module), name)


# --- data and comparisons ----------------------------------------------------------------------------


def my_range(rank, world, starts=None):
    sizes = SIZES[world]
    start = cd.vocab_ranges(sizes)[rank][0] if starts is None else starts[rank]
    return start, start + sizes[rank]


def make_data(seed, batch, dtype, ignore_index=-100, ignore_frac=0.25, weighted=False, target_hi=C):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*batch, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, target_hi, batch, generator=g)
    target[torch.rand(batch, generator=g) < ignore_frac] = ignore_index
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    upstream = torch.randn(batch, generator=g, dtype=torch.float64)
    return logits, target, weight, upstream


def reference(logits, target, weight, upstream, **opts):
    """Single-process crossent on the full logits: (loss, grad)."""
    z = logits.clone().requires_grad_()
    loss = crossent.cross_entropy(z.movedim(-1, 1) if z.dim() > 2 else z, target, weight, **opts)
    _backward(loss, upstream, opts.get("reduction", "mean"))
    return loss.detach(), z.grad


def parallel(logits, target, weight, upstream, lo, hi, **opts):
    """This rank's vocab-parallel result: (loss, grad of its columns)."""
    z = logits[..., lo:hi].clone().requires_grad_()
    loss = cd.vocab_parallel_cross_entropy(z, target, weight=weight, **opts)
    _backward(loss, upstream, opts.get("reduction", "mean"))
    return loss.detach(), z.grad


def _backward(loss, upstream, reduction):
    if reduction == "none":
        (loss * upstream.to(loss.dtype)).sum().backward()  # a random per-position upstream gradient
    else:
        (loss * 1.7).backward()


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}  # fmt: skip


def check_same(got, want, dtype, what):
    """None if equal within the dtype's tolerance, else the assert_close message (worst index, values)."""
    try:
        torch.testing.assert_close(got, want, **TOL[dtype], equal_nan=True, msg=lambda m: f"{what}: {m}")
        if got is not None and got.dtype != want.dtype:
            return f"{what}: dtype {got.dtype} != {want.dtype}"
    except AssertionError as e:
        return str(e)
    return None


def compare(rank, world, logits, target, weight, upstream, starts=None, **opts):
    lo, hi = my_range(rank, world, starts)
    loss, grad = parallel(logits, target, weight, upstream, lo, hi, vocab_start=None if starts is None else lo, **opts)
    ref_loss, ref_grad = reference(logits, target, weight, upstream, **opts)
    return check_same(loss, ref_loss, logits.dtype, "loss") or check_same(
        grad, ref_grad[..., lo:hi], logits.dtype, "grad"
    )


# --- jobs --------------------------------------------------------------------------------------------

OPTION_GRID = list(
    itertools.product(
        ["none", "mean", "sum"],  # reduction
        [False, True],  # class weights
        [-100, 4],  # ignore_index: the default, and one inside [0, C) (a real class that is skipped)
        [0.0, 0.1],  # label smoothing (uses the global C)
        [0.0, 0.01],  # z-loss
        [None, 5.0],  # softcap (logits are ~N(0, 9): the cap bites)
    )
)


def parity_job(rank, world):
    """Every option combination, float64 to 1e-10 on (17, C) rows; float32 and 3-D shapes on a subset."""
    out = {}
    for i, (red, weighted, ign, eps, zl, cap) in enumerate(OPTION_GRID):
        opts = dict(reduction=red, ignore_index=ign, label_smoothing=eps, z_loss=zl, softcap=cap)
        name = f"f64 {opts} weight={weighted}"
        data = make_data(i, (17,), torch.float64, ignore_index=ign, weighted=weighted)
        out[name] = compare(rank, world, *data, **opts)
        if i % 5 == 0:  # float32, and 3-D (B, T, V) logits, on a spread of the grid
            data = make_data(1000 + i, (3, 5), torch.float32, ignore_index=ign, weighted=weighted)
            out["f32 (3, 5) " + name[4:]] = compare(rank, world, *data, **opts)
    return out


def edge_job(rank, world):
    out = {}
    full = dict(reduction="mean", label_smoothing=0.1, z_loss=0.01, softcap=5.0)
    for red in ("mean", "sum", "none"):
        # every target in rank 0's slice: the other ranks hold no target column
        data = make_data(1, (19,), torch.float64, weighted=True, target_hi=SIZES[world][0])
        out[f"no target outside rank 0, {red}"] = compare(rank, world, *data, **{**full, "reduction": red})
        # every target ignored: loss 0 and zero gradient (mean over zero weight is 0, not NaN)
        data = make_data(2, (9,), torch.float64, weighted=True, ignore_frac=1.0)
        lo, hi = my_range(rank, world)
        loss, grad = parallel(*data, lo, hi, **{**full, "reduction": red})
        ok = bool((loss == 0).all()) and bool((grad == 0).all())
        out[f"all ignored, {red}"] = None if ok else f"loss {loss}, grad max {grad.abs().max()}"
        out[f"all ignored vs single-process, {red}"] = compare(rank, world, *data, **{**full, "reduction": red})
    # explicit vocab_start, shards NOT in rank order (rank r holds block world-1-r)
    sizes = SIZES[world]
    starts = [sum(sizes[r + 1 :]) for r in range(world)]
    for red in ("mean", "none"):
        data = make_data(3, (11,), torch.float64, weighted=True)
        out[f"explicit vocab_start, reversed order, {red}"] = compare(
            rank, world, *data, starts=starts, **{**full, "reduction": red}
        )
    # a row whose whole slice on some rank is −inf (masked vocabulary padding), target elsewhere
    logits, target, weight, up = make_data(4, (8,), torch.float64)
    lo_last, _ = my_range(world - 1, world)
    logits[:4, lo_last:] = -float("inf")
    target[:4] = 0
    out["-inf slice on the last rank"] = compare(rank, world, logits, target, weight, up, reduction="none")
    # empty batch, unbatched (V_local,) logits with a 0-d target, bfloat16 logits (loss in fp32)
    out["empty batch"] = compare(rank, world, *make_data(5, (0,), torch.float64), reduction="mean")
    out["unbatched"] = compare(rank, world, *make_data(6, (), torch.float64, ignore_frac=0.0), label_smoothing=0.2)
    out["bfloat16"] = compare(rank, world, *make_data(7, (6, 4), torch.bfloat16), z_loss=0.01)
    logits, target, weight, up = make_data(8, (9,), torch.float64)
    out["int16 targets"] = compare(rank, world, logits, target.to(torch.int16), weight, up, reduction="none")
    out["second backward of the fused linear CE"] = _second_backward_refused(rank, world)
    return out


def _second_backward_refused(rank, world):
    """Gradients formed in forward are handed out once: a retained second backward must raise, not all-reduce
    an already summed dX again."""
    lo, hi = my_range(rank, world)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 4, generator=g, dtype=torch.float64)[lo:hi].requires_grad_(True)
    t = torch.randint(0, C, (5,), generator=g)
    loss = cd.vocab_parallel_linear_cross_entropy(x, w, t)
    loss.backward(retain_graph=True)
    kind, msg = _capture(loss.backward)
    return "" if kind == "RuntimeError" and "second time" in msg else f"expected RuntimeError, got {kind}: {msg}"


def _capture(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we return the exception for the parent to judge
        return (type(e).__name__, str(e))
    return ("no error", "")


def error_job(rank, world):
    """Each case must raise the same exception on every rank; the group must stay usable after each."""
    sizes = SIZES[world]
    lo, hi = my_range(rank, world)
    logits, target, weight, _ = make_data(8, (6,), torch.float64, weighted=True)
    z = logits[..., lo:hi]
    vp = cd.vocab_parallel_cross_entropy
    out = {}
    starts = [a for a, _ in cd.vocab_ranges(sizes)]
    gap = [s + (1 if r == world - 1 else 0) for r, s in enumerate(starts)]
    out["gap"] = _capture(lambda: vp(z, target, vocab_start=gap[rank]))
    overlap = [max(s - (1 if r == world - 1 else 0), 0) for r, s in enumerate(starts)]
    out["overlap"] = _capture(lambda: vp(z, target, vocab_start=overlap[rank]))
    out["vocab_start on rank 0 only"] = _capture(lambda: vp(z, target, vocab_start=0 if rank == 0 else None))
    too_big = target.clone()
    too_big[2] = C
    out["target = C"] = _capture(lambda: vp(z, too_big))
    negative = target.clone()
    negative[1] = -3
    out["target = -3"] = _capture(lambda: vp(z, negative))
    last = rank == world - 1
    longer = make_data(8, (7,), torch.float64)[0][..., lo:hi]
    out["rows differ on the last rank"] = _capture(
        lambda: vp(longer if last else z, torch.zeros(7 if last else 6, dtype=torch.int64))
    )
    out["float target on the last rank (local TypeError)"] = _capture(
        lambda: vp(z, target.double() if last else target)
    )
    out["target shape mismatch on rank 0 (local)"] = _capture(lambda: vp(z, target[:5] if rank == 0 else target))
    out["weight not (C,)"] = _capture(lambda: vp(z, target, weight=weight[:-1]))
    out["label_smoothing differs"] = _capture(lambda: vp(z, target, label_smoothing=0.1 if rank == 0 else 0.0))
    out["dtype differs"] = _capture(lambda: vp(z.float() if last else z, target))
    out["bad reduction"] = _capture(lambda: vp(z, target, reduction="avg"))
    # the group still works: a valid call after all the errors
    data = make_data(9, (5,), torch.float64)
    out["valid call after errors"] = compare(rank, world, *data, label_smoothing=0.1)
    return out


# --- fused linear version ---------------------------------------------------------------------------
D = 7


def make_linear(seed, batch, dtype, bias, **kw):
    logits, target, weight, upstream = make_data(seed, batch, dtype, **kw)  # only the targets/weights/upstream
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(C, D, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b, target, weight, upstream


def compare_linear(rank, world, x, w, b, target, weight, upstream, grads=(True, True, True), chunk_size=5,
                   memory_budget=None, accumulate_dtype="float32", fused_oracle=False, **opts):  # fmt: skip
    """Loss, dX (full), this rank's dW and db rows vs crossent.cross_entropy(F.linear(x, W, b)) on one process
    (``fused_oracle``: vs single-process crossent.linear_cross_entropy with the same chunking instead)."""
    lo, hi = my_range(rank, world)
    red = opts.get("reduction", "mean")
    chunking = dict(chunk_size=chunk_size, memory_budget=memory_budget, accumulate_dtype=accumulate_dtype)
    leaves = [x.clone().requires_grad_(grads[0]), w[lo:hi].clone().requires_grad_(grads[1]),
              None if b is None else b[lo:hi].clone().requires_grad_(grads[2])]  # fmt: skip
    loss = cd.vocab_parallel_linear_cross_entropy(
        leaves[0], leaves[1], target, linear_bias=leaves[2], weight=weight, **chunking, **opts
    )
    _backward(loss, upstream, red)
    ref = [x.clone().requires_grad_(grads[0]), w.clone().requires_grad_(grads[1]),
           None if b is None else b.clone().requires_grad_(grads[2])]  # fmt: skip
    if fused_oracle:
        ref_loss = crossent.linear_cross_entropy(ref[0], ref[1], target, linear_bias=ref[2], weight=weight,
                                                 **chunking, **opts)  # fmt: skip
    else:
        logits = F.linear(*ref)
        ref_loss = crossent.cross_entropy(logits.movedim(-1, 1) if logits.dim() > 2 else logits, target, weight, **opts)
    _backward(ref_loss, upstream, red)
    problems = [check_same(loss.detach(), ref_loss.detach(), x.dtype, "loss")]
    for name, got, want, sl in zip(("dX", "dW", "db"), leaves, ref, (slice(None), slice(lo, hi), slice(lo, hi))):
        if want is None:
            continue
        if not want.requires_grad:
            problems.append(None if got.grad is None else f"{name} should have no gradient")
            continue
        problems.append(check_same(got.grad, want.grad[sl], x.dtype, name))
    return next((p for p in problems if p), None)


LINEAR_OPTIONS = [
    dict(),
    dict(ignore_index=4, weighted=True),
    dict(label_smoothing=0.1, z_loss=0.01),
    dict(label_smoothing=0.2, softcap=4.0, weighted=True),
]


def linear_job(rank, world):
    """Every reduction × bias × option set, float64 to 1e-10, N = 17 rows in chunks of 5 (and 3-D input)."""
    out = {}
    for i, (red, bias, extra) in enumerate(itertools.product(["none", "mean", "sum"], [False, True], LINEAR_OPTIONS)):
        extra = dict(extra)
        weighted = extra.pop("weighted", False)
        ign = extra.get("ignore_index", -100)
        batch = (17,) if i % 2 else (3, 5)
        data = make_linear(100 + i, batch, torch.float64, bias, ignore_index=ign, weighted=weighted)
        out[f"f64 {batch} {red} bias={bias} weight={weighted} {extra}"] = compare_linear(
            rank, world, *data, reduction=red, **extra
        )
    data = make_linear(200, (33,), torch.float32, True, weighted=True)
    out["f32 smoothing z-loss softcap"] = compare_linear(
        rank, world, *data, chunk_size=8, label_smoothing=0.1, z_loss=0.01, softcap=4.0
    )
    data = make_linear(208, (4, 5), torch.bfloat16, True, weighted=True)
    out["bf16 vs single-process linear_cross_entropy"] = compare_linear(
        rank, world, *data, chunk_size=8, fused_oracle=True, label_smoothing=0.1
    )
    data = make_linear(209, (19,), torch.float32, False)
    for red in ("mean", "none"):
        out[f"f32 vs single-process linear_cross_entropy, {red}"] = compare_linear(
            rank, world, *data, chunk_size=None, fused_oracle=True, reduction=red, z_loss=0.01
        )
    data = make_linear(210, (17,), torch.float64, True, weighted=True)
    for red in ("mean", "none"):  # logit_scale (Cohere/Granite) before softcap, folded into the rows and bias
        out[f"f64 logit_scale softcap vs single-process, {red}"] = compare_linear(
            rank, world, *data, chunk_size=5, fused_oracle=True, reduction=red, logit_scale=0.5, softcap=4.0,
            label_smoothing=0.1,
        )  # fmt: skip
    data = make_linear(201, (16,), torch.float64, True)
    out["default chunk_size"] = compare_linear(rank, world, *data, chunk_size=None, reduction="sum")
    out["only W requires grad"] = compare_linear(rank, world, *data, grads=(False, True, False))
    out["only input requires grad"] = compare_linear(rank, world, *data, grads=(True, False, False))
    # default chunking with unequal shards and a tiny budget: several token blocks, planned from the widest
    # shard so that every rank makes the same number of per-block combines (3 ranks: 7/11/5 would differ)
    saved = dict(linear_plan.DEFAULT_MEMORY_BUDGET), dict(linear_plan.MIN_BLOCK_ROWS)
    linear_plan.DEFAULT_MEMORY_BUDGET["cpu"], linear_plan.MIN_BLOCK_ROWS["cpu"] = 1400, 1
    try:
        data = make_linear(205, (21,), torch.float64, True, weighted=True)
        out["default chunking, several blocks"] = compare_linear(rank, world, *data, chunk_size=None, label_smoothing=0.1)
    finally:
        linear_plan.DEFAULT_MEMORY_BUDGET.update(saved[0])
        linear_plan.MIN_BLOCK_ROWS.update(saved[1])
    # blocks of 4 rows and 10 vocabulary columns: the widest shards split into pieces, the narrow ones not
    data = make_linear(206, (13,), torch.float64, True, weighted=True)
    for red in ("mean", "none"):
        out[f"vocabulary pieces, {red}"] = compare_linear(
            rank, world, *data, chunk_size=4, memory_budget=1000, reduction=red, label_smoothing=0.1, z_loss=0.01
        )
    data = make_linear(207, (2, 9), torch.float64, False)
    out["accumulate_dtype=weight"] = compare_linear(rank, world, *data, accumulate_dtype="weight", z_loss=0.01)
    data = make_linear(202, (12,), torch.float64, True, target_hi=SIZES[world][0])
    out["no target outside rank 0"] = compare_linear(rank, world, *data, label_smoothing=0.1)
    data = make_linear(203, (12,), torch.float64, True, ignore_frac=1.0, weighted=True)
    out["all ignored"] = compare_linear(rank, world, *data, label_smoothing=0.1, z_loss=0.01)
    lo, hi = my_range(rank, world)
    x, w, b, target, _, _ = make_linear(204, (6,), torch.float64, True)
    vp = cd.vocab_parallel_linear_cross_entropy
    last = rank == world - 1
    out["error: D mismatch on the last rank"] = _capture(lambda: vp(x, w[lo:hi, :-1] if last else w[lo:hi], target))
    out["error: bias size"] = _capture(lambda: vp(x, w[lo:hi], target, linear_bias=b))
    out["error: chunk_size 0"] = _capture(lambda: vp(x, w[lo:hi], target, chunk_size=0))
    out["error: memory_budget differs"] = _capture(
        lambda: vp(x, w[lo:hi], target, memory_budget=1 << 20 if rank == 0 else None)
    )
    out["error: bias on rank 0 only"] = _capture(
        lambda: vp(x, w[lo:hi], target, linear_bias=b[lo:hi] if rank == 0 else None)
    )
    out["error: input requires grad on rank 0 only"] = _capture(
        lambda: vp(x.clone().requires_grad_(rank == 0), w[lo:hi], target)
    )
    out["error: weight requires grad on the last rank only"] = _capture(
        lambda: vp(x, w[lo:hi].clone().requires_grad_(last), target)
    )
    return out


def _log_prob_grads(out, leaves, seed):
    """Backward of a random per-token upstream gradient on both outputs; the leaves' gradients (None if none)."""
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (out.log_probs, out.entropy)]
    (out.log_probs * ups[0]).sum().add((out.entropy * ups[1]).sum()).backward()
    return [None if p is None else p.grad for p in leaves]


def _log_prob_problems(got, want, got_grads, want_grads, dtype):
    problems = [check_same(getattr(got, f), getattr(want, f), dtype, f) for f in got._fields]
    problems += [check_same(a, b, dtype, f"grad {i}") for i, (a, b) in enumerate(zip(got_grads, want_grads))]
    return next((p for p in problems if p), None)


LOG_PROB_OPTIONS = [dict(), dict(temperature=0.7), dict(softcap=4.0, temperature=1.3, ignore_index=4)]
STATS = dict(log_sum_sq_probs=True, mean_logits=True, is_top1=True)  # the statistics without gradient, always on here


def log_prob_job(rank, world):
    """vocab_parallel_token_log_probs and its fused form vs single-process crossent, float64 to 1e-10: one id and
    K = 3 ids per position, every option set, vocabulary pieces in the fused loop; errors raised on every rank."""
    out = {}
    lo, hi = my_range(rank, world)
    for i, (k, extra) in enumerate(itertools.product([None, 3], LOG_PROB_OPTIONS)):
        ign = extra.get("ignore_index", -100)
        logits, target, _, _ = make_data(300 + i, (17,), torch.float64, ignore_index=ign)
        index = target if k is None else torch.stack([target, target.roll(1), torch.full_like(target, 2)], -1)
        z = logits[..., lo:hi].clone().requires_grad_()
        got = cd.vocab_parallel_token_log_probs(z, index, entropy=True, **STATS, **extra)
        got_grads = _log_prob_grads(got, [z], i)
        full = logits.clone().requires_grad_()
        want = crossent.token_log_probs(full, index, entropy=True, **STATS, **extra)
        want_grads = [g[..., lo:hi] for g in _log_prob_grads(want, [full], i)]
        out[f"rows K={k} {extra}"] = _log_prob_problems(got, want, got_grads, want_grads, torch.float64)
        x, w, b, _, _, _ = make_linear(310 + i, (13,), torch.float64, True)
        for chunking in (dict(chunk_size=5), dict(chunk_size=4, memory_budget=1000)):
            leaves = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()]
            idx = index[:13]
            got = cd.vocab_parallel_linear_token_log_probs(leaves[0], leaves[1], idx, linear_bias=leaves[2],
                                                           entropy=True, **STATS, **chunking, **extra)  # fmt: skip
            got_grads = _log_prob_grads(got, leaves, i)
            ref = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
            want = crossent.token_log_probs(F.linear(*ref), idx, entropy=True, **STATS, **extra)
            want_grads = _log_prob_grads(want, ref, i)
            want_grads = [want_grads[0], want_grads[1][lo:hi], want_grads[2][lo:hi]]
            out[f"fused K={k} {extra} {chunking}"] = _log_prob_problems(got, want, got_grads, want_grads, torch.float64)
    logits, target, _, _ = make_data(320, (6,), torch.float32)
    z = logits[..., lo:hi].clone().requires_grad_()
    got = cd.vocab_parallel_token_log_probs(z, target, entropy=True)
    want = crossent.token_log_probs(logits, target, entropy=True)
    out["f32 rows"] = _log_prob_problems(got, want, [], [], torch.float32)
    # top-1 ties: the row max at the last column of rank 0 and the first of rank 1 (the earlier wins), and twice
    # inside rank 0; the ids each tied column and one after
    edge = my_range(1, world)[0]
    tied = logits.double().clone()
    tied[:3, edge - 1] = tied[:3, edge] = 40.0
    tied[3:, 1] = tied[3:, 2] = 40.0
    cols = torch.tensor([[edge - 1, edge, edge + 1]] * 3 + [[1, 2, 0]] * 3)
    got = cd.vocab_parallel_token_log_probs(tied[..., lo:hi], cols, **STATS)
    want = crossent.token_log_probs(tied, cols, **STATS)
    out["top-1 ties across ranks"] = _log_prob_problems(got, want, [], [], torch.float64) or check_same(
        got.is_top1, cols == cols[:, :1], torch.float64, "is_top1 vs first column")
    vp = cd.vocab_parallel_token_log_probs
    last = rank == world - 1
    out["error: id out of range"] = _capture(lambda: vp(logits[..., lo:hi], torch.full((6,), C)))
    out["error: index shape differs on the last rank"] = _capture(
        lambda: vp(logits[..., lo:hi], torch.zeros(6, 2 if last else 1, dtype=torch.int64)))
    out["error: temperature on rank 0"] = _capture(lambda: vp(logits[..., lo:hi], target, temperature=0.0 if rank == 0 else 1.0))
    out["error: entropy differs"] = _capture(lambda: vp(logits[..., lo:hi], target, entropy=rank == 0))
    return out


CASES = {"parity": parity_job, "edge": edge_job, "errors": error_job, "linear": linear_job, "log_probs": log_prob_job}


def all_job(rank, world):
    """Every case group in one spawn per world size (spawning costs seconds of imports per rank)."""
    return {name: fn(rank, world) for name, fn in CASES.items()}


JOBS = {**CASES, "all": all_job}


# --- return_stats, and impl="triton" under Triton's interpreter (tests/test_distributed.py, 2 ranks) ------

STATS_OPTIONS = [
    dict(),  # z_loss = 0: the z part must be exactly zero, on every rank
    dict(z_loss=0.05, weighted=True),  # weighted mean denominator with ignored positions
    # every option, ignore_index inside [0, C) (a real class skipped); the cap bites on ~N(0, 9) logits
    dict(ignore_index=4, label_smoothing=0.1, z_loss=0.02, softcap=5.0, weighted=True),
]


def _stats_problem(got, want, dtype, what):
    """None if ``got`` is a CrossEntropyStats equal to ``want`` field by field (value, shape, dtype) and its
    statistics carry no gradient; else what differs."""
    if type(got) is not crossent.CrossEntropyStats:
        return f"{what}: expected CrossEntropyStats, got {type(got).__name__}"
    if got.lse.requires_grad or got.z_loss.requires_grad:
        return f"{what}: lse / z_loss must not require grad"
    for name in ("loss", "lse", "z_loss"):
        problem = check_same(getattr(got, name).detach(), getattr(want, name).detach(), dtype, f"{what} {name}")
        if problem:
            return problem
    return None


def _stats_cases(rank, world):
    """vocab_parallel_* with return_stats=True vs single-process crossent with return_stats=True, float64:
    loss, lse, z part, and (the stats do not break backward) the gradients."""
    lo, hi = my_range(rank, world)
    out = {}
    for i, (red, batch, extra) in enumerate(itertools.product(["none", "mean", "sum"], [(17,), (3, 5)], STATS_OPTIONS)):
        opts = dict(extra, reduction=red, return_stats=True)
        weighted = opts.pop("weighted", False)
        ign = opts.get("ignore_index", -100)
        name = f"{batch} {red} weight={weighted} {extra}"
        # logits version: (..., V_local) slices vs cross_entropy on the full logits (class dim 1 for 3-d)
        logits, target, weight, upstream = make_data(300 + i, batch, torch.float64, ignore_index=ign, weighted=weighted)
        z = logits[..., lo:hi].clone().requires_grad_()
        got = cd.vocab_parallel_cross_entropy(z, target, weight=weight, **opts)
        full = logits.clone().requires_grad_()
        want = crossent.cross_entropy(full.movedim(-1, 1) if full.dim() > 2 else full, target, weight, **opts)
        problem = _stats_problem(got, want, torch.float64, "logits")
        if problem is None and tuple(got.lse.shape) != batch:
            problem = f"logits lse shape {tuple(got.lse.shape)} != {batch}"
        if problem is None:
            _backward(got.loss, upstream, red)
            _backward(want.loss, upstream, red)
            problem = check_same(z.grad, full.grad[..., lo:hi], torch.float64, "logits grad")
        out["logits " + name] = problem
        # fused linear version: this rank's head rows (and bias) vs linear_cross_entropy on the full head
        x, w, b, target, weight, upstream = make_linear(400 + i, batch, torch.float64, True, ignore_index=ign,
                                                        weighted=weighted)  # fmt: skip
        leaves = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()]
        got = cd.vocab_parallel_linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                                     weight=weight, chunk_size=5, **opts)  # fmt: skip
        ref = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
        want = crossent.linear_cross_entropy(ref[0], ref[1], target, linear_bias=ref[2], weight=weight, chunk_size=5,
                                             **opts)  # fmt: skip
        problem = _stats_problem(got, want, torch.float64, "linear")
        if problem is None and tuple(got.lse.shape) != batch:
            problem = f"linear lse shape {tuple(got.lse.shape)} != {batch}"
        if problem is None:
            _backward(got.loss, upstream, red)
            _backward(want.loss, upstream, red)
            for gname, leaf, r, sl in zip(("dX", "dW", "db"), leaves, ref, (slice(None), slice(lo, hi), slice(lo, hi))):
                problem = problem or check_same(leaf.grad, r.grad[sl], torch.float64, f"linear {gname}")
        out["linear " + name] = problem
    return out


def _count_triton_launches():
    """A one-element list counting launches of crossent's Triton row kernels in this process, via Triton's own
    pre-run hooks on every jitted function of :mod:`crossent.kernels.triton_rows` (helpers never launch)."""
    from crossent.kernels import triton_rows

    counter = [0]

    def hook(*args, **kwargs):
        counter[0] += 1

    kernels = [k for k in vars(triton_rows).values() if callable(getattr(k, "add_pre_run_hook", None))]
    for kernel in kernels:
        kernel.add_pre_run_hook(hook)
    return counter


def _triton_cases(rank, world):
    """impl="triton" vs impl="torch" for both vocab-parallel functions on float32 CPU tensors, under Triton's
    interpreter: loss and gradients, and whether Triton kernels ran. A ``str`` "unavailable: ..." when Triton
    is not installed."""
    import os
    import sys

    # Triton fixes interpreter vs compiled mode at its first import, and these ranks hold CPU tensors: set
    # the variable here, in the rank's own process (spawned ranks inherit the parent's environment, which
    # has it only where conftest's _triton_mode set it, i.e. without a GPU), before anything imports Triton.
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
    except ImportError as e:
        return f"unavailable: {e}"
    if type(tl.zeros).__name__ != "InterpretedFunction":
        return {"interpreter": "Triton was imported in compiled mode before TRITON_INTERPRET=1 was set"}
    launches = _count_triton_launches()
    lo, hi = my_range(rank, world)
    out = {}

    def run(fn, impl, must_launch):
        """fn() under ``impl``; a problem if Triton ran under "torch", or did not run where it must."""
        before = launches[0]
        result = fn()
        ran = launches[0] - before
        if impl == "torch" and ran:
            return result, f"impl='torch' launched {ran} Triton kernels"
        if impl == "triton" and must_launch and not ran:
            return result, "impl='triton' launched no Triton kernel (silent fallback to torch)"
        return result, None

    for i, (red, extra) in enumerate(itertools.product(["none", "mean"], STATS_OPTIONS)):
        opts = dict(extra, reduction=red)
        weighted = opts.pop("weighted", False)
        ign = opts.get("ignore_index", -100)
        name = f"{red} weight={weighted} {extra}"
        # logits version: this rank's gradient columns run the Triton row backward (shard-aware) kernel
        data = make_data(500 + i, (3, 5), torch.float32, ignore_index=ign, weighted=weighted)
        logits, target, weight, upstream = data
        results, problems = {}, []
        for impl in ("torch", "triton"):
            def step(impl=impl):
                z = logits[..., lo:hi].clone().requires_grad_()
                loss = cd.vocab_parallel_cross_entropy(z, target, weight=weight, impl=impl, **opts)
                _backward(loss, upstream, red)
                return loss.detach(), z.grad
            results[impl], problem = run(step, impl, must_launch=True)
            problems.append(problem)
        problems += [check_same(got, want, torch.float32, what)
                     for what, got, want in zip(("loss", "grad"), results["triton"], results["torch"])]  # fmt: skip
        out["logits " + name] = next((p for p in problems if p), None)
        # fused linear version: with "none" the backward recomputes each slice's block gradient in Triton
        # (with "mean" the gradient is formed in forward, from row stats that need the other rank: torch)
        x, w, b, target, weight, upstream = make_linear(600 + i, (11,), torch.float32, True, ignore_index=ign,
                                                        weighted=weighted)  # fmt: skip
        results, problems = {}, []
        for impl in ("torch", "triton"):
            def step(impl=impl):
                leaves = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(),
                          b[lo:hi].clone().requires_grad_()]  # fmt: skip
                loss = cd.vocab_parallel_linear_cross_entropy(
                    leaves[0], leaves[1], target, linear_bias=leaves[2], weight=weight, chunk_size=4, impl=impl, **opts
                )
                _backward(loss, upstream, red)
                return (loss.detach(), *(leaf.grad for leaf in leaves))
            results[impl], problem = run(step, impl, must_launch=red == "none")
            problems.append(problem)
        pairs = zip(("loss", "dX", "dW", "db"), results["triton"], results["torch"])
        problems += [check_same(got, want, torch.float32, what) for what, got, want in pairs]
        out["linear " + name] = next((p for p in problems if p), None)
    return out


def stats_job(rank, world):
    """return_stats parity and impl="triton" parity, one spawn (the Triton part first: it sets the variable
    that decides Triton's mode before anything in this process could import Triton)."""
    triton_results = _triton_cases(rank, world)
    return {"triton": triton_results, "stats": _stats_cases(rank, world)}


JOBS["stats"] = stats_job


# --- vocab-parallel fused distillation (tests/test_distill_distributed.py) -------------------------------------

DISTILL_OPTIONS = [
    dict(beta=0.0),  # forward KL: 2 passes per block
    dict(beta=1.0, temperature=2.0),  # reverse KL: 3 passes
    dict(beta=0.4, hard_weight=0.3, softcap=5.0),  # the mixture with the hard loss (T = 1) and the cap
    dict(beta=0.5, temperature=1.5, hard_weight=0.5),  # T ≠ 1: the untempered student's lse is the third
]


def distill_job(rank, world):
    """Each rank's loss and gradients vs single-process linear_distill_loss on the full heads (float64)."""
    out = {}
    lo, hi = my_range(rank, world)
    for k, options in enumerate(DISTILL_OPTIONS):
        for reduction in ("mean", "none"):
            g = torch.Generator().manual_seed(100 + k)
            x = torch.randn(3, 7, 6, generator=g, dtype=torch.float64)
            w, b = torch.randn(C, 6, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
            x_t, w_t = torch.randn(3, 7, 4, generator=g, dtype=torch.float64), torch.randn(C, 4, generator=g, dtype=torch.float64)
            b_t = torch.randn(C, generator=g, dtype=torch.float64)
            target = torch.randint(0, C, (3, 7), generator=g)
            target[torch.rand(3, 7, generator=g) < 0.25] = -100
            upstream = torch.randn(3, 7, generator=g, dtype=torch.float64)
            kw = dict(target=target, reduction=reduction, chunk_size=5, **options)
            full = [p.clone().requires_grad_() for p in (x, w, b)]
            want = crossent.linear_distill_loss(full[0], full[1], x_t, w_t, linear_bias=full[2], teacher_bias=b_t, **kw)
            _backward(want, upstream, reduction)
            mine = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()]
            got = cd.vocab_parallel_linear_distill_loss(mine[0], mine[1], x_t, w_t[lo:hi], linear_bias=mine[2],
                                                         teacher_bias=b_t[lo:hi], **kw)  # fmt: skip
            _backward(got, upstream, reduction)
            name = f"{options} {reduction}"
            problems = [check_same(got.detach(), want.detach(), torch.float64, "loss"),
                        check_same(mine[0].grad, full[0].grad, torch.float64, "dX"),
                        check_same(mine[1].grad, full[1].grad[lo:hi], torch.float64, "dW"),
                        check_same(mine[2].grad, full[2].grad[lo:hi], torch.float64, "db")]  # fmt: skip
            out[name] = "; ".join(p for p in problems if p) or None
    bad_t = w_t[lo:hi] if rank == 0 else w_t[lo : hi - 1]  # the teacher's shard of another size on one rank
    out["error: vocabulary"] = _capture(lambda: cd.vocab_parallel_linear_distill_loss(
        torch.randn(4, 6, dtype=torch.float64), torch.randn(hi - lo, 6, dtype=torch.float64),
        torch.randn(4, 4, dtype=torch.float64), bad_t))  # fmt: skip
    return out


JOBS["distill"] = distill_job
