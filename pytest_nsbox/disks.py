"""Disks: a real filesystem on a loop device, mounted in a box (``disks={"/data": "64M"}``).

Why a loop device and not a tmpfs: a storage engine under test must meet a real block
device's behaviour, the full disk and the inode shortage at a real filesystem's limits,
``fsync`` that reaches a device, and a journal replayed after a crash.

The layers, from the bottom: a sparse file on the host that has no name (``O_TMPFILE``: a
killed pytest leaves no file behind), the loop device over it (it clears itself when its
last user goes: see ``loop``), the filesystem made on it, and the mount the box's init
moves onto the path (made here with ``fsopen``/``fsmount``, passed over the box's socket,
so the mount lives in the box's mount namespace only and goes with it). Where the kernel
has device-mapper, a ``linear`` device sits between the loop device and the filesystem
(``device`` is what the filesystem is on): a fault (``fail()``, ``slow()``, ``flaky()``,
``power_cut()``) is a swap of its table under the mounted filesystem (see ``devmapper``).
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import threading
import time
import weakref
from collections.abc import Callable

from . import devmapper, loop, syscalls
from .errors import BoxError, HostUnsupportedError
from .layers import default_cache
from .spec import DISK_MKFS, DiskSource, DiskSpec, disk_fault_number, mkfs_program

DIR_NAME = "nsbox-disks"  # under the layer cache: where the backing files (without names) live
RELEASE_TIMEOUT = 10.0
CUT_TIMEOUT = 10.0  # for the mount of a box whose power was cut to be gone
MKFS_TIMEOUT = 120.0
_CLAIMS = threading.Lock()  # Disk.claim(): one box at a time takes a disk
# Access-time options (spec.DISK_ATIME) are mount attributes: fsconfig() would refuse them.
_ATIME_ATTRIBUTES = {
    "noatime": syscalls.MOUNT_ATTR_NOATIME,
    "relatime": syscalls.MOUNT_ATTR_RELATIME,
    "strictatime": syscalls.MOUNT_ATTR_STRICTATIME,
    "nodiratime": syscalls.MOUNT_ATTR_NODIRATIME,
}

DiskStats = loop.Stat


def disk_dir() -> str:
    """The directory of the disks' backing files (also how leak checks tell ours apart)."""
    return os.path.join(default_cache(), DIR_NAME)


