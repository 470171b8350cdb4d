"""Every Triton launch crossent's public API makes, recorded under the interpreter and compiled for real GPUs.

Two steps, each in a fresh process (Triton fixes interpreter vs compiler once per process, at import):

    python tests/_triton_launches.py record LAUNCHES.json
        Runs each public function that can launch Triton (``impl="triton"``, CPU tensors, ``TRITON_INTERPRET=1`` set
        here) over options × dtype (fp32, bf16, fp16) × target kind × gradient outputs, and writes every distinct
        launch: kernel (module, name), arguments (tensor dtype and address mod 16, or the Python value), keyword
        arguments (constexprs, ``num_warps``, compile options). The options come from the functions' signatures
        (:func:`option_values`), the kernels from the launches themselves: a new kernel, constexpr or keyword
        option is covered without editing this file (an option of a kind it cannot vary makes it fail, by name).

    python tests/_triton_launches.py compile LAUNCHES.json RESULTS.json [--arch 80,90,100] [--jobs N]
                                             [--cache DIR] [--table TABLE.json] [--write-table TABLE.json]
        Gives each recorded launch Triton's own specialization for a CUDA target (the binder a GPU launch runs:
        argument types, ``tt.divisibility``, integers specialized to constexpr), keeps one launch per distinct
        compiled variant, compiles each with ``triton.compile`` for every architecture (Triton's bundled ptxas, no
        GPU needed) in ``N`` worker processes, reads registers, local memory (spills) and shared memory from
        ``cuobjdump --dump-resource-usage`` and Triton's metadata, and writes one result per (variant, arch).
        Each result is keyed by Triton's own hash of what its cubin depends on (:func:`result_key`); one found in
        the committed table (``--table``: ``tests/triton_compile_results.json``) or a kept ``--cache`` directory
        is read instead of compiled, so only variants whose kernel, options or toolchain changed are compiled.
        ``--write-table`` refreshes the committed table with exactly this run's results.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import typing
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

if __name__ == "__main__":  # a step in a fresh process (imported, e.g. by pytest's doctest collection: no change)
    if sys.argv[1:2] == ["record"]:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
    else:
        os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Vocabulary sizes: SMALL gives the short-row launch (BLOCK 128, 1 warp); ALIGNED and ODD fill the launch table's
# largest BLOCK for every element size (8192 for 16-bit logits, 4096 fp32: more than one block per row), with a
# multiple of 16 columns (Triton then specializes sizes and strides as divisible by 16: other loads) and without.
SMALL, ALIGNED, ODD = 100, 9216, 9000
ROWS, DIM, IDS = 4, 8, 2  # positions, hidden size of the linear forms, ids per position (token_log_probs' K)

# Values for keyword options the rules of option_values cannot derive from the annotation (one per meaning:
# beta's three kernel modes; a memory budget small enough to split the vocabulary into pieces).
NAMED_VALUES: Dict[str, Tuple[Any, ...]] = {
    "impl": ("triton",),
    "ignore_index": (-100,),  # a runtime argument; every target below holds one ignored position
    "beta": (0.0, 0.5, 1.0),
    "temperature": (1.0, 0.7),
    "softcap": (None, 20.0),
    "logit_scale": (None, 0.5),
    "chunk_size": (None, 2),
    # a vocabulary split: room for at least one row of ALIGNED columns (fp32 block: 37 KB; 16-bit: 55 KB) but not
    # ROWS of them, in each of the budget's buffers (one; distillation: 3 or 6, both heads' and the step's)
    "memory_budget": (None, 64 * 1024),
    "linear_distill_loss.memory_budget": (None, 384 * 1024),
}
# Options that need another one on (its last value) to be valid when they are tried alone.
NEEDS = {"hard_weight": "target"}
TENSOR_OPTIONS = ("weight", "target", "linear_bias", "teacher_bias")  # optional tensors: absent, then given
GIVEN = "<given>"  # an optional tensor's second value: built by _option_tensor


# --- the grid ------------------------------------------------------------------------------------------------


def option_values(fn: Callable) -> Dict[str, Tuple[Any, ...]]:
    """Parameter with a default -> the values to try, default first: NAMED_VALUES, else by annotation (bool: both;
    Literal: each; float: default and default + 0.5; Optional tensor: None and one). Raises for any other kind,
    naming the function and parameter, so that a new option cannot go untried."""
    import inspect

    hints = typing.get_type_hints(fn)
    values = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.default is inspect.Parameter.empty:  # the inputs: built by the case
            continue
        hint = hints.get(name)
        if f"{fn.__name__}.{name}" in NAMED_VALUES:
            values[name] = NAMED_VALUES[f"{fn.__name__}.{name}"]
        elif name in NAMED_VALUES:
            values[name] = NAMED_VALUES[name]
        elif name in TENSOR_OPTIONS:
            values[name] = (None, GIVEN)
        elif hint is bool:
            values[name] = (param.default, not param.default)
        elif typing.get_origin(hint) is typing.Literal:
            values[name] = (param.default, *(v for v in typing.get_args(hint) if v != param.default))
        elif hint is float:
            values[name] = (param.default, param.default + 0.5)
        else:
            raise TypeError(f"{fn.__name__}({name}: {hint}): add its values to NAMED_VALUES in {__file__}")
    return values


def option_sets(values: Dict[str, Tuple[Any, ...]]) -> List[Dict[str, Any]]:
    """The defaults; each option's other values, one at a time; every option at its last value (the heaviest
    combination), and that with each middle value of the options that have more than two."""
    defaults = {name: vals[0] for name, vals in values.items()}
    every = {name: vals[-1] for name, vals in values.items()}
    sets = [defaults]
    for name, vals in values.items():
        needed = {NEEDS[name]: values[NEEDS[name]][-1]} if name in NEEDS and NEEDS[name] in values else {}
        sets += [dict(defaults, **needed, **{name: value}) for value in vals[1:]]
    sets += [every]
    sets += [dict(every, **{name: value}) for name, vals in values.items() for value in vals[1:-1]]
    return sets


class Case(typing.NamedTuple):
    """A public function, how to build its positional inputs, and its target kinds."""

    fn: Callable
    inputs: Callable  # (dtype, num_classes, kind, options, gen) -> (positional tensors, which get a gradient)
    kinds: Tuple[str, ...] = ("index",)


def _ids(shape, num_classes: int, gen) -> torch.Tensor:
    """Class ids with the first one ignored (-100): every launch sees an ignored position."""
    ids = torch.randint(0, num_classes, shape, generator=gen)
    ids.view(-1)[0] = -100
    return ids


def _logits(dtype, num_classes: int, gen, rows: int = ROWS) -> torch.Tensor:
    return torch.randn(rows, num_classes, generator=gen).to(dtype)


def _head(dtype, num_classes: int, gen):
    """(hidden states, head weight) of a linear form."""
    x = torch.randn(ROWS, DIM, generator=gen).to(dtype)
    return x, (torch.randn(num_classes, DIM, generator=gen) / DIM**0.5).to(dtype)


def _ce_inputs(dtype, num_classes, kind, options, gen):
    z = _logits(dtype, num_classes, gen)
    if kind == "probs":
        return (z, torch.softmax(torch.randn(ROWS, num_classes, generator=gen), -1).to(dtype)), (0, 1)
    return (z, _ids((ROWS,), num_classes, gen)), (0,)


def _linear_ce_inputs(dtype, num_classes, kind, options, gen):
    return (*_head(dtype, num_classes, gen), _ids((ROWS,), num_classes, gen)), (0, 1)


def _log_prob_inputs(dtype, num_classes, kind, options, gen):
    shape = (ROWS,) if kind == "index" else (ROWS, IDS)
    return (_logits(dtype, num_classes, gen), _ids(shape, num_classes, gen)), (0,)


def _linear_log_prob_inputs(dtype, num_classes, kind, options, gen):
    shape = (ROWS,) if kind == "index" else (ROWS, IDS)
    return (*_head(dtype, num_classes, gen), _ids(shape, num_classes, gen)), (0, 1)


def _distill_inputs(dtype, num_classes, kind, options, gen):
    teacher = _logits(dtype, num_classes, gen)
    if options.get("teacher_is_log_probs"):
        teacher = teacher.float().log_softmax(-1).to(dtype)
    return (_logits(dtype, num_classes, gen), teacher), (0,)


def _linear_distill_inputs(dtype, num_classes, kind, options, gen):
    return (*_head(dtype, num_classes, gen), *_head(dtype, num_classes, gen)), (0, 1)


def cases() -> Dict[str, Case]:
    import crossent

    return {
        "cross_entropy": Case(crossent.cross_entropy, _ce_inputs, ("index", "probs")),
        "linear_cross_entropy": Case(crossent.linear_cross_entropy, _linear_ce_inputs),
        "token_log_probs": Case(crossent.token_log_probs, _log_prob_inputs, ("index", "ids")),
        "linear_token_log_probs": Case(crossent.linear_token_log_probs, _linear_log_prob_inputs, ("index", "ids")),
        "distill_loss": Case(crossent.distill_loss, _distill_inputs),
        "linear_distill_loss": Case(crossent.linear_distill_loss, _linear_distill_inputs),
    }


def _option_tensor(name: str, dtype, num_classes: int, gen) -> torch.Tensor:
    if name == "weight":
        return torch.rand(num_classes, generator=gen) + 0.5
    if name == "target":
        return _ids((ROWS,), num_classes, gen)
    return (0.1 * torch.randn(num_classes, generator=gen)).to(dtype)  # a bias


def _outputs(result) -> List[torch.Tensor]:
    """The floating-point tensors of a result (a tensor, or a NamedTuple of tensors and Nones)."""
    parts = [result] if isinstance(result, torch.Tensor) else list(result)
    return [p for p in parts if isinstance(p, torch.Tensor) and p.is_floating_point() and p.requires_grad]


def run_case(case: Case, dtype, num_classes: int, kind: str, options: Dict[str, Any], gen) -> None:
    """One call without gradients; then a backward from each differentiable output alone, and from all of them."""
    args, grad_args = case.inputs(dtype, num_classes, kind, options, gen)
    kwargs = {k: _option_tensor(k, dtype, num_classes, gen) if v is GIVEN else v for k, v in options.items()}
    with torch.no_grad():
        case.fn(*args, **kwargs)

    def outputs():
        leaves = [a.detach().requires_grad_() if i in grad_args else a for i, a in enumerate(args)]
        return _outputs(case.fn(*leaves, **kwargs))

    outs = outputs()
    subsets = [[i] for i in range(len(outs))] if len(outs) > 1 else []
    for subset in [list(range(len(outs)))] + subsets:
        outs = outs or outputs()
        sum((outs[i] * torch.randn(outs[i].shape, generator=gen)).sum() for i in subset).backward()
        outs = None


def grid(names: Optional[List[str]] = None) -> Iterator[Tuple[str, Case, Any, int, str, Dict[str, Any]]]:
    """(name, case, dtype, C, kind, options): every option set at ALIGNED; the defaults and every option on at ODD
    and SMALL."""
    for name, case in cases().items():
        if names and name not in names:
            continue
        values = option_values(case.fn)
        sets = option_sets(values)
        every = {k: vals[-1] for k, vals in values.items()}
        for dtype in DTYPES:
            for kind in case.kinds:
                for num_classes, chosen in ((ALIGNED, sets), (ODD, [sets[0], every]), (SMALL, [sets[0], every])):
                    for options in chosen:
                        yield name, case, dtype, num_classes, kind, options


# --- step 1: record ------------------------------------------------------------------------------------------


def describe(value) -> list:
    """A launch argument as JSON: a tensor's dtype and address mod 16 (what Triton specializes on), else the value."""
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).split(".")[-1], value.data_ptr() % 16]
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    raise TypeError(f"a kernel argument of type {type(value).__name__}: teach describe() and rebuild() about it")


