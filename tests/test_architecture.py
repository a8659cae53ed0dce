"""The layering rules of the package, checked from the imports of each module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "quantize_cli"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif node.module:
                names.add("." * node.level + node.module)
    return names


def modules(folder: str = "") -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def test_only_the_cli_imports_click_or_rich() -> None:
    for path in modules():
        if path.parent.name == "cli":
            continue
        assert not {"click", "rich"} & imported_modules(path), path


def test_the_core_does_no_io() -> None:
    allowed = {"numpy", "__future__", "math", "os", "threading", "collections", "concurrent",
               "dataclasses", "typing"}
    for path in modules("core"):
        for name in imported_modules(path):
            assert name.startswith(".") or name in allowed, (path, name)
        text = path.read_text()
        for forbidden in ("open(", "print(", "sys.exit", "write_bytes", "read_bytes"):
            assert forbidden not in text, (path, forbidden)


def test_only_the_storage_layer_touches_file_descriptors() -> None:
    for path in modules():
        if path.parent.name == "storage":
            continue
        text = path.read_text()
        for call in ("os.replace", "os.pwrite", "os.pread", "os.fsync", "mkstemp"):
            assert call not in text, (path, call)
