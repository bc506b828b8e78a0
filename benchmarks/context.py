"""What the sections of one run share: mode, scratch space, the Debian image, the peers' root.

Why one object: the Debian archive is built (or found) and imported at most once per run, the
peers' root filesystem is made once, and everything made is removed by one ``ExitStack``
whichever section fails.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from peers import Rootfs, minimal_rootfs

from pytest_nsbox.image import Image, load_image

REPO = Path(__file__).resolve().parent.parent
# Where --build-debian keeps the archive between runs ("already cached"). Delete the directory
# to get rid of it; nothing else is kept there.
BENCH_HOME = Path("/var/cache/pytest-nsbox-bench")
DEBIAN_ARCHIVE = BENCH_HOME / "debian-bookworm.tar"


@dataclass
class Debian:
    """A Debian docker-save archive, imported once into this run's cache."""

    archive: str
    cache: str
    image: Image
    import_seconds: float

    @property
    def rootfs(self) -> Path:
        """The imported layer: a plain root filesystem directory (the image has one layer)."""
        return Path(self.image.lowers[-1])


@dataclass
class Context:
    """Options and shared, lazily made resources of one benchmark run."""

    quick: bool
    stack: ExitStack
    debian_archive: str | None = None
    build_debian: bool = False
    notes: list[str] = field(default_factory=list)
    _scratch: Path | None = None
    _debian: Debian | None = None
    _debian_tried: bool = False
    _rootfs: Rootfs | None = None

    def pick(self, quick: int, full: int) -> int:
        """A count for the current mode."""
        return quick if self.quick else full

    @property
    def scratch(self) -> Path:
        """A temporary directory for this run, removed at its end."""
        if self._scratch is None:
            path = tempfile.mkdtemp(prefix="nsbox-bench-")
            self.stack.callback(shutil.rmtree, path, True)
            self._scratch = Path(path)
        return self._scratch

    def archive_path(self) -> str | None:
        """The Debian archive to use, building it if asked to; None (with a note) if there is none.

        Order: ``--debian-archive``, the one cached in BENCH_HOME, a build (``--build-debian``).
        """
        if self.debian_archive:
            return self.debian_archive
        if DEBIAN_ARCHIVE.exists():
            return str(DEBIAN_ARCHIVE)
        if not self.build_debian:
            return None
        return str(build_debian())

    def debian(self) -> Debian | None:
        """The Debian image imported into this run's cache (once), or None if not available."""
        if not self._debian_tried:
            self._debian_tried = True
            archive = self.archive_path()
            if archive is not None:
                cache = str(self.scratch / "debian-cache")
                started = time.perf_counter()
                image = load_image(archive, cache)
                self._debian = Debian(archive, cache, image, time.perf_counter() - started)
        return self._debian

    def debian_missing_note(self) -> str:
        """Why the Debian parts are skipped, and how to have them."""
        return (
            f"no Debian archive (none given with --debian-archive, none cached at {DEBIAN_ARCHIVE}): "
            "Debian parts skipped; --build-debian builds one with mmdebstrap (about a minute)"
        )

    def rootfs(self) -> Rootfs:
        """The root filesystem shared by the peers and the box compared with them.

        The imported Debian layer when there is a Debian image, else a minimal one made here.
        """
        if self._rootfs is None:
            debian = self.debian()
            if debian is not None:
                label = "Debian 12 minbase (the layer nsbox imported, used read-only by the peers)"
                self._rootfs = Rootfs(debian.rootfs, label, debian.archive, debian.cache)
            else:
                self._rootfs = minimal_rootfs(self.scratch)
        return self._rootfs


def build_debian() -> Path:
    """Debian 12 minbase with mmdebstrap, as the test suite builds it, kept in BENCH_HOME."""
    if shutil.which("mmdebstrap") is None:
        raise FileNotFoundError("mmdebstrap is not installed: run benchmarks/setup.sh")
    sys.path.insert(0, str(REPO))
    from tests.debian.conftest import build_debian_archive  # the test suite's recipe, not a copy

    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="building-", dir=BENCH_HOME))
    try:
        started = time.perf_counter()
        archive = build_debian_archive(building)
        os.replace(archive, DEBIAN_ARCHIVE)
        print(f"built {DEBIAN_ARCHIVE} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return DEBIAN_ARCHIVE
