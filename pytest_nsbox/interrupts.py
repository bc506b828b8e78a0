"""SIGTERM during a run tears boxes down as Ctrl-C does.

pytest turns SIGINT into ``KeyboardInterrupt``, which unwinds through fixture teardown; a
SIGTERM (a CI job cancelled, ``timeout``, a container stopping) would kill the process
outright, leaving address leases and the shared bridge to the next run's sweep. Raising
``KeyboardInterrupt`` from a SIGTERM handler gives it the same orderly path. A handler
someone else installed is left alone, and the old one comes back at the end.

A few steps must finish once begun, or they leave this process somewhere it must not stay
(this thread inside a box's network namespace): ``held()`` keeps both signals out of them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

_previous: Any = None
_installed = False
_HELD = {signal.SIGINT, signal.SIGTERM}
_depth = 0  # held() sections open in the main thread, where Python runs signal handlers
_pending = False  # a SIGTERM arrived inside one: raised as it ends


def _on_sigterm(_signum: int, _frame: object) -> None:
    global _pending
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM held; their ``KeyboardInterrupt`` comes after it.

    Two layers, because either alone leaks: the thread's signal mask keeps the signals off this
    thread, but another thread (execnet's, under xdist) can take one, and Python then runs the
    handler in the main thread at its next bytecode, wherever that is; our SIGTERM handler
    therefore also waits for the section to end.
    """
    global _depth, _pending
    main = threading.current_thread() is threading.main_thread()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    if main:
        _depth += 1
    try:
        yield
    finally:
        if main:
            _depth -= 1
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal held until now is handled here
        if main and not _depth and _pending:
            _pending = False
            raise KeyboardInterrupt("SIGTERM")


def install() -> None:
    """Route SIGTERM through KeyboardInterrupt (main thread only: signals are delivered there)."""
    global _previous, _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return  # the application or another plugin handles it
    _previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True


def uninstall() -> None:
    global _installed
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
        _installed = False
