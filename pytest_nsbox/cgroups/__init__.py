"""One ``Cgroup`` API over cgroup v1 and v2; the driver is chosen once, at run time.

Every box gets its own cgroup (``nsb-<box id>``), so its processes can always be counted and
capped. Hybrid hosts (v1 controllers plus an empty v2 tree) use v1, where the controllers are.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from .. import rootless
from ..errors import CgroupError, ConfigError, RootlessError
from ..spec import IO_CAPS, LIMITS, parse_limits
from .base import NAME_PREFIX, CgroupStats, Driver, own_cgroup, parse_keyed
from .v1 import V1Driver, mounted_controllers
from .v2 import V2Driver

__all__ = [
    "LIMITS",
    "NAME_PREFIX",
    "Cgroup",
    "CgroupError",
    "CgroupStats",
    "adopt",
    "driver",
    "flush_pending",
    "helper_plan",
    "release",
    "unavailable",
]


@functools.cache
def driver() -> Driver | None:
    """The cgroup driver of this host, detected once; None where there are no cgroups (or
    none an ordinary user may use: ``unavailable()`` says why)."""
    hierarchies = mounted_controllers()
    if "pids" in hierarchies or "memory" in hierarchies:
        return None if rootless.active() else V1Driver(hierarchies)
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        if rootless.active():
            nest = delegated_nest()
            return V2Driver(nest=nest) if nest is not None else None
        return V2Driver()
    return None


def unavailable() -> str:
    """Why ``driver()`` is None: what is missing, and what would give boxes cgroups."""
    if rootless.active():
        if "pids" in mounted_controllers() or "memory" in mounted_controllers():
            return (
                "this host uses cgroup v1, whose hierarchies cannot be handed to an ordinary user: "
                "limits, pause and io stats of rootless boxes need cgroup v2 with a delegated "
                "subtree, or pytest run as root"
            )
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            own = own_cgroup(None)
            return (
                f"rootless boxes get cgroups only in a cgroup v2 subtree delegated to uid {os.getuid()}, "
                f"and this process's cgroup ({own}) is not writable by it: run pytest in one, e.g. "
                "`systemd-run --user --scope -p Delegate=yes pytest ...`"
            )
    return (
        "this host has no usable cgroups (no v1 pids or memory hierarchy, no cgroup v2); see `nsbox doctor`"
    )


def delegated_nest() -> Path | None:
    """Where an ordinary user's box cgroups may go: beside our own cgroup when its parent is
    delegated to us too (systemd's ``Delegate=yes`` units), else below our own cgroup when
    only it is (our processes then move into a leaf of it). None: neither is writable."""
    root = Path("/sys/fs/cgroup")
    own = root / own_cgroup(None).lstrip("/")
    for candidate in (own.parent, own):
        if candidate != root and _writable(candidate):
            return candidate
    return None


def _writable(directory: Path) -> bool:
    return all(
        os.access(directory / name, os.W_OK) for name in ("cgroup.procs", "cgroup.subtree_control")
    ) and os.access(directory, os.W_OK)


def helper_plan() -> dict[str, Any]:
    """Where the zygote makes and removes box cgroups, as plain paths (``zygote_process.Plan``).

    Why the host works it out: the zygote would otherwise import this package (pathlib,
    dataclasses, the drivers), and every box forked from it would carry their pages.
    """
    backend = driver()
    if backend is None:
        return {}
    try:
        return backend.helper_plan()
    except CgroupError as exc:
        return {"error": str(exc)}


class Cgroup:
    """A box's cgroup: ``set(**limits)`` any time, ``stats()`` any time."""

    def __init__(self, name: str, backend: Driver | None, dirs: list[Path]) -> None:
        self.name = name
        self.driver = backend
        self.dirs = dirs
        self.closed = False
        self._seen_pids_peak = 0
        self._oom_fd: int | None = None
        # "MAJ:MIN" of the box's disks' block devices: what the I/O caps apply to.
        self.block_devices: tuple[str, ...] = ()

    @property
    def version(self) -> str:
        return self.driver.version if self.driver else "none"

    @property
    def path(self) -> Path | None:
        """The cgroup's directory (v1: the pids controller's, or the first)."""
        return self.dirs[0] if self.dirs else None

    def __repr__(self) -> str:
        return f"<Cgroup {self.name} {self.version} {[str(d) for d in self.dirs]}>"

    def close(self) -> None:
        """Called at box stop: the cgroup is going away, so limits can no longer be set."""
        self.closed = True
        if self._oom_fd is not None:
            os.close(self._oom_fd)
            self._oom_fd = None

    def set(self, **limits: Any) -> Cgroup:
        """Change limits: ``pids``, ``memory`` ("64M" or bytes), ``memory_swap``, ``cpus``
        (float CPUs), ``cpuset`` ("0-1"), ``io_weight`` (1-10000), and on the box's disks
        ``io_read_bps`` / ``io_write_bps`` ("2M" a second) and ``io_read_iops`` /
        ``io_write_iops``. ``None`` lifts a limit."""
        parsed = parse_limits(limits, "limits")
        caps = sorted(key for key in IO_CAPS if key in parsed)
        if caps and not self.block_devices:
            raise ConfigError(
                f"limits: {', '.join(caps)} cap the I/O of a box's disks, and this box has none; "
                "give it one with disks={'/data': '64M'}"
            )
        if self.closed:
            raise CgroupError(f"cgroup {self.name} belongs to a stopped box; limits can no longer be set")
        if self.driver is None:
            if rootless.active():
                raise RootlessError(f"limits need cgroups: {unavailable()}")
            raise CgroupError("this host has no usable cgroups, so limits cannot be set (see `nsbox doctor`)")
        self.driver.apply(self.dirs, parsed, self.block_devices)
        return self

    def use_block_devices(self, devices: tuple[str, ...]) -> None:
        """The box's disks (``MAJ:MIN``), for its I/O caps; on v1 the box joins blkio to count I/O."""
        self.block_devices = devices
        if devices and self.driver is not None and not self.closed:
            self.driver.track_io(self.dirs, devices)

    def stats(self) -> CgroupStats:
        """Usage now; refused once the box stopped (its cgroup goes, and zeros would mislead)."""
        if self.closed:
            raise CgroupError(
                f"cgroup {self.name} belongs to a stopped box; call stats() before stop() "
                "(inside the test, not after the fixture's teardown)"
            )
        if self.driver is None:
            return CgroupStats()
        stats = self.driver.stats(self.dirs, self._seen_pids_peak, self.block_devices)
        self._seen_pids_peak = max(self._seen_pids_peak, stats.pids_peak)
        return stats

    def oom_kills(self) -> int:
        """The cgroup's OOM kill count. Read through a descriptor kept open until ``close()``:
        ``run()`` reads it around every command, and an open per read cost a tenth of one."""
        if self.driver is None:
            return 0
        if self.closed:
            return self.driver.oom_kills(self.dirs)
        if self._oom_fd is None:
            path = self.driver.oom_kills_file(self.dirs)
            if path is None:
                return 0
            try:
                self._oom_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return 0
        try:
            data = os.pread(self._oom_fd, 4096, 0)  # a cgroup file is made anew at offset 0
        except OSError:
            return 0
        return parse_keyed(data.decode()).get("oom_kill", 0)

    def procs_files(self) -> list[str]:
        return self.driver.procs_files(self.dirs) if self.driver else []

    def freeze(self) -> None:
        """Stop every process of the cgroup where it stands (cgroup freezer); ``thaw()`` resumes.

        Returns once all of them are stopped. Frozen processes keep their memory and open
        files and notice nothing but lost time.
        """
        self._require_live("freeze()")
        assert self.driver is not None
        self.driver.freeze(self.dirs, True)

    def thaw(self) -> None:
        """Let the processes of a frozen cgroup run again (nothing happens if it is not frozen)."""
        self._require_live("thaw()")
        assert self.driver is not None
        self.driver.freeze(self.dirs, False)

    def is_frozen(self) -> bool:
        return bool(self.driver and not self.closed and self.driver.is_frozen(self.dirs))

    def _require_live(self, what: str) -> None:
        if self.closed:
            raise CgroupError(f"cgroup {self.name} belongs to a stopped box; {what} needs a running one")
        if self.driver is None:
            if rootless.active():
                raise RootlessError(f"{what} needs cgroups: {unavailable()}")
            raise CgroupError(f"{what} needs cgroups; this host has none usable (see `nsbox doctor`)")

    def remove(self) -> bool:
        """rmdir the cgroup in every hierarchy; False while it still has a process."""
        return self.driver.remove_named(self.name) if self.driver else True


def adopt(dirs: list[str]) -> Cgroup:
    """Take over the cgroup the zygote made for a box (``nsb-<random>``), as it is.

    Why not rename it after the box: cgroup v2 cannot rename a cgroup.
    """
    backend = driver()
    if backend is None or not dirs:
        return Cgroup("none", None, [])
    paths = [Path(d) for d in dirs]
    return Cgroup(paths[0].name, backend, paths)


_pending: list[Cgroup] = []
_PENDING_CHECK = 64


def release(cgroup: Cgroup) -> None:
    """Let a stopped box's cgroup go.

    The zygote removes it as it reaps the box's init, the moment it is empty; doing it here
    too would only fail (init is a zombie until then) and cost the stop. It is kept in mind,
    and checked at the end (``flush_pending``), in case the zygote died first.
    """
    cgroup.close()
    if cgroup.driver is not None:
        _pending.append(cgroup)
        if len(_pending) > _PENDING_CHECK:
            # Forget those the zygote has removed by now, so that a session of thousands of
            # boxes keeps no record of each. Now and then only: a stat of a cgroup directory
            # can wait for the cgroup lock, a fraction of a millisecond no stop() should pay.
            _pending[:] = [kept for kept in _pending if any(os.path.isdir(d) for d in kept.dirs)]


def flush_pending(wait: float = 0.0) -> list[Cgroup]:
    """Remove what is left of stopped boxes' cgroups; returns those that still cannot go."""
    deadline = time.monotonic() + wait
    while True:
        _pending[:] = [cgroup for cgroup in _pending if not cgroup.remove()]
        if not _pending or time.monotonic() >= deadline:
            return list(_pending)
        time.sleep(0.01)
