"""Section ``prepared``: boxes of a prepared image (``@template``, ``Box.snapshot()``) against
the same work done without one.

Four parts, all in one private layer cache (and its scratch) made for the run and removed at
the section's end; nothing touches the default cache (``/var/cache/pytest-nsbox``):

1. a box of a template whose setup wrote 2000 files (20 MB) against a plain box, interleaved:
   what booting a prepared image adds to a lifecycle;
2. ``box.snapshot()`` of a box with 100 MB of changes (20 MB ``--quick``) against ``cp -a``
   of the same upper directory, interleaved: what the snapshot adds to copying its bytes;
3. a suite of 100 tests (20 ``--quick``) on a template against the same suite doing its setup
   in every test, each an inner ``python -m pytest`` (cold cache, warm cache, per test);
4. (full runs only, with pytest-xdist) the four runs of a cached template under ``-n 4``: first
   build, cached, changed input, changed code.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from context import Context
from features import PYTHON
from lifecycle import step_medians
from report import Row, Section
from stats import Contender, Phases, interleave, median, p95

from pytest_nsbox import Box, Image, template
from pytest_nsbox.layers import LayerStore

MB = 10**6
TEMPLATE_FILES = 2000
TEMPLATE_FILE_SIZE = 10_000  # 2000 x 10 kB: 20 MB
SMALL_FILES = 1000
SMALL_FILE_SIZE = 8192
LARGE_FILES = 4
# Row names run.py's targets look for.
TEMPLATE_ROW = "lifecycle, Box(image=<template>)"
PLAIN_ROW = "lifecycle, plain Box()"
SNAPSHOT_ROW = "box.snapshot()"
COPY_ROW = "cp -a of the box's upper dir"
SUITE_TIMEOUT = 1800.0  # an inner run of 100 tests doing their own setup: 20-50 s here

# Run in a box by its host root's Python (-S: site is not what is measured): N files of SIZE
# random bytes under TOP, a hundred per directory.
MANY_FILES = """
import os, sys
top, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    sub = f"{top}/{i // 100:02d}"
    os.makedirs(sub, exist_ok=True)
    with open(f"{sub}/f{i:04d}", "wb") as handle:
        handle.write(os.urandom(size))
"""
# LARGE files of random data, TOTAL bytes together, beside the small ones.
LARGE_DATA = """
import os, sys
top, count, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    left = total // count
    with open(f"{top}/large{i}", "wb") as handle:
        while left > 0:
            chunk = os.urandom(min(left, 1 << 20))
            handle.write(chunk)
            left -= len(chunk)
