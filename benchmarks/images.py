"""Section ``image``: first import of a Debian archive against ``tar``, and a start from the cache.

The archive is Debian 12 minbase built with mmdebstrap (``--build-debian``) or given with
``--debian-archive``. Each import round starts from an empty cache, and tar from an empty
directory; the three ways take turns within a round. Every directory is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from context import Context
from report import Row, Section
from stats import Contender, interleave, median, p95

from pytest_nsbox import Box
from pytest_nsbox.image import load_image


def in_empty_dir(scratch: Path, job: Callable[[Path], None]) -> Callable[[], dict[str, float]]:
    """A trial that runs ``job`` in a new empty directory, removed after (untimed)."""

    def trial() -> dict[str, float]:
        target = Path(tempfile.mkdtemp(dir=scratch, prefix="round-"))
        try:
            started = time.perf_counter()
            job(target)
            return {"total": time.perf_counter() - started}
        finally:
            shutil.rmtree(target)

    return trial


def nsbox_import(archive: str) -> Callable[[Path], None]:
    """``load_image`` into an empty cache: read, decompress, verify digests, extract, index."""

    def job(cache: Path) -> None:
        load_image(archive, str(cache))

    return job


def tar_archive(archive: str) -> Callable[[Path], None]:
    """``tar -xf`` of the archive: copies the layer blob out, no root filesystem yet."""

    def job(target: Path) -> None:
        subprocess.run(["tar", "-xf", archive, "-C", str(target)], check=True)

    return job


def tar_layer(archive: str) -> Callable[[Path], None]:
    """``tar -x`` of the layer inside: a usable root filesystem, the way one does it by hand."""

    def job(target: Path) -> None:
        unpack = subprocess.Popen(
            ["tar", "-xOf", archive, "--wildcards", "*/layer.tar"], stdout=subprocess.PIPE
        )
        try:
            subprocess.run(["tar", "-x", "-C", str(target)], stdin=unpack.stdout, check=True)
        finally:
            assert unpack.stdout is not None
            unpack.stdout.close()
            if unpack.wait() != 0:
                raise subprocess.CalledProcessError(unpack.returncode, unpack.args)

    return job


def start_only(image: str | None, cache: str | None) -> Callable[[], dict[str, float]]:
    """``Box(image, cache).start()`` timed; ``stop()`` after it is not."""

    def trial() -> dict[str, float]:
        box = Box(image=image, cache=cache)
        try:
            started = time.perf_counter()
            box.start()
            return {"start": time.perf_counter() - started}
        finally:
            box.stop()

    return trial


def run(ctx: Context, stack: ExitStack) -> Section:
    """First import vs tar (seconds), then a cached start vs a host-root start (ms)."""
    section = Section("image", "first import of a Debian archive vs tar; a start from the cache")
    debian = ctx.debian()
    if debian is None:
        section.notes.append(ctx.debian_missing_note())
        return section
    archive = debian.archive
    size_mb = os.path.getsize(archive) / 1e6
    imports = [
        Contender("nsbox: first import (load_image)", in_empty_dir(ctx.scratch, nsbox_import(archive))),
        Contender("tar -xf archive (blobs out)", in_empty_dir(ctx.scratch, tar_archive(archive))),
        Contender("tar -x of the layer (a rootfs)", in_empty_dir(ctx.scratch, tar_layer(archive))),
    ]
    interleave(imports, ctx.pick(1, 3), warmup=0)
    base = imports[0]
    for contender in imports:
        against = base if contender is not base else None
        section.rows.append(_seconds_row(contender, against))
    starts = [
        Contender("start, cached Debian image", start_only(archive, debian.cache)),
        Contender("start, host root", start_only(None, None)),
    ]
    interleave(starts, ctx.pick(30, 100), warmup=2)
    for contender, against in ((starts[0], starts[1]), (starts[1], None)):
        stats = contender.summary_ms()
        row = Row(contender.name, stats["n"], stats["median_ms"], stats["p95_ms"], "ms")
        if against is not None:
            row.against, row.against_median = against.name, median(against.samples) * 1000
        section.rows.append(row)
    section.lines += [
        f"archive: {archive} ({size_mb:.0f} MB, one layer); the run's own import of it took "
        f"{debian.import_seconds:.1f} s",
        "the import rows are seconds: file creation dominates both nsbox's import and tar -x of the "
        "layer, and this disk's speed varies from one minute to the next; compare the ratios",
    ]
    section.data = {
        "archive": archive,
        "archive_mb": size_mb,
        "imports": {c.name: c.summary_ms() for c in imports},
        "starts": {c.name: c.summary_ms() for c in starts},
    }
    return section


def _seconds_row(contender: Contender, against: Contender | None) -> Row:
    """A row in seconds (imports take seconds, not milliseconds)."""
    samples = contender.samples
    row = Row(contender.name, len(samples), median(samples), p95(samples), "s")
    if against is not None:
        row.against, row.against_median = against.name, median(against.samples)
    return row
