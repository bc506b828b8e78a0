"""Messages between the host, the zygote and a box's init.

Each message is one JSON object in one ``SOCK_SEQPACKET`` datagram, with file descriptors
beside it (``SCM_RIGHTS``). Seqpacket keeps message boundaries and reports EOF when the
peer dies, which is how every side notices that another one is gone.
"""

from __future__ import annotations

import array
import json
import math
import os
import select
import signal
import socket

TYPE_CHECKING = False  # the box helper loads this module: typing stays out of it
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, TypeAlias

    Message: TypeAlias = dict[str, Any]

# A datagram must fit the socket buffer (about 200 KiB by default); anything larger, such as a
# long shell script, travels in a memfd whose descriptor rides along as the last fd.
_INLINE_LIMIT = 64 * 1024
_RECV_SIZE = _INLINE_LIMIT + 1024
MAX_FDS = 8
_FD_SIZE = array.array("i").itemsize


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of seqpacket sockets, close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def wait_readable(fd: int | socket.socket, timeout: float | None) -> bool:
    """Whether ``fd`` is readable (or its peer gone) within ``timeout`` seconds (None: no limit).

    Why ``poll``, never ``select``: ``select`` cannot watch a descriptor numbered 1024 or more
    (``FD_SETSIZE``), and a process allowed many open files reaches such numbers.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    # poll counts milliseconds; rounding up keeps a short wait from becoming a busy loop.
    return bool(poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))))


def send(sock: socket.socket, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one message and its descriptors (the caller still owns and closes ``fds``)."""
    data = json.dumps(message, separators=(",", ":")).encode()
    fds = list(fds)
    if len(fds) > MAX_FDS - 1:  # one slot stays free for a spilled message's memfd
        raise ValueError(f"at most {MAX_FDS - 1} descriptors per message, got {len(fds)}")
    spill = -1
    if len(data) > _INLINE_LIMIT:
        spill = os.memfd_create("nsbox-message", os.MFD_CLOEXEC)
        os.write(spill, data)
        fds.append(spill)
        data = b'{"$spill":1}'
    try:
        socket.send_fds(sock, [data], fds)
    finally:
        if spill >= 0:
            os.close(spill)


def recv(sock: socket.socket) -> tuple[Message | None, list[int]]:
    """Receive one message; ``(None, [])`` means the peer has gone (EOF)."""
    # MSG_CMSG_CLOEXEC: a passed descriptor must not leak into a command started later.
    # (socket.recv_fds drops its flags argument before Python 3.13, so recvmsg directly.)
    data, ancillary, _flags, _addr = sock.recvmsg(
        _RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if _flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError("a message or its descriptors were cut short: the peer sent more than allowed")
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message: Message = json.loads(data)
    if message.get("$spill"):
        spill = fds.pop()
        try:
            size = os.fstat(spill).st_size
            message = json.loads(os.pread(spill, size, 0))
        finally:
            os.close(spill)
    return message, fds


_wake_fds: tuple[int, int] | None = None


def serve(
    sock: socket.socket,
    handle: Callable[[Message, list[int]], None],
    reap: Callable[[], None],
) -> None:
    """Hand each message to ``handle`` and call ``reap`` after every SIGCHLD, until EOF.

    The loop of both the zygote and a box's init: both wait on their socket and on their
    children. ``handle`` may keep a passed fd only by duplicating it; all are closed after it.
    """
    global _wake_fds
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _wake_fds = (wake_read, wake_write)
    signal.set_wakeup_fd(wake_write)
    # A Python-level handler is needed for the wakeup fd to be written; the reaping itself
    # happens in the loop, outside signal context.
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    try:
        while True:
            for fd, _event in poller.poll():
                if fd == wake_read:
                    _drain(wake_read)
                    continue
                message, fds = recv(sock)
                if message is None:
                    return
                try:
                    handle(message, fds)
                finally:
                    for passed in fds:
                        os.close(passed)
            reap()
    finally:
        forget_signal_wakeup()


def reaped_children() -> Iterator[tuple[int, int]]:
    """``(pid, wait status)`` of every child that has exited, without blocking: what the
    ``reap`` callback of ``serve`` goes through after a SIGCHLD."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def forget_signal_wakeup() -> None:
    """Undo ``serve``'s signal plumbing: when the loop ends, and in a child forked inside it."""
    global _wake_fds
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if _wake_fds is not None:
        for fd in _wake_fds:
            os.close(fd)
        _wake_fds = None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
