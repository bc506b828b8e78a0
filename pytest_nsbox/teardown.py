"""Letting go of a stopped box's mounts in the background.

Why: whoever drops the last reference to a mount namespace tears down every mount in it
(overlay, tmpfs, proc, sysfs, devpts) there and then, about half a millisecond here. Left to
the box's init, that happens inside its exit, before ``stop()`` sees it dead. So ``Box.stop``
holds the box's mount namespace (and its root) while it kills the init, and hands both here:
a thread of this process closes them right after, while the test goes on. The mounts are
already unreachable (no process is left in that namespace), so nothing can see the delay.
"""

from __future__ import annotations

import os
import queue
import threading

_queue: queue.SimpleQueue[int | threading.Event] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_owner = 0  # the pid that started the thread: a forked child starts its own
_lock = threading.Lock()


def close_later(fds: list[int]) -> None:
    """Close ``fds`` soon, in the background (each is owned by this call from now on)."""
    global _thread, _owner
    with _lock:
        if _thread is None or _owner != os.getpid() or not _thread.is_alive():
            _thread = threading.Thread(target=_close_forever, name="nsbox-teardown", daemon=True)
            _owner = os.getpid()
            _thread.start()
    for fd in fds:
        _queue.put(fd)


def wait_closed(timeout: float = 10.0) -> bool:
    """Block until everything handed over so far is closed (for the end of a session)."""
    with _lock:
        if _thread is None or _owner != os.getpid() or not _thread.is_alive():
            return True
    done = threading.Event()
    _queue.put(done)
    return done.wait(timeout)


def _close_forever() -> None:
    while True:
        item = _queue.get()
        if isinstance(item, threading.Event):
            item.set()
            continue
        try:
            os.close(item)
        except OSError:
            pass
