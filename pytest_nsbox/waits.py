"""The loop behind every wait of a box: check until the condition holds, give up at the
deadline, or at once when the process the wait watches has exited.

Why watch a process: a server that dies on a bad config never opens its port, and a wait that
does not notice sits out its whole timeout, then blames a slow server that never was. The
process's exit is what the wait sleeps on between checks (``exited_within``), so a death ends
the wait within milliseconds, not at the next poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from .errors import ProcessExitedError, WaitTimeoutError

T = TypeVar("T")

FIRST_PAUSE = 0.005
LONGEST_PAUSE = 0.1


class Watched(Protocol):
    """What a wait needs of the process it watches (a ``BoxProcess``)."""

    def poll(self) -> int | None: ...

    def exited_within(self, seconds: float) -> bool: ...

    def exited_error(self, waiting_for: str) -> ProcessExitedError: ...


def until(
    check: Callable[[], T | None],
    seconds: float,
    *,
    watched: Watched | None,
    waiting_for: str,
    timed_out: Callable[[], str],
    interval: float | None = None,
) -> T:
    """``check()`` until it returns something other than None, and return that.

    Gives up with ``WaitTimeoutError(timed_out())`` after ``seconds``, or with the watched
    process's ``ProcessExitedError`` as soon as it has failed (a non-zero status, a signal).
    A watched process that exits 0 is taken for a launcher that left a daemon behind: the
    wait goes on, and its timeout message says the process exited. What the process did just before
    it exited still counts: the condition is checked once more after its exit (a job that
    writes its file and exits has done what the wait waited for). Between checks the pause
    grows from 5 ms to 100 ms, or is ``interval``.
    """
    deadline = time.monotonic() + seconds
    pause = FIRST_PAUSE
    launcher: Watched | None = None
    while True:
        found = check()
        if found is not None:
            return found
        if watched is not None and watched.poll() is not None:
            found = check()
            if found is not None:
                return found
            if watched.poll() != 0:
                raise watched.exited_error(waiting_for)
            # Exit status 0: a launcher that started a daemon and returned (nginx, redis
            # --daemonize yes, `service x start`) is done, not dead: wait on for the daemon.
            launcher, watched = watched, None
        left = deadline - time.monotonic()
        if left <= 0:
            message = timed_out()
            if launcher is not None:
                exited = str(launcher.exited_error(waiting_for)).split(": the process it watches, ", 1)[-1]
                message += (
                    f"; the process it watched exited with status 0 (taken for a launcher that "
                    f"left a daemon running, so the wait went on): {exited}"
                )
            raise WaitTimeoutError(message)
        step = min(interval if interval is not None else pause, left)
        if watched is not None:
            watched.exited_within(step)
        else:
            time.sleep(step)
        pause = min(pause * 2, LONGEST_PAUSE)
