"""The zygote: a small single-threaded helper that forks every box.

Why it exists: pytest-xdist workers are threaded (execnet), and ``fork()`` in a threaded
process can deadlock on a lock some other thread held. So the pytest process never forks a
box itself; once per process it *execs* this helper (``subprocess`` is fork-safe), and the
helper, which never starts a thread, does all the forking. This module is pytest's handle on
it; the helper's own loop is ``zygote_process``.

Process tree, each level dying with the one above it::

    pytest ──(socket EOF / PDEATHSIG)── nsbox-zygote ──(PDEATHSIG)── nsbox-init (PID 1 of
        a box, one per box) ──(kernel: PID 1 died)── every other process of that box
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from . import cgroups, channel
from .errors import BoxError

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
# The helper needs only the standard library and this package's low-level modules. Why not
# `python -m pytest_nsbox.zygote_process`: that runs the package's __init__ (psutil, the whole
# public API) and `site`, and every byte of heap they add is copied into each box's page tables
# at fork. -S skips site; the stub package below skips __init__ (see zygote_process).
_BOOTSTRAP = """
import sys
package = type(sys)("pytest_nsbox")
package.__path__ = [sys.argv[1]]
sys.modules["pytest_nsbox"] = package
from pytest_nsbox.zygote_process import main
main(sys.argv[1:])
"""


class Zygote:
    """Host-side handle of the helper process of this pytest (or plain Python) process."""

    def __init__(self) -> None:
        ours, theirs = channel.socketpair()
        # Why a memfd for stderr: the helper outlives the test that started it, so it must not
        # write into pytest's capture files; if it crashes, its traceback is read from here.
        self._log = os.memfd_create("nsbox-zygote-log", os.MFD_CLOEXEC)
        # PDEATHSIG fires when the parent *thread* exits; only the main thread lives as long as
        # the process. From other threads we rely on the socket's EOF alone.
        pdeathsig = "1" if threading.current_thread() is threading.main_thread() else "0"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-S",
                "-c",
                _BOOTSTRAP,
                _PACKAGE_DIR,
                str(theirs.fileno()),
                str(os.getpid()),
                pdeathsig,
                json.dumps(cgroups.helper_plan()),
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,  # Ctrl-C goes to pytest, which tears boxes down in order
        )
        theirs.close()
        self._sock = ours
        self._lock = threading.Lock()
        self.owner_pid = os.getpid()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.owner_pid == os.getpid() and self.process.poll() is None

    def spawn_box(self, config: dict[str, Any], box_end: socket.socket) -> None:
        """Ask for a box; its init reports on ``box_end``'s peer (ready, or what failed)."""
        with self._lock:
            try:
                channel.send(self._sock, {"op": "box", "config": config}, [box_end.fileno()])
            except OSError as exc:
                raise BoxError(f"the nsbox zygote (pid {self.pid}) is gone: {self.log() or exc}") from exc

    def forget(self, pid: int) -> None:
        """Leave the box of init ``pid`` alone from now on (it is being kept)."""
        with self._lock:
            try:
                channel.send(self._sock, {"op": "forget", "pid": pid})
            except OSError as exc:
                raise BoxError(f"the nsbox zygote (pid {self.pid}) is gone: {self.log() or exc}") from exc

    def log(self) -> str:
        size = os.fstat(self._log).st_size
        return os.pread(self._log, size, 0).decode("utf-8", "replace").strip()[-4000:]

    def close(self) -> None:
        """Stop the helper; any box still running dies with it (PDEATHSIG)."""
        self._sock.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._log)


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def get() -> Zygote:
    """The zygote of this process, started on first use (and again if it died or we forked)."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            if _zygote is not None and _zygote.owner_pid == os.getpid():
                _zygote.close()
            _zygote = Zygote()
        return _zygote


def current() -> Zygote | None:
    """The running zygote, if this process has one (for leak checks and diagnostics)."""
    return _zygote if _zygote is not None and _zygote.alive() else None


def shutdown() -> None:
    """Stop this process's zygote if it has one (pytest_unconfigure, atexit)."""
    global _zygote
    with _zygote_lock:
        if _zygote is not None and _zygote.owner_pid == os.getpid():
            _zygote.close()
        _zygote = None
