"""The layering rules of the package, checked from the imports of each module:

    core → storage → formats → jobs → cli

Each layer imports only from the layers before it; the core does no I/O; only the CLI
imports click or rich; only the storage layer touches file descriptors; and neither the
jobs nor the CLI branch on an on-disk format (a new format is a new fmt module)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "quantize_cli"
LAYERS = ["core", "storage", "formats", "jobs", "cli"]


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


def package_layer(path: Path, module: str) -> str | None:
    """The layer a relative import from ``path`` lands in (None: the package root)."""
    dots = len(module) - len(module.lstrip("."))
    base = path.parent
    for _ in range(dots - 1):
        base = base.parent
    target = (base / module.lstrip(".").replace(".", "/")).relative_to(PACKAGE)
    first = target.parts[0] if target.parts else ""
    return first if first in LAYERS else None


def modules(folder: str = "") -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_from_the_layers_before_it(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for path in modules(layer):
        for module in imported_modules(path):
            if module.startswith("."):
                found = package_layer(path, module)
                assert found is None or found in allowed, (path, module)


def test_only_the_cli_imports_click_or_rich() -> None:
    for path in modules():
        if path.parent.name == "cli":
            continue
        assert not {"click", "rich"} & imported_modules(path), path


def test_the_core_does_no_io() -> None:
    allowed = {"numpy", "ml_dtypes", "__future__", "math", "os", "threading", "collections",
               "concurrent", "dataclasses", "functools", "typing"}
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


@pytest.mark.parametrize("layer", ["jobs", "cli"])
def test_jobs_and_cli_do_not_branch_on_a_format_or_a_method(layer: str) -> None:
    """They take the interface and the registry from the formats package (its
    ``__all__``), never a format of their own choosing, and compare with no format's or
    method's name: what differs by format or scheme is said by the registry."""
    import quantize_cli.formats
    from quantize_cli.core.elements import METHODS
    from quantize_cli.formats import FORMATS

    interface = set(quantize_cli.formats.__all__)
    names = set(FORMATS) | set(METHODS)
    for path in modules(layer):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and "formats" in node.module:
                assert node.module.split(".")[-1] == "formats", (path, node.module)
                taken = {alias.name for alias in node.names}
                assert taken <= interface, (path, taken - interface)
            if isinstance(node, (ast.Compare, ast.Dict, ast.Subscript, ast.MatchValue)):
                for constant in ast.walk(node):
                    if isinstance(constant, ast.Constant) and constant.value in names:
                        raise AssertionError(f"{path}:{node.lineno} names "
                                             f"{constant.value!r}")
