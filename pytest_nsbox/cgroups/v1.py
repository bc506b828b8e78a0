"""cgroup v1: one hierarchy per controller, each box gets a directory in every one we use."""

from __future__ import annotations

import errno
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

CONTROLLERS = ("pids", "memory", "cpu", "cpuacct", "cpuset", "blkio", "devices", "freezer")
# Counted, capped for OOM, CPU time, kept to its own devices, frozen for a snapshot: every box
# joins these. (A privileged box joins devices too, and keeps all its parent allows.) Why
# freezer from the start: joining it late races with the box's forks.
ALWAYS = ("pids", "memory", "cpuacct", "devices", "freezer")
_PERIOD_US = 100_000
_UNLIMITED = "-1"


def mounted_controllers(mountinfo: str = "/proc/self/mountinfo") -> dict[str, Path]:
    """Controller -> the directory of its v1 hierarchy (co-mounted ones share it)."""
    found: dict[str, Path] = {}
    with open(mountinfo) as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] != "cgroup":
                continue
            options = set(fields[separator + 3].split(","))
            for controller in CONTROLLERS:
                if controller in options:
                    found.setdefault(controller, Path(fields[4]))
    return found


class V1Driver:
    """Box cgroups nested below our own cgroup in each controller's hierarchy."""

    version = "v1"

    def __init__(self, hierarchies: dict[str, Path]) -> None:
        self.hierarchies = hierarchies
        # Nest below the cgroup pytest itself is in, so a box is charged where its owner is.
        self.parents = {
            controller: root / own_cgroup(controller).lstrip("/") / PARENT_NAME
            for controller, root in hierarchies.items()
        }

    def _make(self, controller: str, name: str) -> Path:
        path = self.parents[controller] / name
        for directory in (path.parent, path):
            try:
                directory.mkdir()
            except FileExistsError:
                continue  # the shared parent, or a co-mounted controller's directory
            if controller == "cpuset":
                # Why: a new cpuset has no CPUs and refuses tasks until given some.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    write(directory / knob, read(path.parent.parent / knob).strip() or "0")
        return path

    def _join_late(self, dirs: list[Path], controller: str) -> Path:
        """Make the controller's directory and move every process of the box into it.

        The box's processes are listed by its pids (or memory) cgroup; a child forked while
        they move is caught by the next pass, as it inherits its parent's old cgroup.
        """
        path = self._make(controller, dirs[0].name)
        source = dirs[0] / "cgroup.procs"
        for _ in range(100):
            moving = set(read(source).split()) - set(read(path / "cgroup.procs").split())
            if not moving:
                break
            for pid in moving:
                try:
                    write(path / "cgroup.procs", pid)
                except CgroupError:
                    pass  # exited meanwhile
        dirs.append(path)
        return path

    def procs_files(self, dirs: list[Path]) -> list[str]:
        return [str(d / "cgroup.procs") for d in dirs]

    def _find(self, dirs: list[Path], controller: str) -> Path | None:
        parent = self.parents.get(controller)
        return next((d for d in dirs if parent is not None and d.parent == parent), None)

    def track_io(self, dirs: list[Path], devices: tuple[str, ...]) -> None:
        """Join blkio (not joined by every box): its counters and caps need it. Its counters
        run only on a device with blk-throttle set up: an unlimited cap sets it up."""
        if "blkio" not in self.parents:
            return
        directory = self._find(dirs, "blkio") or self._join_late(dirs, "blkio")
        cap_file = directory / _THROTTLE_FILES["rbps"]
        if cap_file.exists():
            for device in devices:
                if device not in read(cap_file):
                    write(cap_file, f"{device} 0")

    def apply(self, dirs: list[Path], limits: dict[str, Any], devices: tuple[str, ...] = ()) -> None:
        for kind, lines in io_cap_lines(limits, devices).items():
            if "blkio" not in self.parents:
                raise CgroupError("I/O caps need the v1 blkio controller, which this host has not mounted")
            directory = self._find(dirs, "blkio") or self._join_late(dirs, "blkio")
            cap_file = directory / _THROTTLE_FILES[kind]
            if not cap_file.exists():
                raise CgroupError(f"I/O caps need blk-throttle (CONFIG_BLK_DEV_THROTTLING): no {cap_file}")
            for line in lines:
                write(cap_file, line.replace(" max", " 0"), f"io_{kind}")
        for key, value in limits.items():
            if key.startswith("io_") and key != "io_weight":
                continue
            controller = _CONTROLLER_OF[key]
            if controller not in self.parents:
                raise CgroupError(
                    f"limit {key!r} needs the v1 {controller} controller, which this host has not mounted"
                )
            directory = self._find(dirs, controller) or self._join_late(dirs, controller)
            if key == "pids":
                write(directory / "pids.max", "max" if value is None else str(value), key)
            elif key == "memory":
                self._set_memory(directory, value, limits)
            elif key == "memory_swap" and "memory" not in limits:
                swap_file = directory / "memory.memsw.limit_in_bytes"
                if not swap_file.exists():
                    if value:  # swap accounting is off (no memsw files): it cannot be capped
                        raise CgroupError("limit 'memory_swap' needs swap accounting (swapaccount=1)")
                elif value is None:
                    write(swap_file, _UNLIMITED, key)
                else:
                    write(swap_file, str(read_int(directory / "memory.limit_in_bytes") + value), key)
            elif key == "cpus":
                write(directory / "cpu.cfs_period_us", str(_PERIOD_US), key)
                quota = _UNLIMITED if value is None else str(max(1000, int(value * _PERIOD_US)))
                write(directory / "cpu.cfs_quota_us", quota, key)
            elif key == "cpuset":
                write(directory / "cpuset.cpus", value, key)
            elif key == "io_weight":
                for knob in ("blkio.bfq.weight", "blkio.weight"):
                    if (directory / knob).exists():
                        # v1 weights run 1..1000 (bfq; blkio.weight 10..1000): v2's 1..10000 saturates
                        weight = max(1 if "bfq" in knob else 10, min(1000, value))
                        write(directory / knob, str(weight), key)
                        break
                else:
                    raise CgroupError(
                        f"limit 'io_weight' needs blkio.weight or the BFQ I/O scheduler ({directory})"
                    )

    def _set_memory(self, directory: Path, value: int | None, limits: dict[str, Any]) -> None:
        swap_file = directory / "memory.memsw.limit_in_bytes"
        swap_before = read(swap_file).strip() if swap_file.exists() else ""
        if swap_before:
            write(swap_file, _UNLIMITED, "memory")  # memsw may never be below memory: lift it first
        try:
            write(directory / "memory.limit_in_bytes", _UNLIMITED if value is None else str(value), "memory")
        except CgroupError as exc:
            if swap_before:
                try:  # a change refused changes nothing: the swap cap as it was
                    write(swap_file, swap_before, "memory_swap")
                except CgroupError:
                    pass
            if value is not None and errno_of(exc) == errno.EBUSY:
                # The kernel reclaimed what it could and the rest is still above the cap.
                usage = read_int(directory / "memory.usage_in_bytes")
                raise cannot_lower_memory(value, usage, "memory.usage_in_bytes") from exc
            raise
        if value is not None and swap_before and limits.get("memory_swap", 0) is not None:
            swap = limits.get("memory_swap") or 0  # swap off by default: an OOM is an OOM
            try:
                write(swap_file, str(value + swap), "memory_swap")
            except CgroupError as exc:
                if errno_of(exc) == errno.EBUSY:  # memory and swap together above the new cap
                    usage = read_int(directory / "memory.memsw.usage_in_bytes")
                    raise cannot_lower_memory(value + swap, usage, "memory.memsw.usage_in_bytes") from exc
                raise

    def stats(self, dirs: list[Path], seen_pids_peak: int, devices: tuple[str, ...] = ()) -> CgroupStats:
        pids = self._find(dirs, "pids")
        memory = self._find(dirs, "memory")
        cpu = self._find(dirs, "cpu")
        cpuacct = self._find(dirs, "cpuacct")
        pids_current = read_int(pids / "pids.current") if pids else 0
        return CgroupStats(
            pids_current=pids_current,
            pids_peak=pids_peak(pids, pids_current, seen_pids_peak) if pids else 0,
            memory_current=read_int(memory / "memory.usage_in_bytes") if memory else 0,
            memory_peak=read_int(memory / "memory.max_usage_in_bytes") if memory else 0,
            oom_kills=self.oom_kills(dirs),
            cpu_usec=read_int(cpuacct / "cpuacct.usage") // 1000 if cpuacct else 0,
            throttled_usec=keyed(cpu / "cpu.stat").get("throttled_time", 0) // 1000 if cpu else 0,
            **self._io_stats(dirs, devices),
        )

    def _io_stats(self, dirs: list[Path], devices: tuple[str, ...] = ()) -> dict[str, int]:
        """Bytes and operations read and written, over ``devices`` only when given (a box's
        disks: a device-mapper device's I/O is counted again on the loop device under it)."""
        blkio = self._find(dirs, "blkio")
        if blkio is None:
            return {}
        totals = {"io_read_bytes": 0, "io_write_bytes": 0, "io_read_ops": 0, "io_write_ops": 0}
        for name, unit in (("io_service_bytes_recursive", "bytes"), ("io_serviced_recursive", "ops")):
            for line in read(blkio / f"blkio.throttle.{name}").splitlines():
                fields = line.split()  # "7:3 Read 4096"; a last "Total N" line
                if devices and fields and fields[0] not in devices:
                    continue
                if len(fields) == 3 and fields[1] in ("Read", "Write") and fields[2].isdigit():
                    totals[f"io_{fields[1].lower()}_{unit}"] += int(fields[2])
        return totals

    def oom_kills(self, dirs: list[Path]) -> int:
        path = self.oom_kills_file(dirs)
        return keyed(path).get("oom_kill", 0) if path else 0

    def oom_kills_file(self, dirs: list[Path]) -> Path | None:
        memory = self._find(dirs, "memory")
        return memory / "memory.oom_control" if memory else None

    def remove(self, dirs: list[Path]) -> bool:
        gone = remove_dirs(dirs)
        if gone:
            remove_dirs(sorted({d.parent for d in dirs}))  # the shared parent, once nobody is left
        return gone

    def remove_named(self, name: str) -> bool:
        """rmdir ``name`` in every hierarchy: also those joined late, which only the host knew."""
        return self.remove(
            sorted({parent / name for parent in self.parents.values() if (parent / name).exists()})
        )

    def existing(self) -> list[Path]:
        return box_dirs(list(self.parents.values()))

    def freeze(self, dirs: list[Path], frozen: bool) -> None:
        directory = self._find(dirs, "freezer")
        if directory is None:
            raise CgroupError(
                "freezing a box needs the v1 freezer controller, which this host has not mounted"
            )
        write(directory / "freezer.state", "FROZEN" if frozen else "THAWED", "freeze")
        # FREEZING until every task has stopped at a safe point.
        wanted = "FROZEN" if frozen else "THAWED"
        # A cgroup removed meanwhile (its last process died: the helper removes it) is done.
        wait_until(lambda: not directory.exists() or read(directory / "freezer.state").strip() == wanted)

    def is_frozen(self, dirs: list[Path]) -> bool:
        directory = self._find(dirs, "freezer")
        return directory is not None and read(directory / "freezer.state").strip() != "THAWED"

    def helper_plan(self) -> dict[str, Any]:
        """Made in the hierarchies every box joins; removed from all (some are joined late).
        Co-mounted controllers (cpu,cpuacct) share one directory, listed once; ``devices`` names
        the parent whose box cgroups get the device allowlist."""
        make = [str(self.parents[c]) for c in ALWAYS if c in self.parents]
        plan: dict[str, Any] = {
            "make": list(dict.fromkeys(make)),
            "remove": list(dict.fromkeys(str(p) for p in self.parents.values())),
        }
        if "devices" in self.parents:  # where the zygote writes a box's device allowlist
            plan["devices"] = str(self.parents["devices"])
        return plan


_THROTTLE_FILES = {
    "rbps": "blkio.throttle.read_bps_device",
    "wbps": "blkio.throttle.write_bps_device",
    "riops": "blkio.throttle.read_iops_device",
    "wiops": "blkio.throttle.write_iops_device",
}
_CONTROLLER_OF = {
    "pids": "pids",
    "memory": "memory",
    "memory_swap": "memory",
    "cpus": "cpu",
    "cpuset": "cpuset",
    "io_weight": "blkio",
    "io_read_bps": "blkio",
    "io_write_bps": "blkio",
    "io_read_iops": "blkio",
    "io_write_iops": "blkio",
}
