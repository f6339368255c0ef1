"""The library never imports the offline tools: data_tools uses ouro_train, not the reverse
(the pipeline's demo data, the demo tokenizer and corpus live in ouro_train.data)."""

from __future__ import annotations

import ast
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
