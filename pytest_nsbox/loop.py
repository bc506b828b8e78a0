"""Loop devices: a file on the host seen as a block device, by ioctls on ``/dev/loop*``.

Why autoclear: a loop device outlives whoever made it unless told otherwise, and a pytest
killed with SIGKILL cleans nothing up. With ``LO_FLAGS_AUTOCLEAR`` the kernel detaches the
device itself when its last user closes it: the descriptor this process holds, and the
filesystem mounted from it (which goes with the box's mount namespace).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass

from .errors import BoxError, permission_hint

LOOP_CONTROL = "/dev/loop-control"
# linux/loop.h
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_SET_FD = 0x4C00
_LOOP_CLR_FD = 0x4C01
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
_LO_NAME_SIZE = 64
# struct loop_info64: five u64, four u32, file name, crypt name, key (32), two u64.
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: fd, block_size, loop_info64, eight reserved u64.
_CONFIG_TAIL = bytes(8 * 8)
_ATTEMPTS = 20  # another process may take the free device between GET_FREE and CONFIGURE


@dataclass(frozen=True)
class Stat:
    """A block device's I/O counters since it was made (``/sys/block/NAME/stat``)."""

    read_ops: int = 0
    read_bytes: int = 0
    write_ops: int = 0
    write_bytes: int = 0


def _info(name: str, flags: int) -> bytes:
    return _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, name.encode()[: _LO_NAME_SIZE - 1], b"", b"", 0, 0)


def attach(file_fd: int, name: str) -> tuple[int, int]:
    """A free loop device backed by ``file_fd``, set to clear itself when its last user goes.

    Returns ``(number, fd)``: ``/dev/loopNUMBER``, held open by ``fd`` (close it to let the
    device go once nothing else uses it). ``name`` is recorded as the device's file name.
    """
    try:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        denied = exc.errno in (errno.EACCES, errno.EPERM)
        hint = permission_hint("using loop devices") if denied else "modprobe loop"
        raise BoxError(
            f"disks need loop devices, and {LOOP_CONTROL} cannot be opened: {exc.strerror} ({hint})"
        ) from None
    try:
        for _ in range(_ATTEMPTS):
            number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
            device = _open_device(number)
            try:
                _configure(device, file_fd, name)
            except OSError as exc:
                os.close(device)
                if exc.errno == errno.EBUSY:
                    time.sleep(0.01)
                    continue  # taken by someone else meanwhile: ask for another
                raise BoxError(f"attaching /dev/loop{number} failed: {exc.strerror}") from None
            return number, device
    finally:
        os.close(control)
    raise BoxError(f"no free loop device after {_ATTEMPTS} attempts (another process took each one)")


def _open_device(number: int) -> int:
    path = f"/dev/loop{number}"
    deadline = time.monotonic() + 5
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            # A device just made may reach /dev a moment later (devtmpfs); make the node if not.
            if time.monotonic() > deadline:
                os.mknod(path, 0o660 | 0o060000, os.makedev(7, number))
            time.sleep(0.01)


def _configure(device: int, file_fd: int, name: str) -> None:
    """LOOP_CONFIGURE (5.8+) sets file and flags in one call; before it, SET_FD then SET_STATUS64."""
    config = struct.pack("=II", file_fd, 0) + _info(name, LO_FLAGS_AUTOCLEAR) + _CONFIG_TAIL
    try:
        fcntl.ioctl(device, _LOOP_CONFIGURE, config)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    fcntl.ioctl(device, _LOOP_SET_FD, file_fd)
    try:
        fcntl.ioctl(device, _LOOP_SET_STATUS64, _info(name, LO_FLAGS_AUTOCLEAR))
    except OSError:
        fcntl.ioctl(device, _LOOP_CLR_FD, 0)
        raise


def backing_file(number: int) -> str | None:
    """The file behind ``/dev/loopNUMBER`` (``" (deleted)"`` at the end once unlinked), or
    None when the device is detached."""
    try:
        with open(f"/sys/block/loop{number}/loop/backing_file") as handle:
            return handle.read().rstrip("\n")
    except OSError:
        return None


def attached() -> dict[int, str]:
    """Every attached loop device of the host and its backing file (for leak checks)."""
    found: dict[int, str] = {}
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return found
    for name in names:
        if name.startswith("loop") and name[4:].isdigit():
            backing = backing_file(int(name[4:]))
            if backing is not None:
                found[int(name[4:])] = backing
    return found


def stat(number: int) -> Stat:
    """The I/O counters of ``/dev/loopNUMBER`` (sectors are 512 bytes in this file, always)."""
    try:
        with open(f"/sys/block/loop{number}/stat") as handle:
            fields = [int(field) for field in handle.read().split()]
    except (OSError, ValueError):
        return Stat()
    return Stat(
        read_ops=fields[0], read_bytes=fields[2] * 512, write_ops=fields[4], write_bytes=fields[6] * 512
    )


def device_numbers(number: int) -> tuple[int, int]:
    """``(major, minor)`` of ``/dev/loopNUMBER`` as the kernel numbers it (for cgroup caps)."""
    try:
        with open(f"/sys/block/loop{number}/dev") as handle:
            major, minor = handle.read().strip().split(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return 7, number


__all__ = ["LOOP_CONTROL", "Stat", "attach", "attached", "backing_file", "device_numbers", "stat"]