def record(path: str, names: Optional[List[str]] = None, part: int = 0, parts: int = 1) -> None:
    """Run the grid (its calls ``part``, ``part + parts``, ... : one share of it) under the interpreter and write
    the distinct crossent launches, each with the first call that made it."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: Dict[str, dict] = {}
    caller = [""]
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        if fn.__module__.split(".")[0] == "crossent":
            launch = {"module": fn.__module__, "kernel": fn.__qualname__, "args": [describe(a) for a in args],
                      "kwargs": {k: describe(v) for k, v in sorted(kwargs.items())}}  # fmt: skip
            launches.setdefault(json.dumps(launch, sort_keys=True), dict(launch, caller=caller[0]))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    torch.set_num_threads(1)  # tiny tensors; the shares of the grid run side by side
    gen = torch.Generator().manual_seed(0)
    calls = 0
    try:
        for index, (name, case, dtype, num_classes, kind, options) in enumerate(grid(names)):
            if index % parts != part:
                continue
            shown = {k: ("tensor" if v is GIVEN else v) for k, v in options.items() if k != "impl"}
            caller[0] = f"{name}({str(dtype).split('.')[-1]}, C={num_classes}, {kind}, {shown})"
            try:
                run_case(case, dtype, num_classes, kind, options, gen)
            except Exception as err:
                raise RuntimeError(f"{caller[0]} raised {type(err).__name__}") from err
            calls += 1
    finally:
        InterpretedFunction.run = original
    with open(path, "w") as f:
        json.dump({"calls": calls, "launches": list(launches.values())}, f)


# --- step 2: compile -----------------------------------------------------------------------------------------
# Per-SM limits by compute capability (CUDA programming guide, "Technical Specifications per Compute Capability"):
# resident warps, 32-bit registers, shared memory per SM and the most one block may use (opt-in); registers are
# allocated per warp in units of 256; each resident block also reserves 1 KiB of shared memory.
ARCH_LIMITS = {
    80: dict(warps=64, regs=65536, smem_sm=164 * 1024, smem_block=163 * 1024, blocks=32),
    90: dict(warps=64, regs=65536, smem_sm=228 * 1024, smem_block=227 * 1024, blocks=32),
    100: dict(warps=64, regs=65536, smem_sm=228 * 1024, smem_block=227 * 1024, blocks=32),
}


RESULT_FORMAT = 1  # raise when compile_one's result changes meaning: every kept result is then recomputed


def rebuild(desc: list):
    """The inverse of :func:`describe`: a small CPU tensor of the dtype at the recorded address mod 16, or the value."""
    kind, value = desc[0], desc[1]
    if kind == "tensor":
        offset = desc[2]
        return torch.empty(64, dtype=torch.uint8)[offset : offset + 16].view(getattr(torch, value))
    return value


@functools.lru_cache(maxsize=None)
def backend(arch: int):
    """Triton's CUDA backend for ``arch`` and its hash (which runs ptxas --version): once per process."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    made = make_backend(GPUTarget("cuda", arch, 32))
    return made, made.hash()


