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

import errno
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import cgroups, channel, init
from .errors import BoxError

START_TIMEOUT = 30.0

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
        self._sequence = 0
        self._expected: int | None = None  # the request whose announcement is due
        self._announced: _Announced | None = None
        self._mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.owner_pid == os.getpid() and self.process.poll() is None

    def spawn_box(self, config: dict[str, Any], box_end: socket.socket) -> None:
        """Hand ``config`` to a waiting box; its init reports on ``box_end``'s peer (ready, or
        what failed).

        Why the host talks to the box itself: the zygote announces each waiting box as it
        makes it, with the box's control socket, and that message waits in our socket until
        a test wants a box. Sending the options straight to the box saves a wake-up of the
        zygote on the way (a few tenths of a millisecond); the zygote only hears afterwards,
        as it should make the next one.
        """
        hint = init.root_hint(config)
        with self._lock:
            try:
                warm = self._waiting_box(hint)
                config["t_handoff"] = time.monotonic()  # the box reports its phases to us
                try:
                    channel.send(warm.control, {"config": config}, [box_end.fileno()])
                finally:
                    warm.control.close()
                self._ask({"op": "taken", "pid": warm.pid})
            except OSError as exc:
                raise BoxError(f"the nsbox zygote (pid {self.pid}) is gone: {self.log() or exc}") from exc

    def _waiting_box(self, hint: dict[str, Any]) -> _Announced:
        """The announced box if it was made for ``hint`` and the host's mounts have not
        changed since; otherwise one made to measure (asked for, and waited for)."""
        warm = self._take_announcement(block=self._expected is not None and self._announced is None)
        if warm is not None and warm.hint == hint and not self._mounts_changed():
            return warm
        if warm is not None:
            warm.control.close()  # EOF: it exits unused
        self._ask({"op": "want", "hint": hint}, background=False)
        warm = self._take_announcement(block=True)
        assert warm is not None
        return warm

    def _ask(self, message: dict[str, Any], background: bool = True) -> None:
        """Send a request that makes the zygote clone a box, and expect its announcement."""
        self._sequence += 1
        channel.send(self._sock, {**message, "seq": self._sequence})
        self._expected = self._sequence
        # The mounts that box sees are those of this moment or later (it is cloned after the
        # zygote reads this): from here on, a change means it may be stale.
        self._note_mounts()

    def _take_announcement(self, block: bool) -> _Announced | None:
        """The latest announcement of a waiting box, if it answers our latest request; older
        ones (a box made before we asked for another) are closed unused."""
        while True:
            if self._announced is not None and self._announced.seq == self._expected:
                warm, self._announced = self._announced, None
                self._expected = None
                return warm
            if not block and not select.select([self._sock], [], [], 0)[0]:
                return None
            if block and not select.select([self._sock], [], [], START_TIMEOUT)[0]:
                raise BoxError(f"the nsbox zygote (pid {self.pid}) made no box within {START_TIMEOUT}s")
            message, fds = channel.recv(self._sock)
            if message is None:
                raise OSError(errno.EPIPE, "the zygote closed its socket")
            if message.get("seq") != self._expected or "error" in message or len(fds) != 1:
                for fd in fds:
                    os.close(fd)  # a box made before our latest request is not ours: it exits
                if message.get("seq") == self._expected:
                    self._expected = None
                    error = message.get("error", {}).get("message", "no box in its answer")
                    raise BoxError(f"the nsbox zygote (pid {self.pid}) could not make a box: {error}")
                continue
            if self._announced is not None:
                self._announced.control.close()
            self._announced = _Announced(message, socket.socket(fileno=fds[0]))

    def _note_mounts(self) -> None:
        os.lseek(self._mountinfo, 0, os.SEEK_SET)
        while os.read(self._mountinfo, 65536):
            pass

    def _mounts_changed(self) -> bool:
        """Whether the host's mount table changed since the waiting box was asked for (a
        poll, no read): its copy of the host's mounts would be stale (say, an image directory
        on a filesystem mounted since)."""
        poller = select.poll()
        poller.register(self._mountinfo, select.POLLPRI)
        return bool(poller.poll(0))

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
        os.close(self._mountinfo)
        if self._announced is not None:
            self._announced.control.close()


class _Announced:
    """A waiting box as the zygote announced it: its pid, what its root was built for, the
    socket its options go to, and the request it answers."""

    def __init__(self, message: dict[str, Any], control: socket.socket) -> None:
        self.pid = int(message["warm"])
        self.hint = dict(message["hint"])
        self.seq = int(message["seq"])
        self.control = control


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