"""


@template(name="benchmarks.prepared.files")
def files_template(box: Box) -> None:
    """The template of part 1: 2000 files of 10 kB of random data under /srv/prepared."""
    box.run(
        [PYTHON, "-S", "-c", MANY_FILES, "/srv/prepared", str(TEMPLATE_FILES), str(TEMPLATE_FILE_SIZE)],
        check=True,
    )


def run(ctx: Context, stack: ExitStack) -> Section:
    """The four parts, in one private cache removed at the end."""
    section = Section("prepared", "a box of a template or snapshot vs the same work without one")
    work = Path(tempfile.mkdtemp(prefix="prepared-", dir=ctx.scratch))
    stack.callback(shutil.rmtree, work, True)  # registered first: runs after every box has stopped
    cache = work / "cache"
    section.data["cache"] = str(cache)
    template_boxes(ctx, str(cache), section)
    snapshot_vs_copy(ctx, work, str(cache), section)
    suite(ctx, work, section)
    xdist_runs(ctx, work, section)
    return section


def _row(contender: Contender, against: Contender | None = None) -> Row:
    """A row in ms for ``contender``, compared with ``against`` if given."""
    stats = contender.summary_ms()
    row = Row(contender.name, stats["n"], stats["median_ms"], stats["p95_ms"], "ms")
    if against is not None:
        row.against, row.against_median = against.name, median(against.samples) * 1000
    return row


def _seconds_row(contender: Contender, against: Contender | None = None) -> Row:
    """A row in seconds, compared with ``against`` if given."""
    samples = contender.samples
    row = Row(contender.name, len(samples), median(samples), p95(samples), "s")
    if against is not None:
        row.against, row.against_median = against.name, median(against.samples)
    return row


def _phases(contender: Contender) -> str:
    return ", ".join(f"{phase} {median(values) * 1000:.2f}" for phase, values in contender.phases.items())


# ------------------------------------------------------------------ 1. a template's box


class Lifecycle:
    """``Box(image=image, cache=cache)``: start, ``run(["true"])``, stop, timed phase by phase;
    ``box.timings`` of every start kept, to show where a start's time goes."""

    def __init__(self, image: Image | None, cache: str) -> None:
        self.image = image
        self.cache = cache
        self.timings: list[dict[str, float]] = []

    def __call__(self) -> Phases:
        t0 = time.perf_counter()
        box = Box(image=self.image, cache=self.cache)
        try:
            box.start()
            t1 = time.perf_counter()
            box.run(["true"], check=True)
            t2 = time.perf_counter()
            box.stop()
            t3 = time.perf_counter()
        finally:
            box.stop()  # idempotent: only does work if something above raised
        self.timings.append(dict(box.timings))
        return {"start": t1 - t0, "run": t2 - t1, "stop": t3 - t2}


def _steps(trial: Lifecycle) -> str:
    return ", ".join(f"{step} {ms:.2f}" for step, ms in step_medians(trial.timings).items())


def template_boxes(ctx: Context, cache: str, section: Section) -> None:
    """Build the template once (timed on its own), then its box against a plain box."""
    started = time.perf_counter()
    image = files_template.resolve(cache)
    build_s = time.perf_counter() - started
    last = f"/srv/prepared/{(TEMPLATE_FILES - 1) // 100:02d}/f{TEMPLATE_FILES - 1:04d}"
    with Box(image=image, cache=cache) as box:  # the template's files are there, whole
        if len(box.read_bytes(last)) != TEMPLATE_FILE_SIZE:
            raise RuntimeError(f"a box of the template lacks {last}")
    with Box(cache=cache) as box:
        if box.exists(last):
            raise RuntimeError(f"a plain box has {last}: the template leaked into the host root")
    on_template, plain = Lifecycle(image, cache), Lifecycle(None, cache)
    ours = Contender(TEMPLATE_ROW, on_template)
    theirs = Contender(PLAIN_ROW, plain)
    # Two roots taking turns: the helper keeps a waiting box for each (up to four roots).
    interleave([ours, theirs], ctx.pick(30, 200), warmup=2)
    section.rows += [
        Row("template build (setup + snapshot), once", 1, build_s, None, "s"),
        _row(ours, theirs),
        _row(theirs),
    ]
    mb = TEMPLATE_FILES * TEMPLATE_FILE_SIZE / MB
    section.lines += [
        f"template: setup writes {TEMPLATE_FILES} files of {TEMPLATE_FILE_SIZE // 1000} kB ({mb:.0f} MB) "
        f"under /srv/prepared; resolved (built) once before timing in {build_s:.2f} s; its image: "
        f"{len(image.lowers)} lowers (the template's layer over the host's /)",
        f"phases, median ms: template box: {_phases(ours)}; plain box: {_phases(theirs)}",
        f"start steps (box.timings), median ms: template box: {_steps(on_template)}; "
        f"plain box: {_steps(plain)}",
    ]
    section.data["template_box"] = {
        "build_s": build_s,
        "ours": ours.summary_ms(),
        "against": theirs.summary_ms(),
        "start_steps_median_ms": {
            "template": step_medians(on_template.timings),
            "plain": step_medians(plain.timings),
        },
    }


