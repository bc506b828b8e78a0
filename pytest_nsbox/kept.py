"""Boxes kept alive after their test (``--nsbox-keep``), for a look inside with ``nsbox shell``.

A kept box is on its own: its init no longer dies with its helper, the helper no longer reaps
it, and its address lease is owned by the init itself. This ledger
(``STATE_DIR/kept.json``, under its lock) is how ``nsbox shell`` finds one and how
``nsbox gc`` ends it: each entry names the init as (pid, start time), so a reused pid is
never mistaken for it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from . import cgroups, channel, state
from .errors import BoxError

DOCUMENT = "kept"


def record(entry: dict[str, Any]) -> None:
    with state.locked_document(DOCUMENT) as document:
        document[entry["id"]] = entry


def entries() -> dict[str, dict[str, Any]]:
    """Kept boxes whose init still lives, by box id."""
    if not (state.STATE_DIR / f"{DOCUMENT}.json").exists():
        return {}
    with state.locked_document(DOCUMENT, readonly=True) as document:
        return {key: dict(value) for key, value in document.items() if _alive(value)}


def find(box_id: str) -> dict[str, Any]:
    kept = entries()
    matches = [key for key in kept if key.startswith(box_id)] if box_id else []
    if len(matches) != 1:
        listing = ", ".join(f"{key} ({value['hostname']}, {value['test']})" for key, value in kept.items())
        what = "no kept box" if not matches else "more than one kept box"
        raise BoxError(f"{what} matches {box_id!r}; kept boxes: {listing or 'none'}")
    return kept[matches[0]]


def inits() -> list[state.Owner]:
    """The inits of the kept boxes still alive: what ``end_all`` kills."""
    return [state.Owner(int(entry["pid"]), int(entry["start"])) for entry in entries().values()]


def end_all(dry_run: bool = False) -> list[str]:
    """Kill every kept box (and forget those already dead): ``nsbox gc``. One line each."""
    if not (state.STATE_DIR / f"{DOCUMENT}.json").exists():
        return []
    removed = []
    with state.locked_document(DOCUMENT, readonly=dry_run) as document:
        for box_id, entry in list(document.items()):
            removed.append(_describe(box_id, entry))
            if dry_run:
                continue
            _kill(entry)
            backend = cgroups.driver()
            if backend is not None and entry.get("cgroup"):
                backend.remove_named(entry["cgroup"])
            del document[box_id]
    return removed


def _describe(box_id: str, entry: dict[str, Any]) -> str:
    test = f", from {entry['test']}" if entry.get("test") else ""
    if not _alive(entry):
        return f"kept box {box_id} ({entry['hostname']}{test}), whose init has ended already"
    return f"kept box {box_id} ({entry['hostname']}, init pid {entry['pid']}{test})"


def _alive(entry: dict[str, Any]) -> bool:
    return state.Owner(int(entry["pid"]), int(entry["start"])).alive()


def _kill(entry: dict[str, Any], timeout: float = 10.0) -> None:
    """SIGKILL the box's init, if it is still the process the entry names, and wait for its box.

    Through a pidfd, opened before the start time is checked: a pid alone could be reused by
    an unrelated process between the check and the kill; the pidfd stays the checked process.
    """
    try:
        pidfd = os.pidfd_open(int(entry["pid"]))
    except ProcessLookupError:
        return  # gone already
    try:
        if not _alive(entry):
            return  # the pid is someone else's now (or a zombie): nothing of ours to kill
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # the kernel kills the rest of its box
        except ProcessLookupError:
            return
        # Readable once the init and, as it was a PID 1, every process of its box are gone;
        # reaped by the host's init in its own time (a zombie has left its cgroup already).
        channel.wait_readable(pidfd, timeout)
    finally:
        os.close(pidfd)
