"""Device-mapper: a block device whose table says where each sector's I/O goes, by ioctls on
``/dev/mapper/control`` (``include/uapi/linux/dm-ioctl.h``; no ``dmsetup`` needed).

Why: a disk's filesystem sits on a ``linear`` device over its loop device, so a fault is a
table swap under a mounted filesystem: ``error`` (every I/O fails with EIO), ``delay``,
``flakey`` (up for a while, then failing), and back to ``linear``.

Why the names carry the owner: a device-mapper device outlives whoever made it (there is no
autoclear as for loop devices). Each of ours is named ``nsbox-<pid>-<start>-<tag>``, its
owner's pid and start time, and marked for deferred removal as soon as it works: the kernel
removes it when its last user goes (the descriptor its owner holds, and the filesystem
mounted from it, which goes with the box). ``reclaim()`` (``nsbox gc``) finds any left by a
dead owner and removes them the same way.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass

from .errors import BoxError, HostUnsupportedError, NsboxError
from .state import Owner

CONTROL = "/dev/mapper/control"
MODULE_DIR = "/sys/module/dm_mod"  # there once dm-mod is loaded (or built in)
PREFIX = "nsbox-"
MISSING_HINT = "CONFIG_BLK_DEV_DM; modprobe dm-mod dm-flakey dm-delay"
MODULES = {"flakey": "dm-flakey", "delay": "dm-delay"}  # the targets not built into dm-mod
SECTOR = 512
REMOVE_TIMEOUT = 5.0

# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev, name[128], uuid[129], data[7] (312 bytes).
_HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16]; params follow.
_TARGET = struct.Struct("=QQiI16s")
# struct dm_name_list: dev, next, name[] (then, since 4.37, event_nr and flags).
_NAME_LIST = struct.Struct("=QI")
_VERSION = (4, 0, 0)
_DM_IOCTL = 0xFD
_VERSION_CMD, _LIST_DEVICES, _DEV_CREATE, _DEV_REMOVE = 0, 2, 3, 4
_DEV_SUSPEND, _DEV_STATUS, _TABLE_LOAD, _LIST_VERSIONS = 6, 7, 9, 13
SUSPEND_FLAG = 1 << 1
SKIP_LOCKFS_FLAG = 1 << 10
BUFFER_FULL_FLAG = 1 << 8
DEFERRED_REMOVE = 1 << 17
BLKFLSBUF = 0x1261
_BUFFER = 16384


def _request(command: int) -> int:
    """``_IOWR(DM_IOCTL, command, struct dm_ioctl)``."""
    return (3 << 30) | (_HEADER.size << 16) | (_DM_IOCTL << 8) | command


@dataclass(frozen=True)
class Status:
    """What the kernel says of one device."""

    name: str
    major: int
    minor: int
    open_count: int
    suspended: bool


def unavailable() -> str | None:
    """Why device-mapper cannot be used here (None when it can): what is missing, and how to
    get it. Cheap: one ``open`` and one ioctl."""
    try:
        fd = _open_control()
    except NsboxError as exc:
        return str(exc)
    os.close(fd)
    return None


def _open_control() -> int:
    try:
        return os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        if not os.path.exists(MODULE_DIR):
            raise HostUnsupportedError(
                f"the kernel has no device-mapper (no {CONTROL}, no dm_mod module loaded): "
                f"disk faults need it ({MISSING_HINT})"
            ) from None
        raise BoxError(f"device-mapper is loaded but {CONTROL} is missing (mount devtmpfs on /dev)") from None
    except OSError as exc:
        raise BoxError(f"cannot open {CONTROL}: {exc.strerror} (disk faults need root)") from None


def _call(command: int, name: str = "", flags: int = 0, payload: bytes = b"", target_count: int = 0) -> bytes:
    """One ioctl; returns the whole buffer the kernel filled (header and data)."""
    size = max(_BUFFER, _HEADER.size + len(payload))
    header = _HEADER.pack(
        *_VERSION, size, _HEADER.size, target_count, 0, flags, 0, 0, 0, name.encode(), b"", b""
    )
    buffer = ctypes.create_string_buffer(header + payload, size)
    control = _open_control()
    try:
        fcntl.ioctl(control, _request(command), buffer, True)
    finally:
        os.close(control)
    return buffer.raw


def _header(raw: bytes) -> tuple[int, int, int, int, int]:
    """``(data_size, data_start, open_count, flags, dev)`` of a reply."""
    fields = _HEADER.unpack_from(raw)
    return fields[3], fields[4], fields[6], fields[7], fields[10]


def _decode_dev(dev: int) -> tuple[int, int]:
    """The kernel's ``huge_encode_dev``: minor's low byte, major, then minor's high bits."""
    return (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def device_name(tag: str, owner: Owner | None = None) -> str:
    """Our name for a device: the owner's pid and start time, then ``tag``."""
    owner = owner or Owner.current()
    return f"{PREFIX}{owner.pid}-{owner.start}-{tag}"


def owner_of(name: str) -> Owner | None:
    """The owner written in one of our names (None for a name that is not ours)."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split("-")
    if len(parts) < 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return Owner(int(parts[0]), int(parts[1]))


def create(name: str, sectors: int, target: str, params: str) -> Status:
    """Make device ``name`` with one target over ``sectors`` sectors, activate it, and mark
    it for deferred removal (see the module's docstring)."""
    try:
        _call(_DEV_CREATE, name)
    except OSError as exc:
        raise BoxError(f"creating device-mapper device {name} failed: {exc.strerror}") from None
    try:
        load(name, sectors, target, params, swap=False)
        _call(_DEV_SUSPEND, name)  # without SUSPEND_FLAG: resume, i.e. make the loaded table live
        return status(name)
    except BaseException:
        remove(name, wait=0.0)
        raise


def load(name: str, sectors: int, target: str, params: str, swap: bool = True) -> None:
    """Load a one-target table; with ``swap``, make it live at once: suspend (not flushing
    the filesystem: what it has not written yet meets the new table), load, resume."""
    spec = _TARGET.pack(0, sectors, 0, 0, target.encode())
    payload = spec + params.encode() + b"\0"
    payload += b"\0" * (-len(payload) % 8)
    if swap:
        _checked(_DEV_SUSPEND, name, f"suspending {name}", flags=SUSPEND_FLAG | SKIP_LOCKFS_FLAG)
    try:
        try:
            _call(_TABLE_LOAD, name, payload=payload, target_count=1)
        except OSError as exc:
            raise BoxError(_load_failure(name, target, params, exc)) from None
    finally:
        if swap:
            _checked(_DEV_SUSPEND, name, f"resuming {name}")


def _checked(command: int, name: str, what: str, flags: int = 0) -> bytes:
    try:
        return _call(command, name, flags)
    except OSError as exc:
        raise BoxError(f"device-mapper: {what} failed: {exc.strerror}") from None


def _load_failure(name: str, target: str, params: str, exc: OSError) -> str:
    message = f"device-mapper: loading table {target!r} ({params}) into {name} failed: {exc.strerror}"
    if exc.errno == errno.EINVAL and target not in targets():
        module = MODULES.get(target, f"dm-{target}")
        message += f"; the kernel has no {target!r} target (modprobe {module}; CONFIG_DM_{target.upper()})"
    return message


def status(name: str) -> Status:
    raw = _checked(_DEV_STATUS, name, f"status of {name}")
    _size, _start, open_count, flags, dev = _header(raw)
    major, minor = _decode_dev(dev)
    return Status(name, major, minor, open_count, bool(flags & SUSPEND_FLAG))


def remove(name: str, wait: float = REMOVE_TIMEOUT) -> bool:
    """Remove ``name`` now if nothing uses it, else when its last user goes (deferred).
    Waits up to ``wait`` seconds for it to be gone; True if it is (or was never there)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            _call(_DEV_REMOVE, name, DEFERRED_REMOVE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return True  # gone
            if exc.errno != errno.EBUSY:
                raise BoxError(f"removing device-mapper device {name} failed: {exc.strerror}") from None
        if not _exists(name):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _exists(name: str) -> bool:
    """Whether device ``name`` is there (asked by name: no list of every device to read)."""
    try:
        _call(_DEV_STATUS, name)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise BoxError(f"the status of device-mapper device {name} cannot be read: {exc.strerror}") from None
    return True


def names() -> list[str]:
    """Every device-mapper device of the host (empty without device-mapper)."""
    try:
        raw = _call(_LIST_DEVICES)
    except (OSError, NsboxError):
        return []
    data_size, data_start, _open, flags, _dev = _header(raw)
    if flags & BUFFER_FULL_FLAG:
        raise BoxError("device-mapper: more devices than a list request holds")
    found: list[str] = []
    offset = data_start
    while offset + _NAME_LIST.size <= data_size:
        dev, following = _NAME_LIST.unpack_from(raw, offset)
        if dev == 0:
            break  # no devices at all
        start = offset + _NAME_LIST.size
        found.append(raw[start : raw.index(b"\0", start)].decode(errors="replace"))
        if not following:
            break
        offset += following
    return found


def ours() -> list[str]:
    """The devices named by this project (leak checks)."""
    return [name for name in names() if name.startswith(PREFIX)]


def targets() -> list[str]:
    """The target types the kernel has now (``linear``, ``error``, ``flakey``...)."""
    try:
        raw = _call(_LIST_VERSIONS)
    except (OSError, NsboxError):
        return []
    data_size, data_start, *_ = _header(raw)
    found: list[str] = []
    offset = data_start
    while offset + 16 <= data_size:
        # struct dm_target_versions: next, version[3], name[]
        following = struct.unpack_from("=I", raw, offset)[0]
        start = offset + 16
        found.append(raw[start : raw.index(b"\0", start)].decode(errors="replace"))
        if not following:
            break
        offset += following
    return found


def open_device(major: int, minor: int, timeout: float = 5.0) -> tuple[str, int]:
    """``/dev/dm-MINOR`` (made by devtmpfs a moment after the device; made here if it does
    not come) and a descriptor holding it open."""
    path = f"/dev/dm-{minor}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                os.mknod(path, 0o660 | stat.S_IFBLK, os.makedev(major, minor))
            time.sleep(0.01)
            continue
        found = os.fstat(fd).st_rdev
        if (os.major(found), os.minor(found)) != (major, minor):
            os.close(fd)
            raise BoxError(f"{path} is device {os.major(found)}:{os.minor(found)}, not {major}:{minor}")
        return path, fd


def flush_buffers(fd: int) -> None:
    """BLKFLSBUF: write out and drop the block device's own page cache (what a filesystem
    once mounted from it left there)."""
    fcntl.ioctl(fd, BLKFLSBUF, 0)


def reclaim(dry_run: bool = False) -> list[str]:
    """Our devices whose owner is dead: removed now, or when their last user goes (a kept
    box's mount). One line each."""
    removed = []
    for name in ours():
        owner = owner_of(name)
        if owner is None or owner.alive():
            continue
        if dry_run or remove(name, wait=0.0):
            removed.append(f"device-mapper device {name} (its owner, pid {owner.pid}, is gone)")
        else:
            removed.append(f"device-mapper device {name} (its owner is gone; removed when its box goes)")
    return removed


__all__ = [
    "CONTROL",
    "MISSING_HINT",
    "PREFIX",
    "Status",
    "create",
    "device_name",
    "flush_buffers",
    "load",
    "names",
    "open_device",
    "ours",
    "owner_of",
    "reclaim",
    "remove",
    "status",
    "targets",
    "unavailable",
]
