"""Section ``workload``: sysbench inside a box against the same sysbench on the host.

The classic container-versus-host overhead test. Each test runs on the host and in one warm
box (host root, no limits) by turns, several times; the rows give medians of each, higher is
better, and the ratio box / host (1.00x: no overhead). fileio runs on the same kind of
filesystem on both sides: a tmpfs (``Box(tmpfs=...)`` in the box, a tmpfs mounted for the run
on the host) and, in a full run, the box's writable root (overlay on a tmpfs upper) against an
overlay mounted the same way on the host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from context import Context
from report import Row, Section
from stats import median, p95

from pytest_nsbox import Box, syscalls

BOX_TMPFS = "/bench"
BOX_OVERLAY_DIR = "/var/tmp/nsbox-bench-fileio"  # in the box's own writable root
FILEIO_SIZE = ["--file-total-size=256M", "--file-num=16"]


@dataclass(frozen=True)
class Test:
    """One sysbench test: its arguments, how to read its result, the unit of that result."""

    name: str
    argv: list[str]
    unit: str
    parse: Callable[[str], float]
    directory: str = ""  # "tmpfs" or "overlay" for fileio: where it runs


def _number(pattern: str, output: str) -> float:
    """The first number ``pattern`` captures in sysbench's output; a clear error if none."""
    match = re.search(pattern, output)
    if match is None:
        raise ValueError(f"sysbench output lacks {pattern!r}:\n{output[-2000:]}")
    return float(match.group(1))


def events_per_second(output: str) -> float:
    """cpu: sysbench prints the rate itself."""
    return _number(r"events per second:\s+([\d.]+)", output)


def mib_per_second(output: str) -> float:
    """memory: the rate in parentheses after the MiB transferred."""
    return _number(r"\(([\d.]+) MiB/sec\)", output)


def events_over_time(output: str) -> float:
    """threads: sysbench prints no rate, so events over the run's time."""
    return _number(r"total number of events:\s+(\d+)", output) / _number(r"total time:\s+([\d.]+)s", output)


def read_plus_written(output: str) -> float:
    """fileio rndrw: reads and writes both count; their sum is the throughput."""
    return _number(r"read, MiB/s:\s+([\d.]+)", output) + _number(r"written, MiB/s:\s+([\d.]+)", output)


def tests(seconds: int, overlay: bool) -> list[Test]:
    """The sysbench tests of this run, each running ``seconds`` long."""
    time_limit = f"--time={seconds}"
    fileio = ["sysbench", "fileio", *FILEIO_SIZE, "--file-test-mode=rndrw", time_limit, "--threads=1"]
    chosen = [
        Test("cpu", ["sysbench", "cpu", time_limit, "--threads=1", "run"], "events/s", events_per_second),
        Test("memory", ["sysbench", "memory", time_limit, "--threads=1", "run"], "MiB/s", mib_per_second),
        Test(
            "threads", ["sysbench", "threads", time_limit, "--threads=2", "run"], "events/s", events_over_time
        ),
        Test("fileio rndrw, tmpfs", [*fileio, "run"], "MiB/s", read_plus_written, "tmpfs"),
    ]
    if overlay:
        chosen.append(
            Test("fileio rndrw, overlay root", [*fileio, "run"], "MiB/s", read_plus_written, "overlay")
        )
    return chosen


# --------------------------------------------------------------- host-side filesystems


@contextmanager
def host_tmpfs(parent: Path) -> Iterator[Path]:
    """A tmpfs mounted for the run, with the options a box's tmpfs gets."""
    target = Path(tempfile.mkdtemp(dir=parent, prefix="tmpfs-"))
    syscalls.mount("nsbox-bench", str(target), "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777")
    try:
        yield target
    finally:
        syscalls.umount2(str(target), syscalls.MNT_DETACH)
        target.rmdir()


@contextmanager
def host_overlay(parent: Path) -> Iterator[Path]:
    """An overlay with an empty lower and its upper on a tmpfs: a box's writable root, on the host."""
    with host_tmpfs(parent) as scratch:
        for name in ("lower", "upper", "work", "merged"):
            (scratch / name).mkdir()
        options = f"lowerdir={scratch}/lower,upperdir={scratch}/upper,workdir={scratch}/work"
        merged = str(scratch / "merged")
        syscalls.mount("nsbox-bench", merged, "overlay", 0, options)
        try:
            yield Path(merged)
        finally:
            syscalls.umount2(merged, syscalls.MNT_DETACH)