def _backing_file(size: int, tag: str) -> int:
    """A sparse file of ``size`` bytes that has no name, as an fd. ``O_TMPFILE`` where the
    filesystem has it; else a named file unlinked at once (only a kill in between leaves it)."""
    directory = disk_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise BoxError(f"cannot make a disk's backing file in {directory}: {exc.strerror}") from None
        path = os.path.join(directory, f"disk-{tag}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise BoxError(f"cannot make a {size}-byte disk file in {directory}: {exc.strerror}") from None
    return fd


def _mkfs_command(spec: DiskSpec, device: str) -> list[str]:
    program = mkfs_program(spec.fs) or DISK_MKFS[spec.fs][0]
    if spec.fs == "ext4":
        # Inode tables and journal written now: lazily they would be written by a kernel
        # thread while the test runs, into its I/O counters and under its caps.
        command = [program, "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
        if spec.inodes is not None:
            command += ["-N", str(spec.inodes)]
        return [*command, device]
    return [program, "-q", "-f", device]


class Disk(DiskSource):
    """One disk: a filesystem of ``size`` bytes (``fs``) on a loop device (``device``),
    mounted at ``path`` in the box that uses it.

    ``box.disk(path)`` returns it. ``stats()`` counts the block device's I/O; ``readonly()``
    and ``writable()`` switch the mount (writes fail with EROFS in between).

    Faults (device-mapper needed: ``HostUnsupportedError`` naming it where the kernel has
    none): ``fail()`` makes every I/O fail with EIO, ``slow(ms)`` delays each, ``flaky(up_s,
    down_s)`` works for ``up_s`` seconds then fails every I/O for ``down_s``, over and over,
    ``heal()`` ends any of them; ``power_cut()`` loses what was not written to the disk yet
    and boots the box again on it. Each returns the disk.

    A box's disk keeps its contents across ``box.restart()``, and a new box given the same
    object (``Box(disks={"/data": old.disk("/data")})``, once the old box stopped) mounts
    the same filesystem. The backing file has no name; this object holds it open, so it goes
    when the object is garbage-collected or this process exits, whichever comes first. The
    loop device is held only while a box uses the disk: it goes with that box.
    """

    def __init__(self, spec: DiskSpec, path: str) -> None:
        self.spec = spec
        self.path = path
        self.id = secrets.token_hex(4)
        self._file_fd: int | None = None
        self._loop_fd: int | None = None
        self._number: int | None = None
        self._last_backing: tuple[int, str] | None = None  # the last loop device, to see it go
        self._formatted = False
        self._user: Callable[[], object] | None = None  # weakref to the box using it
        self._holder: Callable[[], object | None] | None = None  # the box that claimed it
        self._set_readonly: Callable[[bool], None] | None = None
        self._power_cut: Callable[[], None] | None = None
        self._dm_name: str | None = None  # the device-mapper device over the loop device, if any
        self._dm_fd: int | None = None
        self._dm_device: tuple[str, int, int] | None = None  # path, major, minor
        self._dm_missing: str | None = None  # why there is none
        self._dm_count = 0
        self._cut = False  # power_cut(): the table is `error` until the old mount is gone

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def fs(self) -> str:
        return self.spec.fs

    @property
    def device(self) -> str | None:
        """The block device the filesystem is on (``/dev/dm-2`` with device-mapper, else the
        loop device, ``/dev/loop3``), None while no box uses it."""
        if self._dm_device is not None:
            return self._dm_device[0]
        return self.loop_device

    @property
    def loop_device(self) -> str | None:
        """The loop device under it all (``/dev/loop3``), None while no box uses the disk."""
        return None if self._number is None else f"/dev/loop{self._number}"

    @property
    def device_numbers(self) -> str | None:
        """``MAJ:MIN`` of ``device`` (what cgroup I/O caps name)."""
        if self._dm_device is not None:
            return f"{self._dm_device[1]}:{self._dm_device[2]}"
        if self._number is None:
            return None
        major, minor = loop.device_numbers(self._number)
        return f"{major}:{minor}"

    @property
    def dm_name(self) -> str | None:
        """The device-mapper device's name (``nsbox-...``), None without one."""
        return self._dm_name

    def __repr__(self) -> str:
        return f"<Disk {self.path} {self.fs} {self.size} bytes on {self.device or 'no device'}>"

    # ------------------------------------------------------------------ for tests

    def stats(self) -> DiskStats:
        """Bytes and operations read and written on the block device since the box took it
        (``/sys/block/loopN/stat``). What sits in the page cache is not written yet: sync first."""
        number = self._require_device("stats()")
        return loop.stat(number)

    def readonly(self) -> None:
        """Make the mount read-only: writes fail with EROFS until ``writable()``."""
        self._require_device("readonly()")
        assert self._set_readonly is not None
        self._set_readonly(True)

    def writable(self) -> None:
        """Make the mount writable again (after ``readonly()``)."""
        self._require_device("writable()")
        assert self._set_readonly is not None
        self._set_readonly(False)

    def fail(self) -> Disk:
        """Every I/O from now on fails with EIO (device-mapper's ``error`` target), reads of
        what the page cache holds excepted, until ``heal()``."""
        self._swap("fail()", "error", "")
        return self

    def slow(self, ms: int) -> Disk:
        """Every I/O reaching the disk from now on waits ``ms`` milliseconds first (the
        ``delay`` target), until ``heal()``."""
        ms = disk_fault_number(ms, "slow(): ms", smallest=0, unit="milliseconds")
        self._swap("slow()", "delay", f"{self._loop_numbers()} 0 {ms}")
        return self

    def flaky(self, up_s: int, down_s: int) -> Disk:
        """From now on: the disk works for ``up_s`` seconds, then every I/O fails with EIO for
        ``down_s`` seconds, and again (the ``flakey`` target), until ``heal()``."""
        up_s = disk_fault_number(up_s, "flaky(): up_s", smallest=0, unit="seconds")
        down_s = disk_fault_number(down_s, "flaky(): down_s", smallest=1, unit="seconds")
        self._swap("flaky()", "flakey", f"{self._loop_numbers()} 0 {up_s} {down_s}")
        return self

    def heal(self) -> Disk:
        """End ``fail()``, ``slow()`` or ``flaky()``: the disk works again."""
        self._swap("heal()", "linear", f"{self._loop_numbers()} 0")
        return self

    def power_cut(self) -> Disk:
        """Cut the power of the box using the disk: every write not yet on the disk is lost
        (what sits in the page cache too: written but not ``fsync``ed), every process of the
        box dies, the filesystem is mounted again (its journal replayed) and the box boots
        again on it, as ``box.restart()`` does. Every disk of the box loses its unsynced
        writes alike. Returns the disk."""
        self._require_faults("power_cut()")
        assert self._power_cut is not None
        self._power_cut()
        return self

    # ------------------------------------------------------------------ faults

    def require_faults(self, what: str) -> None:
        """Raise unless faults can be made now: a box uses the disk, on device-mapper."""
        self._require_faults(what)

    def _require_faults(self, what: str) -> str:
        self._require_device(what)
        if self._dm_name is None:
            raise HostUnsupportedError(
                f"disk {self.path}: {what} needs device-mapper under the disk, and there is none: "
                f"{self._dm_missing or devmapper.unavailable() or 'it was not there when the box started'}"
            )
        return self._dm_name

    @property
    def _sectors(self) -> int:
        return self.spec.size // devmapper.SECTOR

    def _loop_numbers(self) -> str:
        number = self._require_device("a fault")
        major, minor = loop.device_numbers(number)
        return f"{major}:{minor}"

    def _swap(self, what: str, target: str, params: str) -> None:
        name = self._require_faults(what)
        devmapper.load(name, self._sectors, target, params)

    def cut(self) -> None:
        """The first half of a power cut (the box calls it, frozen): nothing more reaches the
        disk, until the box's old mount is gone (see ``_recover``)."""
        name = self._require_faults("power_cut()")
        devmapper.load(name, self._sectors, "error", "")
        self._cut = True

    def uncut(self) -> None:
        """Undo ``cut()`` when the power cut does not go ahead: the disk works again."""
        if self._cut and self._dm_name is not None:
            devmapper.load(self._dm_name, self._sectors, "linear", f"{self._loop_numbers()} 0")
            self._cut = False

    def _recover(self) -> None:
        """The second half: once the old mount is gone (its superblock torn down with
        nothing reaching the disk), drop what the device's cache holds, and heal; the next
        mount replays the journal."""
        assert self._dm_name is not None and self._dm_fd is not None
        deadline = time.monotonic() + CUT_TIMEOUT
        while devmapper.status(self._dm_name).open_count > 1:  # ours is the one left
            if time.monotonic() > deadline:
                raise BoxError(
                    f"disk {self.path}: the mount of the box whose power was cut still holds "
                    f"{self.device} after {CUT_TIMEOUT:.0f}s"
                )
            time.sleep(0.01)
        devmapper.flush_buffers(self._dm_fd)  # still `error`: nothing dirty gets out
        devmapper.load(self._dm_name, self._sectors, "linear", f"{self._loop_numbers()} 0")
        self._cut = False

    def _require_device(self, what: str) -> int:
        if self._number is None or self._set_readonly is None:
            raise BoxError(f"disk {self.path}: {what} needs a running box using the disk; none does now")
        return self._number

    # ------------------------------------------------------------------ for Box

    def in_use_by(self) -> object | None:
        """The box holding this disk (from its start until its stop lets go: a kept box holds
        it for good), if any."""
        return self._holder() if self._holder is not None else None

    def claim(self, box: object) -> object | None:
        """Hold the disk for ``box`` (from the start of the box); returns the other box that
        holds it instead, if one does (and then claims nothing). Atomic: two boxes started at
        once from two threads cannot both get it."""
        with _CLAIMS:
            holder = self.in_use_by()
            if holder is not None and holder is not box:
                return holder
            self._holder = weakref.ref(box)
            return None

    def attach(
        self,
        box: object,
        path: str,
        set_readonly: Callable[[bool], None],
        power_cut: Callable[[], None] | None = None,
    ) -> None:
        """Take a loop device (and a device-mapper device over it, where there is
        device-mapper) for ``box`` (kept if it holds them: a restart) and make the filesystem
        the first time."""
        self._user = weakref.ref(box)
        self.path = path
        self._set_readonly = set_readonly
        self._power_cut = power_cut
        if self._loop_fd is not None:
            if self._cut:
                self._recover()
            return
        self._wait_released(RELEASE_TIMEOUT)
        if self._file_fd is None:
            self._file_fd = _backing_file(self.spec.size, self.id)
            weakref.finalize(self, os.close, self._file_fd)
        self._number, self._loop_fd = loop.attach(self._file_fd, f"nsbox-disk-{self.id}")
        self._last_backing = (self._number, os.readlink(f"/proc/self/fd/{self._file_fd}"))
        try:
            self._map()
            if not self._formatted:
                self._mkfs()
                self._formatted = True
        except BaseException:
            self.release()
            raise

    def _map(self) -> None:
        """A ``linear`` device-mapper device over the loop device, held open here and marked
        to go when its last user does (this process, the box's mount); none without
        device-mapper (faults then raise, saying why)."""
        self._dm_missing = devmapper.unavailable()
        if self._dm_missing is not None:
            return
        self._dm_count += 1
        name = devmapper.device_name(f"{self.id}-{self._dm_count}")
        made = devmapper.create(name, self._sectors, "linear", f"{self._loop_numbers()} 0")
        self._dm_name = name
        try:
            path, self._dm_fd = devmapper.open_device(made.major, made.minor)
            self._dm_device = (path, made.major, made.minor)
        finally:
            devmapper.remove(name, wait=0.0)  # deferred while held open: gone with its last user

    def _mkfs(self) -> None:
        assert self.device is not None
        command = _mkfs_command(self.spec, self.device)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=MKFS_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BoxError(f"disk {self.path}: {' '.join(command)} failed: {exc}") from None
        if done.returncode != 0:
            raise BoxError(
                f"disk {self.path}: {' '.join(command)} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )

    def mount_fd(self) -> int:
        """A new mount of the filesystem, attached nowhere yet (nodev, nosuid), as an fd.
        Mounted again while the last mount lives (a restart), it is the same filesystem."""
        fs_fd = syscalls.fsopen(self.spec.fs)
        try:
            assert self.device is not None
            syscalls.fsconfig(fs_fd, syscalls.FSCONFIG_SET_STRING, "source", self.device)
            attributes = syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOSUID
            for option in filter(None, self.spec.options.split(",")):
                key, equals, value = option.partition("=")
                if key in _ATIME_ATTRIBUTES and not equals:
                    attributes |= _ATIME_ATTRIBUTES[key]  # a mount attribute, not an fs option
                elif equals:
                    syscalls.fsconfig(fs_fd, syscalls.FSCONFIG_SET_STRING, key, value)
                else:
                    syscalls.fsconfig(fs_fd, syscalls.FSCONFIG_SET_FLAG, key)
            syscalls.fsconfig(fs_fd, syscalls.FSCONFIG_CMD_CREATE)
            return syscalls.fsmount(fs_fd, attributes)
        except OSError as exc:
            raise BoxError(
                f"disk {self.path}: mounting {self.spec.fs} from {self.device} failed: {exc}"
            ) from None
        finally:
            os.close(fs_fd)

    def release(self) -> None:
        """Let go of the loop device (and the device-mapper device over it): they go once the
        box's mount of them has gone too. Another box may claim the disk from now on."""
        self._holder = None
        self._set_readonly = None
        self._power_cut = None
        self._cut = False
        if self._dm_fd is not None:
            os.close(self._dm_fd)
            self._dm_fd = None
        try:
            if self._dm_name is not None:
                name, self._dm_name, self._dm_device = self._dm_name, None, None
                devmapper.remove(name, wait=0.0)  # marked already: this only makes sure
        finally:
            # Whatever the device-mapper said: the loop device is let go of all the same.
            if self._loop_fd is not None:
                os.close(self._loop_fd)
                self._loop_fd = None
            self._number = None

    def released(self) -> bool:
        """Whether the last loop device this disk had is gone (or now holds another file)."""
        if self._last_backing is None:
            return True
        number, backing = self._last_backing
        return loop.backing_file(number) != backing

    def _wait_released(self, timeout: float) -> None:
        """Wait until the loop device a stopped box used is gone: the filesystem may be
        mounted only once at a time, and that mount may still be on its way out."""
        deadline = time.monotonic() + timeout
        while not self.released():
            if time.monotonic() > deadline:
                raise BoxError(
                    f"disk {self.path}: /dev/loop{self._last_backing[0] if self._last_backing else '?'} "
                    f"of the box that used it before is still in use after {timeout:.0f}s"
                )
            time.sleep(0.01)
        self._last_backing = None


__all__ = ["DIR_NAME", "Disk", "DiskStats", "disk_dir"]
