"""Helpers for tests that kill a box's owner and must tidy what only it would have removed."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def eventually(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Whether ``condition()`` holds within ``timeout`` seconds (what the kernel finishes a
    moment later: a loop device clearing itself, a device-mapper device going)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def rmdir_when_empty(directory: str, timeout: float = 10.0) -> None:
    """Remove a cgroup directory once its last process is gone (a SIGKILLed owner cannot)."""
    deadline = time.monotonic() + timeout
    while os.path.isdir(directory) and time.monotonic() < deadline:
        try:
            os.rmdir(directory)
        except OSError:
            time.sleep(0.05)


def box_mounts() -> list[str]:
    """Mount table lines of this namespace that a box could leak: overlays and the boxes'
    scratch tmpfs (source ``nsbox``). Other mounts may mention "nsbox" harmlessly (the test
    guest's cgroup is called pytest-nsbox.service)."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fstype, source = [*line.split(" - ", 1)[1].split(), "", ""][:2]
            if fstype == "overlay" or source == "nsbox":
                found.append(line.strip())
    return found


def box_loop_devices() -> dict[int, str]:
    """Loop devices of our disks still attached (``disks=``): their backing files live, without
    a name, in the ``nsbox-disks`` directory of a layer cache."""
    from pytest_nsbox import disks, loop

    return {number: path for number, path in loop.attached().items() if f"/{disks.DIR_NAME}/" in path}


def box_dm_devices() -> list[str]:
    """Device-mapper devices of our disks still there (named ``nsbox-...``)."""
    from pytest_nsbox import devmapper

    return devmapper.ours()
