"""The layering docs/architecture.md promises: imports go down only, and no module imports itself back.

Read from the source with ``ast`` (every ``import``, also those inside functions), so the test fails as
soon as an upward import is written, whether or not it runs.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "crossent"

# layer of each top-level part; a module may import only parts of the same or a lower layer
LAYERS = {
    "reference": 0,
    "_options": 1, "_modes": 1, "_precision": 1, "_cpu_level": 1, "_checks": 1, "_reduction": 1, "_results": 1,
    "_dtensor": 2,
    "kernels": 2,
    "_autograd": 3,
    "functional": 4, "functional_log_probs": 4, "functional_distill": 4,
    "modules": 5, "distributed": 5, "transformers": 5, "trl": 5,
    "bench": 6, "cli": 6, "__main__": 6, "__init__": 6,
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """The crossent modules ``path`` imports (``from crossent.x import y`` counts x.y when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("crossent")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crossent"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if _exists(sub) else node.module)
    return found


def _exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


GRAPH = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_only(module):
    if module == "crossent":
        return  # the package's __init__ re-exports the public names
    mine = LAYERS[_part(module)]
    upward = [m for m in GRAPH[module] if m != "crossent" and LAYERS[_part(m)] > mine]
    assert not upward, f"{module} (layer {mine}) imports {upward} from a higher layer"


def test_no_import_cycle():
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH or nxt == "crossent":
                continue
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_kernels_package_imports_nothing():
    assert GRAPH["crossent.kernels"] == set()
