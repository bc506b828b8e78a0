"""The package's modules import each other without a circle.

Every import counts: at module level, inside functions (the lazy ones that keep pyroute2 or
the box's init out of a process) and under ``TYPE_CHECKING``. A circle that only works
because one side imports late is still a circle: it breaks the day someone moves an import,
and it ties two modules that the layout in the README keeps apart.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest_nsbox

PACKAGE = Path(pytest_nsbox.__file__).parent
ROOT = "pytest_nsbox"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name a relative ``from ... import`` refers to."""
    if level == 0:
        return name or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports, anywhere in it."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    # `from . import state` imports the module state; `from .spec import X`
                    # imports spec.
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in modules else base)
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "pytest_nsbox.box" in graph["pytest_nsbox.plugin"]
    assert "pytest_nsbox.errors" in graph["pytest_nsbox.syscalls"]
    # A function-level import counts as much as a module-level one.
    assert "pytest_nsbox.network.pool" in graph["pytest_nsbox.spec"]


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles in the package: " + "; ".join(" <-> ".join(group) for group in found)


def test_the_pid1_side_imports_only_low_level_modules():
    """The helper and the box's init are copied into every box at fork: they load the
    standard library and the low-level modules only, never the host side."""
    graph = import_graph()
    low_level = (
        "errors",
        "syscalls",
        "channel",
        "rtnl",
        "init",
        "rootfs",
        "overlay",
        "capabilities",
        "devices",
        "environ",
    )
    allowed = {f"{ROOT}.{name}" for name in low_level}
    for side in ("zygote_process", "init", "rootfs", "overlay", "capabilities", "devices", "environ", "rtnl"):
        module = f"{ROOT}.{side}"
        if module in graph:
            assert graph[module] <= allowed, f"{module} imports {sorted(graph[module] - allowed)}"


def test_the_host_zygote_does_not_import_pid1():
    graph = import_graph()
    assert f"{ROOT}.init" not in graph[f"{ROOT}.zygote"]


def test_the_box_helper_loads_no_heavy_module():
    """What the helper imports is copied into every box at fork: the PID-1 side's modules
    (init, rootfs, overlay, capabilities) must not pull in the host side's heavy ones."""
    probe = (
        "import sys\n"
        "package = type(sys)('pytest_nsbox')\n"
        "package.__path__ = [sys.argv[1]]\n"
        "sys.modules['pytest_nsbox'] = package\n"
        "import pytest_nsbox.zygote_process\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(PACKAGE)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "pytest_nsbox.init" in loaded and "pytest_nsbox.rootfs" in loaded
    heavy = {"dataclasses", "inspect", "typing", "pathlib", "subprocess", "psutil", "pyroute2", "filelock"}
    assert not heavy & set(loaded), f"the box helper loads {sorted(heavy & set(loaded))}"