@functools.lru_cache(maxsize=None)
def binder(module: str, kernel: str, arch: int):
    """The kernel and the argument binder a GPU launch of it runs on ``arch``."""
    import importlib

    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(module), kernel)
    return fn, create_function_from_signature(fn.signature, fn.params, backend(arch)[0])


def specialize(launch: dict, arch: int):
    """(fn, signature, constexprs, attrs, options) that the recorded launch compiles with on ``arch``: Triton's
    own binder and argument packing, as ``JITFunction.run`` does on a GPU of that architecture."""
    fn, bind = binder(launch["module"], launch["kernel"], arch)
    args = [rebuild(a) for a in launch["args"]]
    kwargs = {k: rebuild(v) for k, v in launch["kwargs"].items()}
    bound, specialization, options = bind(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend(arch)[0], kwargs, bound, specialization, options)
    return fn, signature, constexprs, attrs, options


def variant_key(launch: dict, arch: int) -> str:
    """What the compiled kernel depends on: equal keys compile to the same cubin."""
    _, signature, constexprs, attrs, options = specialize(launch, arch)
    parts = (launch["module"], launch["kernel"], arch, sorted(signature.items()), sorted(constexprs.items()),
             sorted(attrs.items()), sorted(options.__dict__.items()))  # fmt: skip
    return repr(parts)