# ----------------------------------------------------------------------------- running


class Sides:
    """Runs a sysbench command on the host or in the box, in the directory its test needs."""

    def __init__(self, box: Box, host_dirs: dict[str, Path]) -> None:
        self.box = box
        self.host_dirs = host_dirs
        self.box_dirs = {"tmpfs": BOX_TMPFS, "overlay": BOX_OVERLAY_DIR}

    def host(self, argv: list[str], directory: str) -> str:
        """Run ``argv`` on the host, in the test's directory; its output."""
        cwd = self.host_dirs[directory] if directory else None
        return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout

    def in_box(self, argv: list[str], directory: str) -> str:
        """Run ``argv`` in the box, in the test's directory; its output."""
        cwd = self.box_dirs[directory] if directory else None
        return self.box.run(argv, cwd=cwd, check=True, timeout=600).stdout

    def prepare(self, directories: set[str]) -> None:
        """Write sysbench's test files (untimed) on both sides."""
        prepare = ["sysbench", "fileio", *FILEIO_SIZE, "prepare"]
        for directory in sorted(directories):
            self.host(prepare, directory)
            self.in_box(prepare, directory)


def measure(test: Test, sides: Sides, repetitions: int) -> tuple[list[float], list[float]]:
    """``repetitions`` results per side, alternating which side goes first."""
    host: list[float] = []
    box: list[float] = []
    for rep in range(repetitions):
        order = ("host", "box") if rep % 2 == 0 else ("box", "host")
        for side in order:
            if side == "host":
                host.append(test.parse(sides.host(test.argv, test.directory)))
            else:
                box.append(test.parse(sides.in_box(test.argv, test.directory)))
    return host, box


def run(ctx: Context, stack: ExitStack) -> Section:
    """Every test, host and box by turns; a ratio per test."""
    section = Section("workload", "sysbench in a box vs on the host (higher is better)")
    if shutil.which("sysbench") is None:
        section.notes.append("sysbench not found on PATH (benchmarks/setup.sh installs it): section skipped")
        return section
    overlay = not ctx.quick
    seconds, repetitions = ctx.pick(1, 3), ctx.pick(2, 5)
    host_dirs = {"tmpfs": stack.enter_context(host_tmpfs(ctx.scratch))}
    if overlay:
        host_dirs["overlay"] = stack.enter_context(host_overlay(ctx.scratch))
    box = stack.enter_context(Box(hostname="sysbench", tmpfs={BOX_TMPFS: None}))
    if overlay:
        box.run(["mkdir", "-p", BOX_OVERLAY_DIR], check=True)
    sides = Sides(box, host_dirs)
    chosen = tests(seconds, overlay)
    sides.prepare({t.directory for t in chosen if t.directory})
    results = {}
    for test in chosen:
        host, in_box = measure(test, sides, repetitions)
        results[test.name] = {"unit": test.unit, "host": host, "box": in_box}
        host_name = f"sysbench {test.name}, host"
        section.rows.append(
            Row(
                f"sysbench {test.name}, box",
                len(in_box),
                median(in_box),
                p95_low(in_box),
                test.unit,
                host_name,
                median(host),
                higher_is_better=True,
            )
        )
        section.rows.append(
            Row(host_name, len(host), median(host), p95_low(host), test.unit, higher_is_better=True)
        )
    section.lines += [
        f"each test {seconds} s, {repetitions} times per side, host and box by turns; one box "
        "(host root, no limits) for all; cpu, memory and fileio with 1 thread, threads with 2",
        f"fileio: {' '.join(FILEIO_SIZE)}, random read/write; tmpfs: Box(tmpfs={{'{BOX_TMPFS}': None}}) "
        "vs a tmpfs mounted on the host with the same options"
        + (
            "; overlay: the box's writable root vs a host overlay (empty lower, tmpfs upper)"
            if overlay
            else ""
        ),
        "for these rows the p95 column holds the 5th percentile: the slow tail of a rate is its low end",
    ]
    section.data = {"seconds": seconds, "repetitions": repetitions, "results": results}
    return section


def p95_low(rates: list[float]) -> float:
    """The slow tail of a rate: the value 95% of the runs beat (nearest rank, mirrored)."""
    return -p95([-rate for rate in rates])
