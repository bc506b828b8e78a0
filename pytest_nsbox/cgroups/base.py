"""What both cgroup drivers share: the stats record, the driver protocol, careful file I/O."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import CgroupError, permission_hint

NAME_PREFIX = "nsb-"  # every box cgroup: nsb-<box id>
PARENT_NAME = "pytest-nsbox"  # the directory that holds them, one per place we nest in


@dataclass(frozen=True)
class CgroupStats:
    """A box's resource use; the same fields on cgroup v1 and v2 (microseconds, bytes)."""

    pids_current: int = 0
    pids_peak: int = 0
    memory_current: int = 0
    memory_peak: int = 0
    oom_kills: int = 0
    cpu_usec: int = 0
    throttled_usec: int = 0
    # Block I/O of the box's processes (v1: counted once the box joined blkio, which a box
    # with disks or I/O caps does; buffered writes are counted to the flusher there).
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    io_read_ops: int = 0
    io_write_ops: int = 0


class Driver(Protocol):
    """One cgroup version's way of doing things, for cgroups the driver made."""

    version: str

    def procs_files(self, dirs: list[Path]) -> list[str]: ...

    def apply(self, dirs: list[Path], limits: dict[str, Any], devices: tuple[str, ...] = ()) -> None: ...

    def track_io(self, dirs: list[Path], devices: tuple[str, ...]) -> None: ...

    def stats(self, dirs: list[Path], seen_pids_peak: int, devices: tuple[str, ...] = ()) -> CgroupStats: ...

    def oom_kills(self, dirs: list[Path]) -> int: ...

    def oom_kills_file(self, dirs: list[Path]) -> Path | None: ...

    def remove(self, dirs: list[Path]) -> bool: ...

    def remove_named(self, name: str) -> bool: ...

    def existing(self) -> list[Path]: ...

    def helper_plan(self) -> dict[str, Any]: ...

    def freeze(self, dirs: list[Path], frozen: bool) -> None: ...

    def is_frozen(self, dirs: list[Path]) -> bool: ...


def box_dirs(parents: list[Path]) -> list[Path]:
    """The box cgroups (``nsb-*``) in these parent directories, for leak checks and reapers."""
    found: list[Path] = []
    for parent in parents:
        try:
            found.extend(p for p in parent.iterdir() if p.name.startswith(NAME_PREFIX))
        except OSError:
            continue
    return sorted(found)


def write(path: Path, value: str, limit: str | None = None) -> None:
    """Write one cgroup file; the error names the file, the value and what to do."""
    try:
        with open(path, "w") as handle:
            handle.write(value)
    except OSError as exc:
        what = f" for limit {limit!r}" if limit else ""
        if exc.errno in (errno.EACCES, errno.ENOENT) and not path.exists():
            # (cgroupfs answers EACCES, not ENOENT, to the create that open(path, "w") asks for)
            raise CgroupError(
                f"writing {value!r} to {path}{what} failed: the cgroup has no such file: its "
                "controller is not enabled in the parent's cgroup.subtree_control, or this kernel "
                "lacks it (see `nsbox doctor`)"
            ) from exc
        hint = {
            errno.EINVAL: "the kernel refused the value",
            errno.EBUSY: "the cgroup is in use in a way that forbids this change",
            errno.ENOENT: "this kernel or cgroup lacks that file (controller not enabled?)",
            errno.EACCES: permission_hint("writing a cgroup file"),
            errno.EPERM: permission_hint("writing a cgroup file"),
        }.get(exc.errno or 0, exc.strerror)
        raise CgroupError(f"writing {value!r} to {path}{what} failed: {exc.strerror} ({hint})") from exc


def errno_of(error: CgroupError) -> int | None:
    """The errno behind a ``CgroupError`` that ``write`` raised, if any."""
    cause = error.__cause__
    return cause.errno if isinstance(cause, OSError) else None


def cannot_lower_memory(value: int, usage: int, usage_file: str) -> CgroupError:
    """The error for a memory cap below what the box holds and cannot give back.

    Why a message of its own: the kernel says only EBUSY (v1), or reclaims and then OOM-kills
    whatever it must (v2), the box's init included; what helps is how much the box holds.
    """
    return CgroupError(
        f"limit 'memory': cannot lower to {size_text(value)}: the box uses {size_text(usage)} that "
        f"cannot be reclaimed ({usage_file}); free memory in the box first (end the processes that "
        "hold it, remove its files in a tmpfs or /dev/shm) or set the limit before starting what uses it"
    )


def size_text(count: int) -> str:
    """``24.3 MiB``: bytes for people."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def wait_until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``done`` (a cgroup state file's answer) until it holds; ``CgroupError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while not done():
        if time.monotonic() >= deadline:
            raise CgroupError(f"the cgroup did not reach the state asked for within {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def read(path: Path, default: str = "") -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return default


def read_int(path: Path, default: int = 0) -> int:
    text = read(path).strip()
    try:
        return int(text)
    except ValueError:
        return default


def keyed(path: Path) -> dict[str, int]:
    """Files of ``key value`` lines (cpu.stat, memory.events, memory.oom_control)."""
    return parse_keyed(read(path))


def parse_keyed(text: str) -> dict[str, int]:
    """The ``key value`` lines of a cgroup file's text."""
    result = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            result[parts[0]] = int(parts[1])
    return result


def io_cap_lines(limits: dict[str, Any], devices: tuple[str, ...]) -> dict[str, list[str]]:
    """The I/O caps among ``limits`` per kind (``rbps``...), as ``MAJ:MIN value`` for each of
    ``devices`` (None lifts a cap: v1 writes 0 for that, v2 ``max``)."""
    kinds = {"io_read_bps": "rbps", "io_write_bps": "wbps", "io_read_iops": "riops", "io_write_iops": "wiops"}
    lines: dict[str, list[str]] = {}
    for key, kind in kinds.items():
        if key in limits:
            value = limits[key]
            lines[kind] = [f"{device} {'max' if value is None else value}" for device in devices]
    return lines


def pids_peak(directory: Path, current: int, seen: int) -> int:
    """The most processes the cgroup in ``directory`` (of the pids controller) has held.

    ``pids.peak`` came with Linux 6.1; before it, the best estimate is the most seen so far
    (``seen``, kept by the caller), the current count, or the limit itself once the kernel
    has refused a fork for it (``pids.events`` counts those).
    """
    peak = read_int(directory / "pids.peak", -1)
    if peak >= 0:
        return peak
    limit = read(directory / "pids.max").strip()
    reached = keyed(directory / "pids.events").get("max", 0) > 0 and limit.isdigit()
    return max(seen, current, int(limit) if reached else 0)


def remove_dirs(dirs: list[Path]) -> bool:
    """rmdir each (a cgroup directory goes only once it has no processes); True if all went."""
    gone = True
    for path in dirs:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            gone = False
    return gone


def own_cgroup(controller: str | None) -> str:
    """Our process's cgroup path for a v1 controller, or the v2 path with ``None``."""
    for line in read(Path("/proc/self/cgroup")).splitlines():
        number, controllers, path = line.split(":", 2)
        if controller is None and number == "0" and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return "/"
