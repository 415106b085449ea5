"""The shape of the code: imports point down and no package imports another that imports it back.

Nodes are engine's subpackages (``engine.loop``, ``engine.models``, ...), engine's top-level
modules (``engine.cli``, ``engine.errors``, ...) and ``data_pipeline``; inside ``data_pipeline``,
every module is a node of its own (no module cycle anywhere) and its sub-packages are layered.
Every import counts, the lazy ones inside functions included; only ``if TYPE_CHECKING:`` blocks
(type hints) are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = {"engine.cli", "engine.pretrain", "engine.finetune"}


def _node(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "data_pipeline":
        return "data_pipeline"
    if parts[0] != "engine" or len(parts) == 1:
        return None
    if (ROOT / "engine" / parts[1]).is_dir():
        return f"engine.{parts[1]}"
    return f"engine.{parts[1]}"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for pkg in ("engine", "data_pipeline"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            src = _node(_module_name(path)) or _module_name(path)
            edges = graph.setdefault(src, set())
            for name in _imports(path):
                dst = _node(name)
                if dst is not None and dst != src and _resolves(name):
                    edges.add(dst)
    return graph


def _resolves(name: str) -> bool:
    """``from engine.config import plan_run`` names an attribute, not a module: keep the module part."""
    parts = name.split(".")
    return (
        (ROOT / Path(*parts)).with_suffix(".py").is_file()
        or (ROOT / Path(*parts)).is_dir()
        or ((ROOT / Path(*parts[:-1])).with_suffix(".py").is_file() or (ROOT / Path(*parts[:-1])).is_dir())
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if state.get(m) is None:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if state.get(n) is None:
            cycle = dfs(n)
            if cycle:
                return cycle
    return None


def test_no_package_level_import_cycle():
    graph = import_graph()
    assert {"engine.loop", "engine.tasks", "engine.models", "engine.config", "data_pipeline"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_imports_point_down():
    graph = import_graph()
    for node, deps in graph.items():
        if node not in ENTRY:
            assert not deps & ENTRY, f"{node} imports an entry point: {sorted(deps & ENTRY)}"
        if node not in ENTRY | {"engine.tasks"}:
            assert "engine.tasks" not in deps, f"{node} imports a task: the loop and the layers below must not"
    assert graph["engine.errors"] == set(), "engine.errors must stay a leaf"
    assert graph["data_pipeline"] <= {"engine.errors"}, f"data_pipeline reaches up into {graph['data_pipeline']}"
    assert not graph["engine.models"] & {"engine.config", "engine.loop", "engine.targets"}, graph["engine.models"]


def module_graph(pkg: str) -> dict[str, set[str]]:
    """Module -> the modules of ``pkg`` it imports (a ``from pkg.sub import name`` counts as the
    module ``pkg.sub.name`` when that is a module, else as ``pkg.sub``)."""
    modules = {_module_name(p) for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / pkg).rglob("*.py")):
        src = _module_name(path)
        edges = graph.setdefault(src, set())
        for name in _imports(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != src and name != pkg:
                edges.add(name)
    return graph


# data_pipeline's sub-packages, lowest first: each may import only those before it
LAYERS = ("dataset", "order", "remote", "loaders", "shards")


def test_no_module_cycle_inside_data_pipeline():
    graph = module_graph("data_pipeline")
    assert "data_pipeline.remote.shards" in graph and "data_pipeline.loaders.base" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_data_pipeline_layers_point_one_way():
    """Tools and loaders use dataset/order/remote, never the reverse; the modules at the top of the
    package are the documented ``python -m data_pipeline.<tool>`` commands and import only their tool."""
    for src, deps in module_graph("data_pipeline").items():
        parts = src.split(".")
        if len(parts) == 1:
            continue
        if parts[1] not in LAYERS:  # a command shim: data_pipeline.make_shards -> data_pipeline.shards.make_shards
            assert len(deps) == 1 and next(iter(deps)).endswith("." + parts[1]), (src, deps)
            continue
        for dep in deps:
            layer = dep.split(".")[1]
            assert layer in LAYERS, f"{src} imports the command shim {dep}"
            assert LAYERS.index(layer) <= LAYERS.index(parts[1]), f"{src} imports {dep}: imports point down"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
