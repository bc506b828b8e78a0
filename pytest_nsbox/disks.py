"""Disks: a real filesystem on a loop device, mounted in a box (``disks={"/data": "64M"}``).

Why a loop device and not a tmpfs: a storage engine under test must meet a real block
device's behaviour, the full disk and the inode shortage at a real filesystem's limits,
``fsync`` that reaches a device, and a journal replayed after a crash.

The layers, from the bottom: a sparse file on the host that has no name (``O_TMPFILE``: a
killed pytest leaves no file behind), the loop device over it (it clears itself when its
last user goes: see ``loop``), the filesystem made on it, and the mount the box's init
moves onto the path (made here with ``fsopen``/``fsmount``, passed over the box's socket,
so the mount lives in the box's mount namespace only and goes with it). A later layer may
sit between the loop device and the filesystem (``device`` is what the filesystem is on).
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import time
import weakref
from collections.abc import Callable

from . import loop, syscalls
from .errors import BoxError
from .layers import default_cache
from .spec import DISK_MKFS, DiskSource, DiskSpec, mkfs_program

DIR_NAME = "nsbox-disks"  # under the layer cache: where the backing files (without names) live
RELEASE_TIMEOUT = 10.0
MKFS_TIMEOUT = 120.0

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
        self._set_readonly: Callable[[bool], None] | None = None

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def fs(self) -> str:
        return self.spec.fs

    @property
    def device(self) -> str | None:
        """The block device the filesystem is on (``/dev/loop3``), None while no box uses it."""
        return None if self._number is None else f"/dev/loop{self._number}"

    @property
    def device_numbers(self) -> str | None:
        """``MAJ:MIN`` of ``device`` (what cgroup I/O caps name)."""
        if self._number is None:
            return None
        major, minor = loop.device_numbers(self._number)
        return f"{major}:{minor}"

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

    def _require_device(self, what: str) -> int:
        if self._number is None or self._set_readonly is None:
            raise BoxError(f"disk {self.path}: {what} needs a running box using the disk; none does now")
        return self._number

    # ------------------------------------------------------------------ for Box

    def in_use_by(self) -> object | None:
        """The running box using this disk, if any."""
        box = self._user() if self._user is not None else None
        return box if box is not None and getattr(box, "running", False) else None

    def attach(self, box: object, path: str, set_readonly: Callable[[bool], None]) -> None:
        """Take a loop device for ``box`` (kept if it holds one: a restart) and make the
        filesystem the first time."""
        self._user = weakref.ref(box)
        self.path = path
        self._set_readonly = set_readonly
        if self._loop_fd is not None:
            return
        self._wait_released(RELEASE_TIMEOUT)
        if self._file_fd is None:
            self._file_fd = _backing_file(self.spec.size, self.id)
            weakref.finalize(self, os.close, self._file_fd)
        self._number, self._loop_fd = loop.attach(self._file_fd, f"nsbox-disk-{self.id}")
        self._last_backing = (self._number, os.readlink(f"/proc/self/fd/{self._file_fd}"))
        if not self._formatted:
            try:
                self._mkfs()
            except BaseException:
                self.release()
                raise
            self._formatted = True

    def _mkfs(self) -> None:
        command = _mkfs_command(self.spec, f"/dev/loop{self._number}")
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
            syscalls.fsconfig(fs_fd, syscalls.FSCONFIG_SET_STRING, "source", f"/dev/loop{self._number}")
            for option in filter(None, self.spec.options.split(",")):
                key, equals, value = option.partition("=")
                if equals:
                    syscalls.fsconfig(fs_fd, syscalls.FSCONFIG_SET_STRING, key, value)
                else:
                    syscalls.fsconfig(fs_fd, syscalls.FSCONFIG_SET_FLAG, key)
            syscalls.fsconfig(fs_fd, syscalls.FSCONFIG_CMD_CREATE)
            return syscalls.fsmount(fs_fd, syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOSUID)
        except OSError as exc:
            raise BoxError(
                f"disk {self.path}: mounting {self.spec.fs} from {self.device} failed: {exc}"
            ) from None
        finally:
            os.close(fs_fd)

    def release(self) -> None:
        """Let go of the loop device: it goes once the box's mount of it has gone too."""
        self._set_readonly = None
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
