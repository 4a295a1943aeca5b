"""Package layering, read from the source with ``ast`` (nothing is imported): no import cycles among farmer's
modules, and the model code imports no training code, so a model can be built, loaded and sampled without
the trainer, and training code can change without touching the model.

Every import counts, wherever it stands: at module level, inside a function, or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "farmer"
MODEL = {"farmer.config", "farmer.nn", "farmer.channels", "farmer.flow", "farmer.mixture", "farmer.prior",
         "farmer.guidance", "farmer.model", "farmer.pretrained", "farmer.io", "farmer.pixels"}
TRAINING = {"farmer.train", "farmer.distill", "farmer.data", "farmer.checkpoint", "farmer.evaluation",
            "farmer.objective", "farmer.distributed"}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The farmer modules ``path`` (module ``name``) imports; ``from farmer.x import y`` counts farmer.x.y when
    y is a module, and relative imports are resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imported_modules(path, name, set(names)) for name, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_package() -> None:
    graph = import_graph()
    missing = (MODEL | TRAINING) - set(graph)
    assert not missing, sorted(missing)
    assert "farmer.flow" in graph["farmer.model"] and "farmer.model" in graph["farmer.train"]


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_among_farmer_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_code_imports_no_training_code() -> None:
    graph = import_graph()
    wrong = {name: sorted(graph[name] & TRAINING) for name in sorted(MODEL) if graph[name] & TRAINING}
    assert not wrong, f"model modules import training modules: {wrong}"