# ---------------------------------------------------------------- 2. snapshot vs cp -a


def tree_size(top: str) -> tuple[int, int]:
    """Files and bytes (of regular files) under ``top``, not following symlinks."""
    files = size = 0
    for directory, dirs, names in os.walk(top):
        for name in names:
            info = os.lstat(os.path.join(directory, name))
            files += 1
            size += info.st_size if stat.S_ISREG(info.st_mode) else 0
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(directory, d))]
    return files, size


class SnapshotTrial:
    """``box.snapshot()``, timed; one small file changed before (so that every sample makes a
    new layer), and the new layer removed after (untimed, so the cache does not fill up)."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.count = 0
        self.made: str | None = None
        self.layers: set[str] = set()

    def __call__(self) -> Phases:
        self.count += 1
        self.box.write_text("/srv/data/counter", f"sample {self.count}\n")
        started = time.perf_counter()
        image = self.box.snapshot()
        elapsed = time.perf_counter() - started
        self.made = image.lowers[0]
        if image.snapshots != 1 or self.made in self.layers:
            raise RuntimeError(f"snapshot {self.count} made no new layer: {image}")
        self.layers.add(self.made)
        return {"snapshot": elapsed}

    def settle(self) -> None:
        if self.made is not None:
            os.unlink(self.made + ".json")
            shutil.rmtree(self.made)
            self.made = None
        os.sync()  # what the copy left for writeback is not on the next sample's time


class CopyTrial:
    """``cp -a UPPER/. DEST`` into a fresh directory beside the cache, timed; removed after."""

    def __init__(self, upper: str, beside: Path) -> None:
        self.upper = upper
        self.beside = beside
        self.count = 0
        self.made: str | None = None

    def __call__(self) -> Phases:
        self.count += 1
        self.made = tempfile.mkdtemp(prefix=f"cp-{self.count}-", dir=self.beside)
        started = time.perf_counter()
        subprocess.run(["cp", "-a", self.upper + "/.", self.made], check=True)
        return {"cp": time.perf_counter() - started}

    def settle(self) -> None:
        if self.made is not None:
            shutil.rmtree(self.made)
            self.made = None
        os.sync()


def snapshot_vs_copy(ctx: Context, work: Path, cache: str, section: Section) -> None:
    """A box with 100 MB of changes: ``box.snapshot()`` against ``cp -a`` of its upper dir."""
    total = ctx.pick(20, 100) * MB
    small = SMALL_FILES * SMALL_FILE_SIZE
    copies = work / "copies"  # the cache's filesystem: the copy writes where the snapshot does
    copies.mkdir()
    with Box(cache=cache, hostname="snapshot") as box:
        small_args = ["/srv/data/small", str(SMALL_FILES), str(SMALL_FILE_SIZE)]
        box.run([PYTHON, "-S", "-c", MANY_FILES, *small_args], check=True)
        large_args = ["/srv/data", str(LARGE_FILES), str(total - small)]
        box.run([PYTHON, "-S", "-c", LARGE_DATA, *large_args], check=True)
        assert box.root is not None
        upper = box.root.upper
        files, size = tree_size(upper)
        snap = SnapshotTrial(box)
        copy = CopyTrial(upper, copies)
        ours = Contender(SNAPSHOT_ROW, snap, snap.settle)
        theirs = Contender(COPY_ROW, copy, copy.settle)
        interleave([ours, theirs], ctx.pick(5, 15), warmup=1)
    section.rows += [_row(ours, theirs), _row(theirs)]
    device = os.stat(cache).st_dev == os.stat(copies).st_dev
    section.lines += [
        f"snapshot: the box's upper dir holds {files} files, {size / MB:.1f} MB ({LARGE_FILES} files of "
        f"random data, {SMALL_FILES} of {SMALL_FILE_SIZE} bytes, a few the box made); it is on the "
        f"box's tmpfs, the cache and the copies on {_filesystem(cache)}"
        + ("" if device else " (NOT the same filesystem as the cache)"),
        "each snapshot sample changes /srv/data/counter first (a new layer every time) and removes "
        "the layer after; each cp -a goes to a fresh directory, removed after; both then os.sync() (untimed)",
        "snapshot = freeze the box, copy the tree with its tar digest computed on the way, rename into "
        "the cache, thaw",
    ]
    section.data["snapshot"] = {
        "mb": total // MB,
        "files": files,
        "bytes": size,
        "ours": ours.summary_ms(),
        "against": theirs.summary_ms(),
    }


def _filesystem(path: str) -> str:
    """The type of the filesystem ``path`` is on, from /proc/self/mountinfo (longest match)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            point = fields[4]
            fstype = fields[fields.index("-") + 1]
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fstype
    return f"{kind} ({best})"


