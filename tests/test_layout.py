"""The package's shape (doc/architecture.rst): parts in layers, small modules,
public library APIs only."""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "glance_image_sync"

# Each part may import only parts of a lower layer (and its own modules).
LAYERS = [
    {"exceptions", "opts"},
    {"nodes", "events"},
    {"settings"},
    {"state", "store", "broker", "glanceapi"},
    {"transfer", "metrics"},
    {"fanout", "sync"},
    {"admin", "daemon"},
    {"service"},
    {"cmd"},
    {"__main__"},
]
LAYER = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
MODULES = sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"
                 or path.stat().st_size)


def part_of(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(path: pathlib.Path):
    """(line, part) of every import of our own package in a module."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "glance_image_sync":
                names = [f"glance_image_sync.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("glance_image_sync."):
                yield node.lineno, name.split(".")[1]


def test_every_part_has_a_layer():
    assert {part_of(path) for path in MODULES} <= set(LAYER)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_point_down(path):
    mine = part_of(path)
    upward = [f"line {line}: {part}" for line, part in imported_parts(path)
              if part != mine and LAYER[part] >= LAYER[mine]]
    assert not upward, f"{mine} (layer {LAYER[mine]}) imports a part at or above it: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


# What the tool must never touch: py-amqp's and kombu's internals, a socket
# option toggled under py-amqp, select.select (ValueError past fd 1023).
FORBIDDEN = re.compile(r"_quick_recv|_read_buffer|TCP_CORK|client_properties|select\.select"
                       r"|\b(transport|connection|channel|sock|conn)\._[a-z]")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_internals_of_a_library(path):
    found = [f"{number}: {line.strip()}" for number, line in
             enumerate(path.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
    assert not found
