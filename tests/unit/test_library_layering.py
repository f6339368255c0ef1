"""The library never imports the offline tools: data_tools uses ouro_train, not the reverse
(the pipeline's demo data, the demo tokenizer and corpus live in ouro_train.data).

Inside the library the subpackages stand on floors, each importing only its own floor and those
below (lazy imports inside functions count the same), and no chain of imports comes back to the
module it started from. From the bottom: config (schemas, validation, resolve), utils, kernels,
model, optim (the optimizer, LR schedules, stability guard), data, checkpoint (file formats, save
and resume), parallel (process groups, tensor parallel, the DeepSpeed engine, which reads and
writes checkpoints), train (the trainer and the stage that puts data, model, engine and
checkpoints together), inference, pipeline, cli. A name two floors share lives on the lower one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import ouro_train

LIBRARY = Path(ouro_train.__file__).parent
TOOLS = "data_tools"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, at any depth (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_library_module_imports_data_tools():
    sources = sorted(LIBRARY.rglob("*.py"))
    assert len(sources) > 30  # the scan sees the package, not an empty directory
    offenders = [
        f"{path.relative_to(LIBRARY.parent)}:{line}: import {module}"
        for path in sources
        for line, module in imported_modules(path)
        if module == TOOLS or module.startswith(TOOLS + ".")
    ]
    assert not offenders, "ouro_train must not import data_tools (move the code into ouro_train):\n" + "\n".join(
        offenders
    )


def test_the_scan_finds_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from data_tools.tokenize import tokenize\n    import data_tools.cli\n")
    assert imported_modules(module) == [(2, "data_tools.tokenize"), (3, "data_tools.cli")]


# Bottom to top; the package's own __init__ (logging filters only) stands above them all.
FLOORS = [
    "config",
    "utils",
    "kernels",
    "model",
    "optim",
    "data",
    "checkpoint",
    "parallel",
    "train",
    "inference",
    "pipeline",
    "cli",
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {library module it imports: first line}, lazy imports included; `from pkg import
    name` counts as importing pkg.name when that is a module."""
    modules = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                if target in modules and target != name:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle through each strongly connected group of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [circle_in(graph, group) for group in groups]


def circle_in(graph: dict[str, dict[str, int]], group: set[str]) -> list[str]:
    """A path start -> ... -> start inside `group` (breadth first from its first module)."""
    start = min(group)
    came_from = {start: start}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if nxt in group and nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no circle in {group}")


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def upward_imports(root: Path) -> Iterator[tuple[str, str, int]]:
    """(file, imported module, line) of each import of a subpackage on a higher floor."""
    graph = import_graph(root)
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    for module, edges in sorted(graph.items()):
        here = floor_of(module)
        if here is None:
            continue
        for target, line in sorted(edges.items()):
            there = floor_of(target)
            if there is not None and there > here:
                yield str(files[module].relative_to(root.parent)), target, line


def test_every_subpackage_has_a_floor():
    packages = {path.parent.name for path in LIBRARY.glob("*/__init__.py")} | {
        path.name for path in LIBRARY.iterdir() if path.is_dir() and any(path.glob("*.py"))
    }
    assert packages == set(FLOORS), f"give each subpackage a floor in FLOORS: {sorted(packages ^ set(FLOORS))}"


def test_no_import_circle():
    found = cycles(import_graph(LIBRARY))
    assert not found, "import circles (move the shared name to a module both sides can import):\n" + "\n".join(
        " -> ".join(c) for c in found
    )


def test_no_module_imports_a_higher_floor():
    offenders = [f"{file}:{line}: import {target}" for file, target, line in upward_imports(LIBRARY)]
    assert not offenders, (
        f"imports from a lower floor up (floors, bottom first: {', '.join(FLOORS)}); move the name down:\n"
        + "\n".join(offenders)
    )


def test_the_checks_find_a_circle_and_an_upward_import(tmp_path):
    root = tmp_path / "ouro_train"
    for package, source in {
        "config": "from ouro_train.train import loop\n",  # up from the bottom floor
        "train": "",
    }.items():
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(source)
    (root / "train" / "loop.py").write_text("def f():\n    import ouro_train.train.step\n")  # lazy
    (root / "train" / "step.py").write_text("from ouro_train.train import loop\n")
    (root / "__init__.py").write_text("")
    assert cycles(import_graph(root)) == [["ouro_train.train.loop", "ouro_train.train.step", "ouro_train.train.loop"]]
    assert list(upward_imports(root)) == [("ouro_train/config/__init__.py", "ouro_train.train.loop", 1)]


def relative_imports(root: Path) -> list[str]:
    """file:line of every relative import (`from . import x`, `from ..train import y`) under root."""
    return [
        f"{path.relative_to(root.parent)}:{node.lineno}"
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]


def test_no_library_module_uses_a_relative_import():
    # import_graph and imported_modules read absolute imports only: a relative one would slip past them.
    offenders = relative_imports(LIBRARY)
    assert not offenders, "use absolute imports (from ouro_train.x import y):\n" + "\n".join(offenders)


def test_the_scan_finds_relative_imports(tmp_path):
    root = tmp_path / "ouro_train"
    (root / "train").mkdir(parents=True)
    (root / "train" / "loop.py").write_text("import os\n\n\ndef f():\n    from ..config import schema\n")
    (root / "train" / "step.py").write_text("from . import loop\nfrom ouro_train.train import loop as same\n")
    assert relative_imports(root) == ["ouro_train/train/loop.py:5", "ouro_train/train/step.py:1"]