# ----------------------------------------------------------------- 3. a suite of tests

CONFTEST = r"""
from pathlib import Path

import pytest

from pytest_nsbox import template

PAYLOAD = str(Path(__file__).parent / "payload")
# A small install: byte-compile the package, write a manifest, config and a command, keep a
# tarball of it. 0.2-0.4 s in a box on this machine, with its load.
INSTALL = '''set -e
cd /opt/app
python3 -m compileall -q -o 0 -o 1 app
find . -type f | sort | xargs sha256sum > MANIFEST
mkdir -p /etc/app /var/lib/app /usr/local/bin
printf 'root=/opt/app\\n' > /etc/app/app.conf
printf '#!/bin/sh\\necho 1.0\\n' > /usr/local/bin/app-version
chmod 755 /usr/local/bin/app-version
tar -czf /var/lib/app/app.tar.gz -C /opt app
'''


def install(box):
    box.copy_in(PAYLOAD, "/opt/app")
    box.run(["sh", "-c", INSTALL], check=True)


@template(inputs=["payload"])
def app(box):
    install(box)


@pytest.fixture
def installed(nsbox):
    install(nsbox)
    return nsbox


def check(box, number):
    assert box.run(["app-version"], check=True).stdout == "1.0\n"
    assert box.exists("/opt/app/MANIFEST") and box.exists("/opt/app/app/pkg00/__pycache__")
    assert not box.exists(f"/srv/mine-{number - 1}"), "another test's file leaked into this box"
    box.write_text(f"/srv/mine-{number}", "mine")
"""

ON_TEMPLATE = """
import pytest
from conftest import app, check


@pytest.mark.nsbox(image=app)
@pytest.mark.parametrize("number", range({count}))
def test_app(nsbox, number):
    check(nsbox, number)
"""

PER_TEST = """
import pytest
from conftest import check


@pytest.mark.parametrize("number", range({count}))
def test_app(installed, number):
    check(installed, number)
"""


def make_payload(top: Path) -> int:
    """A small package to install: 250 modules in 10 packages and 50 data files (300 files)."""
    for i in range(250):
        package = top / "app" / f"pkg{i // 25:02d}"
        package.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{j}(x):\n    return x * {j} + {i}\n\n\n" for j in range(40))
        (package / f"mod{i:03d}.py").write_text(body)
    data = top / "app" / "data"
    data.mkdir()
    for i in range(50):
        (data / f"d{i:02d}.json").write_text(f'{{"key": {i}, "values": {list(range(100))}}}\n')
    return sum(1 for path in top.rglob("*") if path.is_file())


def make_project(top: Path, count: int) -> int:
    """The inner test project; the number of files in its payload."""
    top.mkdir()
    (top / "pytest.ini").write_text("[pytest]\n")  # the project's root: nothing from outside
    (top / "conftest.py").write_text(CONFTEST)
    (top / "test_template.py").write_text(ON_TEMPLATE.format(count=count))
    (top / "test_per_test.py").write_text(PER_TEST.format(count=count))
    return make_payload(top / "payload")


