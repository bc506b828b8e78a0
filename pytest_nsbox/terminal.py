"""A terminal for a command in a box, as ``docker exec -it`` gives one: a pseudo-terminal of the
box's own ``/dev/pts``, the user's terminal in raw mode relaying to it, its window size passed on.

Why a pty of the box's devpts, not ``os.openpty()``: each box mounts a devpts instance of its
own, so a host pty's slave has no name in the box; ``tty`` there says "not a tty" and programs
that look their terminal up by name fail. The master is opened from the host through the box's
root (``openat2(RESOLVE_IN_ROOT)``, as every box file is), checked to be the ``ptmx`` device
before it is opened for real, and its slave is taken with ``TIOCGPTPEER``, by descriptor, never
by a path a box process could swap.

Why relay at all, rather than hand the box the user's own terminal: a command needs a terminal
it can make its controlling terminal in a session of its own (``setsid`` + ``TIOCSCTTY``) for job
control, and the user's terminal is already the controlling terminal of the user's session.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import stat
import struct
import termios
import tty
from collections.abc import Iterator

from .boxfs import BoxFiles

# <asm-generic/ioctls.h> (x86, arm, arm64, riscv, s390); Python's termios does not name them.
TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int): lock or unlock the slave
TIOCGPTPEER = 0x5441  # _IO('T', 0x41): open the slave of this master (Linux 4.13)
_PTMX = os.makedev(5, 2)
_CHUNK = 65536
_LINGER = 0.1  # seconds without output after which the command's exit ends the relay
_DRAIN_LIMIT = 1 << 20  # bytes read after the command's exit, were a background job to go on


def open_box_pty(files: BoxFiles) -> tuple[int, int]:
    """A (master, slave) pair of the box's devpts, both close-on-exec."""
    path_fd = files.open("/dev/pts/ptmx", os.O_PATH | os.O_CLOEXEC)
    try:
        info = os.fstat(path_fd)
        if not stat.S_ISCHR(info.st_mode) or info.st_rdev != _PTMX:
            raise OSError(errno.ENOTTY, "not the pseudo-terminal multiplexer (in the box)", "/dev/pts/ptmx")
        # Reopened through the checked descriptor: the box cannot swap what gets opened.
        master = os.open(f"/proc/self/fd/{path_fd}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except BaseException:
        os.close(master)
        raise
    return master, slave


def copy_window_size(source: int, master: int) -> None:
    """Give the pty the size of the user's terminal (the kernel then signals SIGWINCH in the box)."""
    try:
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    except OSError:
        pass  # no size to copy (not a terminal), or the pty is gone


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The user's terminal in raw mode (keys, Ctrl-C included, go to the box as they are);
    its settings restored however the block ends."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # as docker does: keys typed ahead are kept
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def relay(master: int, child: int, user_in: int = 0, user_out: int = 1) -> None:
    """Copy the user's keys to the pty and its output back until ``child`` (the process that
    waits for the command) has exited; the window size follows the user's terminal (SIGWINCH).

    It ends when the command does, not when the pty closes: a job the command left running
    in the background may hold the pty open, as with ``docker exec -it``. Once the command has
    exited, output still on its way through the pty is read until every slave is closed (the
    usual case, at once) or until none comes for ``_LINGER`` seconds (``_DRAIN_LIMIT`` bytes at
    most). Input is buffered and the master is non-blocking, so a paste larger than the pty's
    buffer cannot deadlock against output nobody reads.
    """
    pidfd = os.pidfd_open(child)
    previous = signal.signal(signal.SIGWINCH, lambda *_: copy_window_size(user_in, master))
    copy_window_size(user_in, master)  # it may have changed while the command started
    os.set_blocking(master, False)
    pending = b""
    reading = True
    try:
        while True:
            readers = [master, pidfd] + ([user_in] if reading and len(pending) < _CHUNK else [])
            ready, writable, _ = select.select(readers, [master] if pending else [], [])
            if master in ready and _copy_output(master, user_out) is None:
                return  # every slave is closed: the command and all it started are gone
            if writable:
                try:
                    pending = pending[os.write(master, pending) :]
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    pending = b""  # no slave left to read it
            if user_in in ready:
                try:
                    data = os.read(user_in, _CHUNK)
                except BlockingIOError:  # a terminal left non-blocking by someone else
                    data = None
                if data:
                    pending += data
                elif data is not None:
                    reading = False  # the user's side hung up; the command still finishes
            if pidfd in ready:
                break
        drained = 0
        while drained < _DRAIN_LIMIT and select.select([master], [], [], _LINGER)[0]:
            copied = _copy_output(master, user_out)
            if copied is None:
                return
            drained += copied
    finally:
        signal.signal(signal.SIGWINCH, previous)
        os.close(pidfd)


def _copy_output(master: int, user_out: int) -> int | None:
    """Copy what the pty has to the user: how many bytes, or None once no slave is open."""
    try:
        data = os.read(master, _CHUNK)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno == errno.EIO:
            return None
        raise
    if not data:
        return None
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(user_out, view) :]
        except BlockingIOError:
            select.select([], [user_out], [])
    return len(data)
