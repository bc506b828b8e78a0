"""The zygote: a small single-threaded helper that forks every box.

Why it exists: pytest-xdist workers are threaded (execnet), and ``fork()`` in a threaded
process can deadlock on a lock some other thread held. So the pytest process never forks a
box itself; once per process it *execs* this helper (``subprocess`` is fork-safe), and the
helper, which never starts a thread, does all the forking.

Process tree, each level dying with the one above it::

    pytest ──(socket EOF / PDEATHSIG)── nsbox-zygote ──(PDEATHSIG)── nsbox-init (PID 1 of
        a box, one per box) ──(kernel: PID 1 died)── every other process of that box
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import cgroups, channel, init, syscalls
from .errors import BoxError, NsboxError
from .syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
)

# No CLONE_NEWCGROUP here: the box joins its own cgroup when it is handed out, and only then
# makes its cgroup namespace, so that inside it /proc/self/cgroup shows "/".
BOX_NAMESPACES = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
# The helper needs only the standard library and this package's low-level modules. Why not
# `python -m pytest_nsbox.zygote`: that runs the package's __init__ (psutil, the whole public
# API) and `site`, and every byte of heap they add is copied into each box's page tables at
# fork. -S skips site; the stub package below skips __init__.
_BOOTSTRAP = """
import sys, types
package = types.ModuleType("pytest_nsbox")
package.__path__ = [sys.argv[1]]
sys.modules["pytest_nsbox"] = package
from pytest_nsbox.zygote import main
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


# ---------------------------------------------------------------- the helper process itself