def inner_pytest(project: Path, cache: Path, count: int, *args: str) -> str:
    """``python -m pytest -q -p no:cacheprovider --nsbox-cache=CACHE ARGS`` in ``project``;
    its output. Raises unless exactly ``count`` tests passed."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--nsbox-cache={cache}",
        *args,
    ]
    done = subprocess.run(
        command, cwd=project, capture_output=True, text=True, timeout=SUITE_TIMEOUT, check=False
    )
    output = done.stdout + done.stderr
    if done.returncode != 0 or not re.search(rf"\b{count} passed\b", output):
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise RuntimeError(f"inner pytest {' '.join(args)} in {project}: exit {done.returncode}\n{tail}")
    return output


class SuiteRun:
    """One inner pytest run, timed from outside; ``fresh`` gives it an empty cache every time
    (removed after, untimed)."""

    def __init__(self, project: Path, cache: Path, count: int, args: list[str], fresh: bool) -> None:
        self.project = project
        self.cache = cache
        self.count = count
        self.args = args
        self.fresh = fresh
        self.builds: list[list[tuple[float, float]]] = []  # per run: the templates in the cache after it

    def __call__(self) -> Phases:
        if self.fresh:
            shutil.rmtree(self.cache, ignore_errors=True)
        started = time.perf_counter()
        inner_pytest(self.project, self.cache, self.count, *self.args)
        elapsed = time.perf_counter() - started
        self.builds.append(templates_built(self.cache))
        if self.fresh:
            shutil.rmtree(self.cache)
        return {"run": elapsed}


def templates_built(cache: Path) -> list[tuple[float, float]]:
    """(when built, seconds it took) of every template in ``cache``, from its index.

    Why from the index rather than pytest's output: the plugin's ``template ...: built in``
    line is written while the test's setup output is captured, so it shows only under ``-s``.
    """
    if not (cache / "images").is_dir():
        return []
    entries = LayerStore(str(cache)).images()
    return sorted(
        (float(e["built"]), float(e["build_seconds"])) for e in entries if e.get("kind") == "template"
    )


def suite(ctx: Context, work: Path, section: Section) -> None:
    """N tests on a template (cold and warm cache) against N tests doing the setup each."""
    count = ctx.pick(20, 100)
    project = work / "suite"
    payload_files = make_project(project, count)
    warm_cache = work / "suite-warm"
    inner_pytest(project, warm_cache, count, "test_template.py")  # untimed: builds the warm cache
    prebuilt = templates_built(warm_cache)
    cold = SuiteRun(project, work / "suite-cold", count, ["test_template.py"], fresh=True)
    warm = SuiteRun(project, warm_cache, count, ["test_template.py"], fresh=False)
    each = SuiteRun(project, work / "suite-per-test", count, ["test_per_test.py"], fresh=False)
    contenders = [
        Contender(f"{count} tests on a template, cold cache (builds it)", cold),
        Contender(f"{count} tests on a template, warm cache", warm),
        Contender(f"{count} tests, setup in each test", each),
    ]
    interleave(contenders, ctx.pick(1, 3), warmup=0)
    section.rows += [
        _seconds_row(contenders[0], contenders[2]),
        _seconds_row(contenders[1], contenders[2]),
        _seconds_row(contenders[2]),
    ]
    cold_s, warm_s, each_s = (median(c.samples) for c in contenders)
    builds = [seconds for run in cold.builds for _, seconds in run]
    if any(len(run) != 1 for run in cold.builds) or any(run != prebuilt for run in warm.builds):
        section.notes.append(
            f"suite: expected one template in the cache after each cold run, and the warm cache's "
            f"untouched; saw {cold.builds} after the cold runs, {warm.builds} (built before: {prebuilt})"
        )
    section.lines += [
        f"suite: {count} tests, each one box; setup = copy_in of a {payload_files}-file package, "
        "byte-compile it, manifest, config, a command, a tarball (sh in the box); each a "
        "`python -m pytest -q -p no:cacheprovider --nsbox-cache=...` subprocess, timed from outside",
        f"suite: setup per test costs {(each_s - warm_s) / count * 1000:.0f} ms a test (difference of "
        f"medians / {count}); the cold runs' template build (from the cache's index): "
        + ", ".join(f"{b:.2f} s" for b in builds),
        f"suite: a template's cold run saves {each_s - cold_s:.1f} s, a warm one {each_s - warm_s:.1f} s",
    ]
    section.data["suite"] = {
        "tests": count,
        "payload_files": payload_files,
        "build_seconds": builds,
        "contenders": {c.name: c.summary_ms() for c in contenders},
    }


# ------------------------------------------------------------- 4. -n 4, four runs in turn

XDIST_CONFTEST = """
import time
from pathlib import Path

