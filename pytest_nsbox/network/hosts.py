"""``/etc/hosts`` of networked boxes: each resolves the other boxes on its bridge by name.

The file is the box's own (a bind mount from its scratch tmpfs), which the host reaches at
``/proc/<init>/fd/<scratch>/etc/hosts`` and rewrites in place. Only the block under our marker
is ours: lines a test added above it are kept.

Which boxes: those of this process on the same bridge. Boxes of other pytest processes on
the shared bridge are reachable by address but not listed, so that two xdist workers' boxes
called ``server`` never answer for each other.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import IO

from .. import syscalls

MARKER = "# boxes on this network (pytest-nsbox)"


@dataclass(frozen=True)
class Entry:
    box_id: str
    hostname: str
    address: str
    path: str  # the host's path to the box's /etc/hosts


_members: dict[str, list[Entry]] = {}  # bridge name -> entries, in joining order
_lock = threading.Lock()


def join(bridge: str, *entries: Entry) -> None:
    """List ``entries`` in the files of their bridge's boxes, and them in their own: each
    file is written once, however many join (a cluster lists all its nodes at once)."""
    if not entries:
        return
    with _lock:
        members = _members.setdefault(bridge, [])
        members.extend(entries)
        _rewrite(members)


def forget(bridge: str) -> None:
    """Every box of ``bridge`` is stopping (a cluster's): no file is rewritten any more."""
    with _lock:
        _members.pop(bridge, None)


def leave(bridge: str, box_id: str) -> None:
    """Take a stopped box out of the other boxes' files."""
    with _lock:
        members = [m for m in _members.get(bridge, []) if m.box_id != box_id]
        if members:
            _members[bridge] = members
        else:
            _members.pop(bridge, None)
        _rewrite(members)


def render(current: str, own: Entry, members: list[Entry]) -> str:
    """``current`` with our block replaced: the box's own address first, then its peers."""
    kept = []
    for line in current.split(MARKER, 1)[0].splitlines():
        fields = line.split()
        if fields and fields[0] == "127.0.1.1" and own.hostname in fields[1:]:
            continue  # the box's name now resolves to its address on the network
        kept.append(line)
    block = [MARKER, f"{own.address}\t{own.hostname}"]
    block += [f"{m.address}\t{m.hostname}" for m in members if m.box_id != own.box_id]
    return "\n".join(kept + block) + "\n"


def _rewrite(members: list[Entry]) -> None:
    for member in members:
        try:
            with _open_in_scratch(member.path) as handle:
                text = render(handle.read(), member, members)
                handle.seek(0)
                handle.write(text)
                handle.truncate()
        except OSError:
            continue  # that box is stopping: its file is going away with it


def _open_in_scratch(path: str) -> IO[str]:
    """Open ``<scratch>/etc/hosts`` for update without following any symlink below the
    scratch directory: a privileged box can reach that directory, and must not be able to
    send our write to a file of the host."""
    scratch, _, below = path.rpartition("/etc/")
    directory = os.open(scratch, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        resolve = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS
        fd = syscalls.openat2(directory, f"etc/{below}", os.O_RDWR | os.O_CLOEXEC, 0, resolve)
    finally:
        os.close(directory)
    return os.fdopen(fd, "r+")
