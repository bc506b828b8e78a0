"""The container tools (podman, skopeo, buildah) as tests drive them: a private store, and a
private mount namespace with tmpfs over ``/run`` and ``/var/lib``.

podman's runtime state, netavark's network dir and the blob-info cache land there and vanish
with the namespace; the store (``--root``, ``--runroot``, the ``vfs`` driver, which needs no
overlay mounts) lives in the test's temporary directory. Nothing is ever pulled.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_PRIVATE = 'mount -t tmpfs nsbox-tools /run && mount -t tmpfs nsbox-tools /var/lib && exec "$@"'


class PrivateTools:
    """A private image store in ``root`` and the tools that read and write it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.storage = [
            "--root",
            str(root / "storage"),
            "--runroot",
            str(root / "run"),
            "--storage-driver",
            "vfs",
        ]

    def run(self, *argv: str) -> str:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _PRIVATE, "sh", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout.strip()

    def buildah(self, *args: str) -> str:
        return self.run("buildah", *self.storage, *args)

    def podman(self, *args: str) -> str:
        return self.run(
            "podman",
            *self.storage,
            "--tmpdir",
            str(self.root / "podman-tmp"),
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
            *args,
        )

    def skopeo(self, *args: str) -> str:
        return self.run("skopeo", *args)


def need(*programs: str) -> None:
    """Skip the test unless these programs are installed, naming the Debian package."""
    for program in programs:
        if shutil.which(program) is None:
            package = {"unshare": "util-linux"}.get(program, program)
            pytest.skip(f"{program} is not installed (Debian: apt-get install {package})")
