"""cgroup v2: one unified tree; each box gets one directory with the controllers it needs."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from ..errors import CgroupError
from .base import (
    PARENT_NAME,
    CgroupStats,
    box_dirs,
    cannot_lower_memory,
    errno_of,
    io_cap_lines,
    keyed,
    own_cgroup,
    pids_peak,
    read,
    read_int,
    remove_dirs,
    wait_until,
    write,
)

WANTED = ("memory", "cpu", "io", "pids", "cpuset")  # domain controllers before threaded pids
_PERIOD_US = 100_000
_LEAF = "nsbox-leaf"  # where our own processes go when the root of our view must delegate


def _reclaim_below(path: Path, value: int) -> None:
    """Before a memory cap goes below what the box holds: have the kernel reclaim the
    difference (``memory.reclaim``, Linux 5.19), and refuse the cap if the box still holds more.

    Why: a ``memory.max`` below the usage reclaims too, but then OOM-kills until the box fits,
    its init included, where cgroup v1 refuses the change (EBUSY): both refuse it now, saying
    how much the box holds. Without ``memory.reclaim`` the kernel's own way stands.
    """
    usage = read_int(path / "memory.current")
    reclaim = path / "memory.reclaim"
    if usage <= value or not reclaim.exists():
        return
    try:
        write(reclaim, str(usage - value), "memory")
    except CgroupError as exc:
        if errno_of(exc) not in (errno.EAGAIN, errno.EBUSY):  # EAGAIN: less was reclaimed
            raise
    usage = read_int(path / "memory.current")
    if usage > value:
        raise cannot_lower_memory(value, usage, "memory.current")


def _io_stats(text: str, devices: tuple[str, ...] = ()) -> dict[str, int]:
    """The sums over devices of io.stat's ``MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...`` lines;
    with ``devices``, over those only (a box's disks: a device-mapper device's I/O is counted
    again on the loop device under it)."""
    totals = {"io_read_bytes": 0, "io_write_bytes": 0, "io_read_ops": 0, "io_write_ops": 0}
    names = {
        "rbytes": "io_read_bytes",
        "wbytes": "io_write_bytes",
        "rios": "io_read_ops",
        "wios": "io_write_ops",
    }
    for line in text.splitlines():
        if devices and line.split(" ", 1)[0] not in devices:
            continue
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key in names and value.isdigit():
                totals[names[key]] += int(value)
    return totals


class V2Driver:
    """Box cgroups in ``<our cgroup's parent>/pytest-nsbox/nsb-<id>``."""

    version = "v2"

    def __init__(self, root: Path = Path("/sys/fs/cgroup"), nest: Path | None = None) -> None:
        self.root = root
        self.own = root / own_cgroup(None).lstrip("/")
        # Our own cgroup holds processes (pytest), so it may not delegate controllers to
        # children ("no internal processes"): nest beside it, in its parent, unless we are at
        # the root of our view (a container's cgroup namespace, or the real root). An ordinary
        # user's ``nest`` is the subtree delegated to them (``cgroups.delegated_nest``).
        self.nest = nest if nest is not None else self.own if self.own == root else self.own.parent
        self.parent = self.nest / PARENT_NAME
        self._ready = False

    def _prepare(self) -> None:
        """Controllers enabled down to our parent directory (once per process)."""
        if self._ready:
            return
        self._delegate(self.nest)
        try:
            self.parent.mkdir()
        except FileExistsError:
            pass
        self._delegate(self.parent)
        self._ready = True

    def _delegate(self, directory: Path) -> None:
        available = read(directory / "cgroup.controllers").split()
        enabled = read(directory / "cgroup.subtree_control").split()
        missing = [c for c in WANTED if c in available and c not in enabled]
        if not missing:
            return
        if (
            (directory == self.root and (directory / "cgroup.type").exists())
            or self.root != directory == self.own
        ) and read(directory / "cgroup.procs").strip():
            # The root of a container's cgroup namespace (the real root has no cgroup.type)
            # holds the container's processes, and a cgroup with processes may not delegate
            # domain controllers. Move them into a leaf first, as Docker-in-Docker entrypoints
            # do. (Enabling threaded pids first would even succeed, and then turn the root
            # "domain threaded", refusing memory for good.) The same for an ordinary user's
            # own cgroup, when only it is delegated to them (``nest``).
            self._move_processes_to_leaf(directory)
        for controller in missing:
            try:
                write(directory / "cgroup.subtree_control", f"+{controller}")
            except CgroupError:
                if controller != "cpuset":  # cpuset is optional (absent under some kernels)
                    raise

    def _move_processes_to_leaf(self, directory: Path) -> None:
        leaf = directory / _LEAF
        leaf.mkdir(exist_ok=True)
        for pid in read(directory / "cgroup.procs").split():
            try:
                write(leaf / "cgroup.procs", pid)
            except CgroupError:
                pass  # gone meanwhile, or a kernel thread

    def procs_files(self, dirs: list[Path]) -> list[str]:
        return [str(dirs[0] / "cgroup.procs")]

    def track_io(self, dirs: list[Path], devices: tuple[str, ...]) -> None:
        """Nothing to join: io.stat counts every box from the start."""

    def apply(self, dirs: list[Path], limits: dict[str, Any], devices: tuple[str, ...] = ()) -> None:
        path = dirs[0]
        caps = io_cap_lines(limits, devices)
        if caps and not (path / "io.max").exists():
            raise CgroupError(
                "I/O caps need io.max: the io controller (delegated?) and blk-throttle "
                f"(CONFIG_BLK_DEV_THROTTLING); {path / 'io.max'} is missing"
            )
        for kind, lines in caps.items():
            for line in lines:
                device, value = line.split()
                write(path / "io.max", f"{device} {kind}={value}", f"io_{kind}")
        for key, value in limits.items():
            if key == "pids":
                write(path / "pids.max", "max" if value is None else str(value), key)
            elif key == "memory":
                if value is not None:
                    _reclaim_below(path, value)
                write(path / "memory.max", "max" if value is None else str(value), key)
                if value is not None and "memory_swap" not in limits and (path / "memory.swap.max").exists():
                    write(path / "memory.swap.max", "0", key)  # swap off by default: an OOM is an OOM
            elif key == "memory_swap":
                if (path / "memory.swap.max").exists():
                    write(path / "memory.swap.max", "max" if value is None else str(value), key)
            elif key == "cpus":
                quota = "max" if value is None else str(max(1000, int(value * _PERIOD_US)))
                write(path / "cpu.max", f"{quota} {_PERIOD_US}", key)
            elif key == "cpuset":
                if not (path / "cpuset.cpus").exists():
                    raise CgroupError("limit 'cpuset' needs the cpuset controller, which this kernel lacks")
                write(path / "cpuset.cpus", value, key)
            elif key == "io_weight":
                write(path / "io.weight", f"default {value}", key)

    def stats(self, dirs: list[Path], seen_pids_peak: int, devices: tuple[str, ...] = ()) -> CgroupStats:
        path = dirs[0]
        cpu = keyed(path / "cpu.stat")
        pids_current = read_int(path / "pids.current")
        return CgroupStats(
            pids_current=pids_current,
            pids_peak=pids_peak(path, pids_current, seen_pids_peak),
            memory_current=read_int(path / "memory.current"),
            memory_peak=read_int(path / "memory.peak"),
            oom_kills=self.oom_kills(dirs),
            cpu_usec=cpu.get("usage_usec", 0),
            throttled_usec=cpu.get("throttled_usec", 0),
            **_io_stats(read(path / "io.stat"), devices),
        )

    def oom_kills(self, dirs: list[Path]) -> int:
        return keyed(self.oom_kills_file(dirs)).get("oom_kill", 0)

    def oom_kills_file(self, dirs: list[Path]) -> Path:
        return dirs[0] / "memory.events"

    def _empty(self, dirs: list[Path]) -> bool:
        return "populated 0" in read(dirs[0] / "cgroup.events")

    def remove_named(self, name: str) -> bool:
        path = self.parent / name
        return self.remove([path]) if path.exists() else True

    def remove(self, dirs: list[Path]) -> bool:
        if not dirs:
            return True
        kill = dirs[0] / "cgroup.kill"
        if kill.exists() and not self._empty(dirs):
            try:
                write(kill, "1")  # 5.14+: the kernel kills every process in it
            except CgroupError:
                pass
        gone = remove_dirs(dirs)
        if gone:
            try:
                os.rmdir(self.parent)  # the shared parent, once nobody is left in it
            except OSError:
                pass
        return gone

    def existing(self) -> list[Path]:
        return box_dirs([self.parent])

    def freeze(self, dirs: list[Path], frozen: bool) -> None:
        path = dirs[0]
        if not (path / "cgroup.freeze").exists():
            raise CgroupError("freezing a box needs cgroup.freeze (Linux 5.2 or later)")
        write(path / "cgroup.freeze", "1" if frozen else "0", "freeze")
        # cgroup.events says "frozen 1" once every task has stopped.
        # A cgroup removed meanwhile (its last process died: the helper removes it) is done.
        wait_until(lambda: not path.exists() or keyed(path / "cgroup.events").get("frozen", 0) == int(frozen))

    def is_frozen(self, dirs: list[Path]) -> bool:
        return read(dirs[0] / "cgroup.freeze").strip() == "1"

    def helper_plan(self) -> dict[str, Any]:
        """One parent, delegated now; should it vanish (removed with another process's last
        box), the zygote remakes it and enables the same controllers in it. Its box cgroups
        get the device allowlist as an eBPF program (``device_filter``): v2 has no devices
        controller."""
        # Again for every helper: the parent may have gone with an earlier helper's last box
        # (a helper removes it as it ends), and a delegate list read from a parent made
        # afresh without controllers would give every later box none (no pids.max, ...).
        self._ready = False
        self._prepare()
        return {
            "make": [str(self.parent)],
            "remove": [str(self.parent)],
            "delegate": read(self.parent / "cgroup.subtree_control").split(),
            "device_filter": str(self.parent),
        }
