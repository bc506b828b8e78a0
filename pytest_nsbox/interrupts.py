"""SIGTERM during a run tears boxes down as Ctrl-C does.

pytest turns SIGINT into ``KeyboardInterrupt``, which unwinds through fixture teardown; a
SIGTERM (a CI job cancelled, ``timeout``, a container stopping) would kill the process
outright, leaving address leases and the shared bridge to the next run's sweep. Raising
``KeyboardInterrupt`` from a SIGTERM handler gives it the same orderly path. A handler
someone else installed is left alone, and the old one comes back at the end.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_previous: Any = None
_installed = False


def _on_sigterm(_signum: int, _frame: object) -> None:
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