from pytest_nsbox import template

LOG = Path(__file__).parent / "builds.log"


@template(inputs=["data.txt"])
def prepared(box):
    time.sleep(2)
    box.copy_in(str(Path(__file__).parent / "data.txt"), "/srv/data.txt")
    with LOG.open("a") as log:
        log.write("built\\n")
"""

XDIST_TESTS = """
import pytest
from conftest import prepared


@pytest.mark.nsbox(image=prepared)
@pytest.mark.parametrize("number", range({count}))
def test_prepared(nsbox, number):
    assert nsbox.read_text("/srv/data.txt") == open("data.txt").read()
"""


def xdist_runs(ctx: Context, work: Path, section: Section) -> None:
    """40 tests under ``-n 4``: first run, cached, changed input, changed code (one each)."""
    if ctx.quick:
        section.notes.append(
            "-n 4 runs (first, cached, changed input, changed code): skipped in --quick (~30 s)"
        )
        return
    if importlib.util.find_spec("xdist") is None:
        section.notes.append("-n 4 runs: skipped, pytest-xdist is not installed (pip install pytest-xdist)")
        return
    count = 40
    project = work / "xdist"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "conftest.py").write_text(XDIST_CONFTEST)
    (project / "test_prepared.py").write_text(XDIST_TESTS.format(count=count))
    (project / "data.txt").write_text("one\n")
    cache = work / "xdist-cache"
    log = project / "builds.log"
    edited = XDIST_CONFTEST.replace("time.sleep(2)", "time.sleep(2)  # edited")
    steps: list[tuple[str, Path | None, str]] = [  # a run's name, and the file changed before it
        ("first run (builds it)", None, ""),
        ("second run (cached)", None, ""),
        ("after changing the input file", project / "data.txt", "two\n"),
        ("after changing the function's code", project / "conftest.py", edited),
    ]
    measured: dict[str, Any] = {}
    builds: list[int] = []
    rows: list[Row] = []
    for name, changed, text in steps:
        if changed is not None:
            changed.write_text(text)
        before = len(log.read_text().splitlines()) if log.exists() else 0
        started = time.perf_counter()
        inner_pytest(project, cache, count, "-n", "4")
        elapsed = time.perf_counter() - started
        builds.append((len(log.read_text().splitlines()) if log.exists() else 0) - before)
        rows.append(Row(f"-n 4, {count} tests: {name}", 1, elapsed, None, "s"))
        measured[name] = elapsed
    cached = rows[1]
    for row in rows:
        if row is not cached:
            row.against, row.against_median = cached.name, cached.median
    section.rows += rows
    expected = [1, 0, 1, 1]
    section.lines.append(
        f"-n 4: template setup sleeps 2 s and copies an input file; builds per run {builds} "
        f"(expected {expected}); each run's time includes starting 4 workers"
    )
    if builds != expected:
        section.notes.append(f"-n 4 runs: the template was built {builds} times per run, expected {expected}")
    section.data["xdist"] = {"tests": count, "seconds": measured, "builds": builds}
