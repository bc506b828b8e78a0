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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cgroups, channel, rootfs, rootless
from .errors import BoxError, ConfigError, HostUnsupportedError, NetworkError

START_TIMEOUT = 30.0
# The key of a request for a box made for its options (its clocks), which no waiting box fits.
_MADE = "made for its options"
_SOCKET = "a socket"  # the key of a request for a socket in a network namespace (rootless)
# Waiting boxes kept, one per root (image and privilege) recently asked for: a suite that
# alternates among four images, templates or snapshots finds a box ready for each.
MAX_WAITING = 4
# Boxes kept waiting for one root at most: a cluster asks for as many as it has nodes
# (``prepare``), and each box taken is replaced by one like it, so the next cluster of that
# size finds them all waiting.
MAX_WAITING_PER_ROOT = 8

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
                *(["rootless"] if rootless.active() else []),
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,  # Ctrl-C goes to pytest, which tears boxes down in order
            env=_helper_environment(),
        )
        theirs.close()
        self._sock = ours
        if rootless.active():
            self._map_ids()
            rootless.note_helper(self.process.pid)
        self._lock = threading.Lock()
        self.owner_pid = os.getpid()
        self._sequence = 0
        # Requests whose box is on its way (sequence -> root key, mount generation), and the
        # boxes announced, one per root recently asked for.
        self._pending: dict[int, tuple[str, int]] = {}
        self._waiting: dict[str, list[_Announced]] = {}  # least recently asked-for root first
        self._made: dict[int, _Announced] = {}  # boxes made for their options, by sequence
        self._sockets: dict[int, socket.socket | str] = {}  # sockets asked for (or why not), by sequence
        self._generation = 0  # how many changes of the host's mounts we have seen
        self._mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._mount_poller = select.poll()
        self._mount_poller.register(self._mountinfo, select.POLLPRI)
        self._note_mounts()

    def _map_ids(self) -> None:
        """Rootless: write the id maps of the user namespace the helper has just made, then
        let it go on (``zygote_process._enter_user_namespace``)."""
        try:
            message = None
            if channel.wait_readable(self._sock, START_TIMEOUT):
                message, _fds = channel.recv(self._sock)
            state = (message or {}).get("userns")
            if isinstance(state, dict):
                raise HostUnsupportedError(
                    rootless.unshare_refused(int(state["errno"]), str(state["strerror"]))
                )
            if state != "made":
                raise BoxError(
                    f"the nsbox zygote (pid {self.pid}) did not start: {self.log() or 'no answer'}"
                )
            rootless.map_ids(self.pid, rootless.id_plan())
            channel.send(self._sock, {"go": True})
        except BaseException:
            self._sock.close()  # EOF: the helper exits
            self.process.wait()
            os.close(self._log)
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.owner_pid == os.getpid() and self.process.poll() is None

    def spawn_box(
        self,
        config: dict[str, Any],
        box_end: socket.socket,
        network: Callable[[list[Any]], dict[str, Any]] | None = None,
    ) -> None:
        """Hand ``config`` to a waiting box; its init reports on ``box_end``'s peer (ready, or
        what failed). With ``network``: the box is one with a prebuilt veth (``config["veth"]``),
        and ``network([host_name, host_index])`` returns what the box configures its ``eth0``
        with (``config["network"]``); if it raises, the box is dropped unused.

        Why the host talks to the box itself: the zygote announces each waiting box as it
        makes it, with the box's control socket, and that message waits in our socket until
        a test wants a box. Sending the options straight to the box saves a wake-up of the
        zygote on the way (a few tenths of a millisecond); the zygote only hears afterwards,
        as it should make the next one like it.
        """
        hint = rootfs.root_hint(config)
        clock = config.get("clock")
        made = bool(clock or hint.get("userns"))  # a box only for these options: made now
        try:
            with self._lock:
                warm = self._made_box(hint, clock) if made else self._waiting_box(hint)
            try:
                # Without the zygote's lock: the network's part waits for the host-wide pool.
                if network is not None:
                    if warm.veth is None:
                        raise BoxError(f"the nsbox zygote (pid {self.pid}) made a box without its veth")
                    config["network"] = network(warm.veth)
                config["t_handoff"] = time.monotonic()  # the box reports its phases to us
                channel.send(warm.control, {"config": config}, [box_end.fileno()])
            finally:
                warm.control.close()  # unsent: EOF, the box exits unused (its veth with it)
            if not made:  # a box made for its clocks or user namespace has no replacement waiting
                with self._lock:
                    self._ask({"op": "taken", "pid": warm.pid, "hint": hint})
        except ConfigError as exc:  # the kernel refused the box's clock offsets
            raise ConfigError(f"box {config.get('id')}: {exc}") from None
        except OSError as exc:
            raise BoxError(f"the nsbox zygote (pid {self.pid}) is gone: {self.log() or exc}") from exc

    def prepare(self, config: dict[str, Any], count: int) -> None:
        """Have ``count`` boxes for ``config``'s root waiting (at most ``MAX_WAITING_PER_ROOT``):
        asks for those missing and returns at once; they are made while the caller goes on
        (a cluster, starting its nodes one after another)."""
        if config.get("clock") or config.get("userns"):
            return  # such boxes are made when asked for (see spawn_box)
        hint = rootfs.root_hint(config)
        key = _key(hint)
        try:
            with self._lock:
                self._collect(block=False)
                have = len(self._waiting.get(key, [])) + sum(
                    1 for pending in self._pending.values() if pending == (key, self._generation)
                )
                for _ in range(min(count, MAX_WAITING_PER_ROOT) - have):
                    self._ask({"op": "want", "hint": hint})
        except OSError as exc:
            raise BoxError(f"the nsbox zygote (pid {self.pid}) is gone: {self.log() or exc}") from exc

    def waiting_boxes(self) -> int:
        """How many waiting boxes this handle holds (a descriptor each), once announcements
        that arrived are filed: for leak checks, which must not count them as leaks."""
        with self._lock:
            self._collect(block=False)
            return sum(len(boxes) for boxes in self._waiting.values())

    def _waiting_box(self, hint: dict[str, Any]) -> _Announced:
        """A waiting box built for ``hint``, made before the host's mounts last changed;
        asked for and waited for if there is none (nor one on its way)."""
        key = _key(hint)
        self._collect(block=False)
        attempt = 0
        while True:
            if self._mounts_changed():
                self._generation += 1  # every box asked for before now sees stale mounts
                self._note_mounts()
            boxes = self._waiting.pop(key, [])
            warm = boxes.pop(0) if boxes else None
            if boxes:
                self._waiting[key] = boxes  # the root most recently asked for, now
            # A host whose mounts change all the time gets the freshest box there is.
            if warm is not None and (warm.generation == self._generation or attempt >= 3):
                return warm
            if warm is not None:
                warm.control.close()  # EOF: it exits unused
                continue  # the next one of this root may be fresh
            if (key, self._generation) not in self._pending.values():  # none fit is on its way
                self._ask({"op": "want", "hint": hint})
            self._collect(block=True)
            attempt += 1

    def _made_box(self, hint: dict[str, Any], clock: dict[str, int] | None) -> _Announced:
        """A box made now for ``hint`` in a time namespace with ``clock``'s offsets
        (nanoseconds by clock name), if any; raises ``ConfigError`` for offsets the kernel refuses.

        Why not a waiting box: a time namespace's offsets are fixed once a process is in it,
        and waiting boxes are made before anyone knows the clocks a test wants. Keying them
        by clock too would keep a box of every offset ever asked for waiting; clocks are rare.
        The same goes for a user namespace (``hint["userns"]``): its id range is the box's own,
        leased as it starts.
        """
        sequence = self._ask({"op": "make", "hint": hint, "clock": clock}, _MADE)
        try:
            while sequence not in self._made:
                self._collect(block=True)
        except BaseException:
            if sequence in self._pending:  # given up on: its box exits unused when it comes
                self._pending[sequence] = ("", self._generation)
            made = self._made.pop(sequence, None)
            if made is not None:
                made.control.close()  # EOF: it exits unused
            raise
        return self._made.pop(sequence)

    def _ask(self, message: dict[str, Any], key: str | None = None) -> int:
        """Send a request that makes the zygote clone a box (it announces it when made);
        returns its sequence number."""
        self._sequence += 1
        channel.send(self._sock, {**message, "seq": self._sequence})
        self._pending[self._sequence] = (key or _key(message["hint"]), self._generation)
        return self._sequence

    def _collect(self, block: bool) -> None:
        """File the zygote's announcements: every one waiting (``block``: at least one)."""
        while channel.wait_readable(self._sock, START_TIMEOUT if block else 0):
            block = False
            message, fds = channel.recv(self._sock)
            if message is None:
                raise OSError(errno.EPIPE, "the zygote closed its socket")
            sequence = int(message.get("seq", 0))
            key, generation = self._pending.pop(sequence, ("", 0))
            if key == _SOCKET:
                if len(fds) == 1 and "error" not in message:
                    self._sockets[sequence] = socket.socket(fileno=fds[0])
                else:
                    for fd in fds:
                        os.close(fd)
                    self._sockets[sequence] = str(message.get("error", {}).get("message", "no socket"))
                continue
            if "error" in message or len(fds) != 1 or not key:
                for fd in fds:
                    os.close(fd)
                if not key and "error" not in message:
                    continue  # an answer to nothing we asked: the box exits unused
                error = message.get("error", {}).get("message", "no box in its answer")
                if message.get("error", {}).get("kind") == "config":
                    raise ConfigError(error)  # an option this host refuses now (a clock's offset)
                if message.get("error", {}).get("kind") == "unsupported":
                    raise HostUnsupportedError(error)  # e.g. layers on a filesystem without idmaps
                raise BoxError(f"the nsbox zygote (pid {self.pid}) could not make a box: {error}")
            if key == _MADE:
                self._made[sequence] = _Announced(message, socket.socket(fileno=fds[0]), generation)
                continue
            boxes = self._waiting.pop(key, [])
            boxes.append(_Announced(message, socket.socket(fileno=fds[0]), generation))
            while len(boxes) > MAX_WAITING_PER_ROOT:
                boxes.pop(0).control.close()
            self._waiting[key] = boxes
            while len(self._waiting) > MAX_WAITING:  # the root least recently asked for goes
                for warm in self._waiting.pop(next(iter(self._waiting))):
                    warm.control.close()
        if block:
            raise BoxError(f"the nsbox zygote (pid {self.pid}) made no box within {START_TIMEOUT}s")

    def _note_mounts(self) -> None:
        os.lseek(self._mountinfo, 0, os.SEEK_SET)
        while os.read(self._mountinfo, 65536):
            pass

    def _mounts_changed(self) -> bool:
        """Whether the host's mount table changed since we last looked (a poll, no read): a
        box cloned before would see a stale copy (say, no image directory on a filesystem
        mounted since)."""
        return bool(self._mount_poller.poll(0))

    def socket_in(self, pid: int, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket made by the helper in the network namespace of box init ``pid`` (0: the
        session's own), for a rootless host, which may not join it (see
        ``zygote_process._open_socket``). Raises ``NetworkError`` if it could not be made."""
        try:
            with self._lock:
                message = {"op": "socket", "pid": pid, "family": family, "type": kind, "proto": proto}
                sequence = self._ask(message, _SOCKET)
                while sequence not in self._sockets:
                    self._collect(block=True)
                made = self._sockets.pop(sequence)
        except OSError as exc:
            raise BoxError(f"the nsbox zygote (pid {self.pid}) is gone: {self.log() or exc}") from exc
        if isinstance(made, str):
            raise NetworkError(made)
        return made

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
        for boxes in [*self._waiting.values(), list(self._made.values())]:
            for warm in boxes:
                warm.control.close()
        self._waiting = {}
        self._made = {}


def _helper_environment() -> dict[str, str]:
    """What the helper is started with: only what the loader and the interpreter may need to
    start at all. Why so little: each box's PID 1 is a fork of the helper, and the host's
    environment (its paths, its tokens) has no business there; the helper blanks even these
    once it runs (``syscalls.hide_environment``). A command's environment never came from it.
    """
    return {
        name: os.environ[name]
        for name in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME")
        if name in os.environ
    }


class _Announced:
    """A waiting box as the zygote announced it: its pid, the socket its options go to, the
    host's mount generation when it was asked for, and its veth's host end (name, index) if
    it was made for a bridged box."""

    def __init__(self, message: dict[str, Any], control: socket.socket, generation: int) -> None:
        self.pid = int(message["warm"])
        self.veth: list[Any] | None = message.get("veth")
        self.control = control
        self.generation = generation


def _key(hint: dict[str, Any]) -> str:
    return json.dumps(hint, sort_keys=True)


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
