"""Fixtures for the image tests: a tiny bootable base layer and a per-test layer cache."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from imagebuilder import Dir, Entry, File

# Programs the image tests run inside boxes; /bin/sh is the host's dash.
SHELL_TOOLS = ("cat", "ls", "stat", "id", "rm", "touch", "readlink")
ROOT_PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"
ROOT_GROUP = b"root:x:0:\n"


def _ldd(program: str) -> list[str]:
    """The shared libraries ``ldd`` names for ``program`` (the dynamic loader included)."""
    output = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    libraries = []
    for line in output.splitlines():
        fields = line.split()
        if "=>" in fields:
            target = fields[fields.index("=>") + 1]
            if target.startswith("/"):
                libraries.append(target)
        elif fields and fields[0].startswith("/"):
            libraries.append(fields[0])
    return libraries


def _host_program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"the host has no {name!r} to copy into test images")
    return found


@functools.cache
def _shell_files() -> tuple[tuple[str, bytes, int], ...]:
    """(image path, bytes, mode) of a shell, a few coreutils and the libraries they load."""
    files: list[tuple[str, bytes, int]] = []
    libraries: set[str] = set()
    programs = [("bin/sh", "/bin/dash")] + [(f"bin/{t}", _host_program(t)) for t in SHELL_TOOLS]
    for image_path, host_path in programs:
        libraries.update(_ldd(host_path))
        files.append((image_path, Path(host_path).read_bytes(), 0o755))
    for library in sorted(libraries):
        files.append((library.lstrip("/"), Path(os.path.realpath(library)).read_bytes(), 0o755))
    return tuple(files)


def shell_entries() -> list[Entry]:
    """A base layer in which ``/bin/sh -c`` and ``SHELL_TOOLS`` work (as root)."""
    files = _shell_files()
    dirs = {"etc"}
    for path, _, _ in files:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    entries: list[Entry] = [Dir(directory) for directory in sorted(dirs)]
    entries += [File(path, data, mode=mode) for path, data, mode in files]
    entries += [File("etc/passwd", ROOT_PASSWD), File("etc/group", ROOT_GROUP)]
    return entries


@pytest.fixture
def shell_layer() -> list[Entry]:
    """A fresh list of the base layer's entries (tests may append to it)."""
    if not os.path.exists("/bin/dash"):
        pytest.skip("the host has no /bin/dash to copy into test images")
    return shell_entries()


@pytest.fixture(scope="module")
def shell_entries_once() -> list[Entry]:
    """The base layer's entries for a module-scoped fixture (do not change them)."""
    if not os.path.exists("/bin/dash"):
        pytest.skip("the host has no /bin/dash to copy into test images")
    return shell_entries()


@pytest.fixture
def image_cache(tmp_path: Path) -> str:
    """A layer cache of this test's own (never the default under /var/cache)."""
    return str(tmp_path / "cache")
