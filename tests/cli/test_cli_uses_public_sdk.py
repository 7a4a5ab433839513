"""The CLI is a user of the SDK like any other: it imports only the SDK's public modules
(``sandlot.sdk``, ``.types``, ``.errors``, ``.control``), never one whose name starts with ``_``
-- so whatever the CLI needs, users have too."""

from __future__ import annotations

import ast
from pathlib import Path

CLI = Path(__file__).resolve().parents[2] / "src" / "sandlot" / "cli"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_cli_imports_only_public_sdk_modules() -> None:
    private = [
        f"{path.name}: {name}"
        for path in sorted(CLI.rglob("*.py"))
        for name in _imports(path)
        if name.startswith("sandlot.sdk.")
        and any(part.startswith("_") for part in name.split(".")[2:])
    ]
    assert private == []