def variant_name(launch: dict) -> str:
    """The launch in a few words: logits dtype, BLOCK / num_warps, the constexprs that are on (or their value)."""
    import inspect
    import importlib

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    names = list(inspect.signature(fn.fn).parameters)
    first = launch["args"][0]
    words = [first[1] if first[0] == "tensor" else "?"]
    kwargs = {k: v[1] for k, v in launch["kwargs"].items()}
    words.append(f"{kwargs.get('BLOCK', '?')}/{kwargs.get('num_warps', '?')}w")
    for name in names:
        if name in kwargs and name != "BLOCK" and kwargs[name] not in (False, None):
            words.append(name if kwargs[name] is True else f"{name}={kwargs[name]}")
    return " ".join(words)


def resources(cubin: bytes, name: str) -> Dict[str, int]:
    """REG, STACK, SHARED (static), LOCAL of ``name`` in ``cubin``, from ``cuobjdump --dump-resource-usage``."""
    import re
    import subprocess
    import tempfile

    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def occupancy(arch: int, regs: int, shared: int, num_warps: int) -> int:
    """Resident warps per SM for programs of ``num_warps`` warps using ``regs`` registers per thread and ``shared``
    bytes of shared memory (the occupancy calculator's three limits and the blocks-per-SM cap)."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    blocks = min(lim["blocks"], lim["warps"] // num_warps, lim["regs"] // regs_per_warp // num_warps)
    if shared:
        blocks = min(blocks, lim["smem_sm"] // (shared + 1024))
    return blocks * num_warps


def result_key(src, arch: int, options) -> str:
    """Triton's own hash of what a cubin depends on — the kernel's source and that of every function and constexpr
    global it uses, the signature, constexprs, attributes (``ASTSource.hash``), the backend (target and ptxas
    version), the compile options and Triton's version — with ARCH_LIMITS and RESULT_FORMAT. Library paths in the
    options (libdevice's, inside the virtual environment) count by file name only, so that the key is the same in
    every checkout (the committed table, :func:`load_table`, is read in CI's fresh clone)."""
    import hashlib

    import triton

    opts = dict(options.__dict__)
    opts["extern_libs"] = tuple((name, os.path.basename(path)) for name, path in opts.get("extern_libs") or ())
    text = repr((RESULT_FORMAT, ARCH_LIMITS, triton.__version__, src.hash(), backend(arch)[1], sorted(opts.items())))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=None)
def load_table(path: Optional[str]) -> Dict[str, dict]:
    """The committed results (``tests/triton_compile_results.json``: key -> result), read once per process."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["results"]


def write_table(path: str, results: List[dict]) -> None:
    """Keep exactly this run's results as the committed table, one per line (a kernel change reads as a diff)."""
    kept = {r["key"]: {k: v for k, v in r.items() if k not in ("key", "caller", "source")} for r in results
            if "error" not in r}  # fmt: skip
    lines = [f"  {json.dumps(key)}: {json.dumps(kept[key], sort_keys=True)}" for key in sorted(kept)]
    with open(path, "w") as f:
        f.write(f'{{"format": {RESULT_FORMAT}, "results": {{\n' + ",\n".join(lines) + "\n}}\n")


def compile_one(job: Tuple[dict, int, Optional[str], Optional[str]]) -> dict:
    """Compile one launch for one architecture: its resources, or the error (the test reports it). A result whose
    :func:`result_key` is in the committed ``table`` or in the ``cache`` directory is read, not compiled again: the
    key changes with anything the cubin depends on, so a changed kernel is always compiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch, arch, cache, table_path = job
    result = {"kernel": launch["kernel"], "variant": variant_name(launch), "arch": arch, "caller": launch["caller"]}
    try:
        fn, signature, constexprs, attrs, options = specialize(launch, arch)
        src = ASTSource(fn, signature, constexprs, attrs)
        key = result_key(src, arch, options)
        if key in load_table(table_path):
            return dict(load_table(table_path)[key], key=key, caller=launch["caller"], source="table")
        stored = os.path.join(cache, key + ".json") if cache else None
        if stored and os.path.exists(stored):
            with open(stored) as f:
                return dict(json.load(f), key=key, caller=launch["caller"], source="cache")
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        usage = resources(kernel.asm["cubin"], kernel.metadata.name)
    except Exception as err:  # reported per variant: the test fails listing every one
        result["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        return result
    shared = kernel.metadata.shared + usage["SHARED"]
    warps = kernel.metadata.num_warps
    result.update(regs=usage["REG"], local=usage["LOCAL"], stack=usage["STACK"], shared=shared, num_warps=warps,
                  occupancy=occupancy(arch, usage["REG"], shared, warps), shared_limit=ARCH_LIMITS[arch]["smem_block"])
    if stored:
        with open(stored + f".{os.getpid()}", "w") as f:
            json.dump(result, f)
        os.replace(stored + f".{os.getpid()}", stored)
    return dict(result, key=key, source="compiled")


def compile_all(launch_paths: List[str], results_path: str, arches: List[int], jobs: int,
                cache: Optional[str] = None, table_path: Optional[str] = None) -> None:  # fmt: skip
    import multiprocessing

    launches = []
    for path in launch_paths:
        with open(path) as f:
            launches += json.load(f)["launches"]
    distinct: Dict[str, Tuple[dict, int, Optional[str], Optional[str]]] = {}
    for arch in arches:
        for launch in launches:
            distinct.setdefault(variant_key(launch, arch), (launch, arch, cache, table_path))
    work = list(distinct.values())
    if cache:
        os.makedirs(cache, exist_ok=True)
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(compile_one, work, chunksize=4)
    else:
        results = [compile_one(job) for job in work]
    with open(results_path, "w") as f:
        json.dump({"launches": len(launches), "results": results}, f)


def table(results: List[dict]) -> str:
    """The resource table: kernel, variant, then registers / shared bytes / warps per SM for each architecture."""
    arches = sorted({r["arch"] for r in results})
    rows: Dict[Tuple[str, str], Dict[int, dict]] = {}
    for r in results:
        rows.setdefault((r["kernel"], r["variant"]), {})[r["arch"]] = r
    head = f"{'kernel':<22} {'variant':<58}" + "".join(f" {'sm_' + str(a) + ' reg/smem/warps':>24}" for a in arches)
    lines = [head, "-" * len(head)]
    for (kernel, variant), by_arch in sorted(rows.items()):
        cells = []
        for arch in arches:
            r = by_arch.get(arch)
            if r is None:
                cell = "–"
            elif "error" in r:
                cell = "FAILED"
            else:
                cell = f"{r['regs']}/{r['shared']}/{r['occupancy']}" + (f" LOCAL:{r['local']}" if r["local"] else "")
            cells.append(f" {cell:>24}")
        lines.append(f"{kernel:<22} {variant[:58]:<58}" + "".join(cells))
    return "\n".join(lines)


def summary(results: List[dict]) -> str:
    """Per kernel and architecture: variants, registers (fewest–most), most shared bytes, resident warps per SM
    (fewest–most), and the variant with the most registers."""
    groups: Dict[Tuple[str, int], List[dict]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    head = f"{'kernel':<22} {'arch':>6} {'variants':>8} {'registers':>9} {'smem B':>6} {'warps/SM':>8}  heaviest variant"
    lines = [head, "-" * len(head)]
    for (kernel, arch), rs in sorted(groups.items()):
        regs, occ = [r["regs"] for r in rs], [r["occupancy"] for r in rs]
        heavy = max(rs, key=lambda r: (r["regs"], -r["occupancy"]))
        lines.append(f"{kernel:<22} {'sm_' + str(arch):>6} {len(rs):>8} {f'{min(regs)}–{max(regs)}':>9} "
                     f"{max(r['shared'] for r in rs):>6} {f'{min(occ)}–{max(occ)}':>8}  {heavy['variant']} "
                     f"({heavy['regs']} regs, {heavy['occupancy']} warps/SM)")  # fmt: skip
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("launches")
    rec.add_argument("--only", action="append", help="public function name (repeatable); default all")
    rec.add_argument("--part", default="0/1", help="k/n: record the k-th of n shares of the grid")
    comp = sub.add_parser("compile")
    comp.add_argument("launches", nargs="+", help="files written by record")
    comp.add_argument("results")
    comp.add_argument("--arch", default="80,90,100")
    comp.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    comp.add_argument("--cache", help="a directory that keeps each variant's result (see compile_one)")
    comp.add_argument("--table", help="the committed results to read before compiling (see load_table)")
    comp.add_argument("--write-table", help="write this run's results there (the committed table, refreshed)")
    args = parser.parse_args(argv)
    if args.step == "record":
        part, parts = (int(v) for v in args.part.split("/"))
        record(args.launches, args.only, part, parts)
    else:
        compile_all(args.launches, args.results, [int(a) for a in args.arch.split(",")], args.jobs, args.cache,
                    args.table)  # fmt: skip
        with open(args.results) as f:
            results = json.load(f)["results"]
        if args.write_table:
            write_table(args.write_table, results)
        sources = {s: sum(r.get("source") == s for r in results) for s in ("compiled", "cache", "table")}
        print(f"{table(results)}\n\n{summary(results)}\n\nvariants: {sources}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