def main(argv: list[str]) -> None:
    """Entry point of the helper: ``python -m pytest_nsbox.zygote FD PARENT_PID PDEATHSIG``."""
    fd, parent, pdeathsig = int(argv[1]), int(argv[2]), argv[3] == "1"
    syscalls.set_process_name("nsbox-zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Why SIGTERM, not SIGKILL: when pytest dies, the zygote still kills and reaps its boxes and
    # removes their cgroups, which nobody else would.
    signal.signal(signal.SIGTERM, _terminate)
    if pdeathsig:
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above: nobody to serve
            os._exit(0)
    _serve(socket.socket(fileno=fd))


def _terminate(_sig: int, _frame: object) -> None:
    raise SystemExit(0)  # unwinds the serve loop into its cleanup


def _serve(sock: socket.socket) -> None:
    def handle(message: dict[str, Any], fds: list[int]) -> None:
        if message.get("op") == "box" and len(fds) == 1:
            with _sigterm_held():
                _hand_out(message["config"], fds[0], sock)
        elif message.get("op") == "forget":
            with _sigterm_held():
                _forget(int(message["pid"]))

    def reap() -> None:
        with _sigterm_held():
            _reap()

    try:
        channel.serve(sock, handle, reap)  # until EOF: pytest is gone, or done with us
    finally:
        _shutdown()  # also after SIGTERM (pytest died) or a crash: boxes and cgroups go


@contextlib.contextmanager
def _sigterm_held() -> Iterator[None]:
    """Defer SIGTERM until the bookkeeping is consistent again.

    Why: a SIGTERM that lands between making a cgroup and recording it (or between forgetting
    a reaped box's cgroup and removing it) would leave that cgroup to nobody.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


_boxes: set[int] = set()  # pids of the box inits this zygote forked and has not reaped


def _reap() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _boxes.discard(pid)
        _remove_box_cgroup(pid)


def _remove_box_cgroup(pid: int) -> None:
    """Once a box's init is reaped its cgroup is empty (the kernel killed the rest first):
    remove it, under whichever name it has. The host tries too; the first one wins. This
    covers the boxes that never started, and every box of a host that died."""
    cgroup = _unclaimed_cgroups.pop(pid, []) + _handed_out_cgroups.pop(pid, [])
    backend = cgroups.driver()
    if cgroup and backend is not None:
        backend.remove_named(cgroup[0].name)  # every hierarchy, those joined late included


def _forget(pid: int) -> None:
    """A kept box (``--nsbox-keep``) is on its own now: neither killed, reaped nor its cgroup
    removed by us; ``nsbox gc`` ends it."""
    _boxes.discard(pid)
    _handed_out_cgroups.pop(pid, None)


def _shutdown() -> None:
    """Kill every box still running and reap them all before exiting.

    Why not just exit: PDEATHSIG would kill them, but their zombies (and those of boxes the
    host just stopped) would be left to the host's init, which may take its time reaping.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # a second one must not cut this short
    _discard_warm()  # EOF on its control socket: it exits even if it were missing from _boxes
    for pid in _boxes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Only our boxes: a kept one is a child too, and lives on (adopted by the host's init).
    for pid in list(_boxes) + list(_unclaimed_cgroups):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        _remove_box_cgroup(pid)
    os._exit(0)


class _Warm:
    """The next box, already cloned into its namespaces and cgroup, waiting for its options."""

    def __init__(self, pid: int, control: socket.socket, cgroup: list[Path]) -> None:
        self.pid = pid
        self.control = control
        self.cgroup = cgroup


# Box cgroups by init pid, removed when the init is reaped: unclaimed ones (never handed out)
# and handed-out ones (under their first name and the box's, which the host renames to).
_unclaimed_cgroups: dict[int, list[Path]] = {}
_handed_out_cgroups: dict[int, list[Path]] = {}


_warm: _Warm | None = None
_warm_failure: OSError | None = None
_mountinfo_fd = -1  # our /proc/self/mountinfo: poll() flags any change of the host's mounts


def _hand_out(config: dict[str, Any], box_fd: int, zygote_sock: socket.socket) -> None:
    """Give the waiting box its options and the host's socket; then clone the next one."""
    global _warm
    if _warm is not None and _host_mounts_changed():
        # Its copy of the host's mounts is stale (say, an image directory on a filesystem
        # mounted since): a fresh clone sees them as they are now.
        _discard_warm()
    if _warm is None:
        _clone_warm(zygote_sock)
    if _warm is None:
        _report(box_fd, _warm_failure or OSError("no box"), "clone into new namespaces")
        return
    taken, _warm = _warm, None
    # The host owns this box's cgroup from now on and renames it after the box; should the
    # host die without removing it, the zygote does so at its own end (see _shutdown).
    _unclaimed_cgroups.pop(taken.pid, None)
    _handed_out_cgroups[taken.pid] = taken.cgroup
    config["t_handoff"] = time.monotonic()  # the box reports its phases to the host
    try:
        channel.send(taken.control, {"config": config}, [box_fd])
    except OSError as exc:
        _report(box_fd, exc, "hand-off to the box")
    taken.control.close()
    # The next box's namespaces and kernel mounts are made while this one finishes its root,
    # on the other core, and while the test runs.
    _clone_warm(zygote_sock)


def _clone_warm(zygote_sock: socket.socket) -> None:
    global _warm, _warm_failure
    _note_host_mounts()  # before the clone: a change during it shows at the next hand-out
    backend = cgroups.driver()
    cgroup_error = ""
    try:
        cgroup = backend.create(cgroups.NAME_PREFIX + os.urandom(4).hex()) if backend else []
    except NsboxError as exc:
        # A read-only cgroupfs (a container without --privileged): boxes still run, without
        # limits; a box that asks for limits is told why it cannot have them.
        cgroup, cgroup_error = [], str(exc)
    ours, theirs = channel.socketpair()
    try:
        # The child is born in the box's namespaces as PID 1 of its new pid namespace.
        pid = syscalls.fork_into_namespaces(BOX_NAMESPACES)
    except OSError as exc:
        ours.close()
        theirs.close()
        if backend:
            backend.remove(cgroup)
        _warm_failure = exc
        return
    if pid == 0:
        # In the box: forget the zygote's plumbing before anything else.
        channel.forget_signal_wakeup()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # held by our parent only
        zygote_sock.close()
        ours.close()
        # Any other descriptor of the zygote (such as the socket of the box just handed
        # out) must not be held by this one: the host learns of a box's death by EOF.
        os.closerange(3, theirs.fileno())
        os.closerange(theirs.fileno() + 1, 1 << 16)
        init.await_box(theirs, [str(d) for d in cgroup], cgroup_error)  # never returns
    theirs.close()
    _boxes.add(pid)  # the zygote reaps it in _reap() when it dies
    _unclaimed_cgroups[pid] = cgroup
    _warm, _warm_failure = _Warm(pid, ours, cgroup), None


def _discard_warm() -> None:
    global _warm
    if _warm is not None:
        _warm.control.close()  # EOF: it exits unused (and is reaped in _reap)
        _warm = None


def _host_mounts_changed() -> bool:
    """Whether the host's mount table changed since ``_note_host_mounts`` (a poll, no read)."""
    if _mountinfo_fd < 0:
        return True
    poller = select.poll()
    poller.register(_mountinfo_fd, select.POLLPRI)
    return bool(poller.poll(0))


def _note_host_mounts() -> None:
    """Remember the host's mount table as a fresh clone copies it (reading resets poll)."""
    global _mountinfo_fd
    if _mountinfo_fd < 0:
        _mountinfo_fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    os.lseek(_mountinfo_fd, 0, os.SEEK_SET)
    while os.read(_mountinfo_fd, 65536):
        pass


def _report(box_fd: int, exc: BaseException, step: str) -> None:
    try:
        sock = socket.socket(fileno=os.dup(box_fd))
        channel.send(
            sock,
            {
                "error": {
                    "type": type(exc).__name__,
                    "message": f"{step}: {exc}",
                    "errno": getattr(exc, "errno", None),
                }
            },
        )
        sock.close()
    except OSError:
        pass


if __name__ == "__main__":
    main(sys.argv)
