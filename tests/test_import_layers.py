"""The import graph of ``src/sandlot``: no cycles anywhere, and the server's layers import only
downward (runner -> api -> gateway -> control -> config/errors/schemas; see
docs/architecture.md).

Imports are read with :mod:`ast`, all of them: module level, inside functions and under
``if TYPE_CHECKING:`` alike (a type-only import upward is still a newcomer's wrong turn, and
the rule stays simple). A module's package ``__init__`` is not counted as imported by it: Python
runs it, but it is the package's face, not a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SERVER = "sandlot.server"
#: Layer of each server package, bottom (0: the modules directly in server/) to top.
LAYERS = {"control": 1, "gateway": 2, "api": 3, "runner": 4}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted((SRC / "sandlot").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The sandlot modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(module: str) -> int | None:
    """The layer of a server module; None outside the server and for its face."""
    if not module.startswith(SERVER + "."):
        return None
    first = module[len(SERVER) + 1 :].split(".")[0]
    return LAYERS.get(first, 0)


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], "import cycles (each line: modules that import one another):\n" + (
        "\n".join(" <-> ".join(c) for c in cycles)
    )


def test_server_layers_import_only_downward() -> None:
    upward = []
    for module, targets in sorted(_graph().items()):
        mine = _layer(module)
        if mine is None:
            continue
        for target in sorted(targets):
            theirs = _layer(target)
            if target == SERVER or (theirs is not None and theirs > mine):
                upward.append(f"{module} -> {target}")
    assert upward == [], "imports up the server's layers:\n" + "\n".join(upward)


def test_the_checker_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
