"""Helpers for tests that kill a box's owner and must tidy what only it would have removed."""

from __future__ import annotations

import os
import time


def rmdir_when_empty(directory: str, timeout: float = 10.0) -> None:
    """Remove a cgroup directory once its last process is gone (a SIGKILLed owner cannot)."""
    deadline = time.monotonic() + timeout
    while os.path.isdir(directory) and time.monotonic() < deadline:
        try:
            os.rmdir(directory)
        except OSError:
            time.sleep(0.05)
