"""Pause, resume and power cuts of a box, on its cgroup's freezer.

Why the freezer: it stops every process of the box where it stands, at once, and nothing in
the box can notice or refuse (SIGSTOP can be seen by a parent, and is undone by SIGCONT from
inside). A paused box keeps its processes, memory, sockets and address; it just does not run,
so its peers' requests to it time out, as they would to a hung machine.

Why a frozen box is thawed only after SIGKILL: on cgroup v1 a frozen task does not die until
it is thawed, and thawing first would let the box run for a moment more. Killed while frozen
and then thawed, its processes die at their next step without running a line of their own
code (on v2 SIGKILL reaches frozen tasks anyway).
"""

from __future__ import annotations

import os
import signal

from . import cgroups, rootless
from .cgroups import Cgroup
from .errors import BoxError, CgroupError, RootlessError

PAUSED_HINT = "resume() it first, or use `with box.paused():` around what must happen while it is paused"


def paused_error(box_id: str, what: str) -> BoxError:
    """``run()`` and the waits of a paused box: its init is frozen too and would never answer."""
    return BoxError(f"box {box_id} is paused: {what} cannot run in it; {PAUSED_HINT}")


def freeze(cgroup: Cgroup, box_id: str) -> None:
    """Freeze the box's cgroup; a clear ``BoxError`` where the host has no freezer."""
    if cgroup.driver is None:
        if rootless.active():
            raise RootlessError(
                f"box {box_id} cannot be paused: pausing needs a cgroup freezer: {cgroups.unavailable()}"
            )
        raise BoxError(
            f"box {box_id} cannot be paused: this host has no usable cgroups, so no freezer "
            "(see the `freezer` line of `nsbox doctor`)"
        )
    try:
        cgroup.freeze()
    except CgroupError as exc:
        raise BoxError(
            f"box {box_id} cannot be paused: {exc} (see the `freezer` line of `nsbox doctor`)"
        ) from exc


def thaw(cgroup: Cgroup, box_id: str) -> None:
    try:
        cgroup.thaw()
    except CgroupError as exc:
        raise BoxError(f"box {box_id} cannot be resumed: {exc}") from exc


def kill_frozen(cgroup: Cgroup) -> None:
    """SIGKILL every process of a frozen cgroup, then thaw it so that they die (see above).

    Does nothing to a cgroup that is not frozen: the caller's kill of init does the job there.
    """
    if not cgroup.is_frozen():
        return
    for procs in cgroup.procs_files():
        try:
            with open(procs) as handle:
                pids = [int(line) for line in handle if line.strip()]
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        cgroup.thaw()
    except CgroupError:
        # Thawed, they die at once; the box helper removes the emptied cgroup as it reaps the
        # init, possibly before the thaw is seen. A cgroup that is gone holds nothing.
        if any(os.path.isdir(path) for path in map(str, cgroup.dirs)):
            raise
