"""State shared by every pytest-nsbox process on this host, and who owns each piece of it.

pytest-xdist workers and concurrent sessions draw from the same address pool and share the
same bridge, so that state lives in small JSON documents under ``STATE_DIR`` (a tmpfs that a
reboot empties, as it empties the kernel objects the state describes). Each document is read
and written only under its own ``FileLock``.

Each piece of state names its owner as (pid, start time): a pid alone may be reused by an
unrelated process after its owner died, the pair cannot. Whoever takes a lock next frees what
dead owners left.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from . import rootless
from .errors import StateError, permission_hint

# Root's is shared by every session on the host; an ordinary user's is their own (rootless).
STATE_DIR = Path(
    os.environ.get("NSBOX_STATE_DIR")
    or ("/run/pytest-nsbox" if not rootless.active() else str(rootless.runtime_dir()))
)
LOCK_TIMEOUT = 60.0


@dataclass(frozen=True)
class Owner:
    """A process, told apart from a later one that reuses its pid."""

    pid: int
    start: int

    @classmethod
    def current(cls) -> Owner:
        return cls(os.getpid(), process_start(os.getpid()) or 0)

    @classmethod
    def from_json(cls, value: Any) -> Owner:
        pid, start = value
        return cls(int(pid), int(start))

    def to_json(self) -> list[int]:
        return [self.pid, self.start]

    def alive(self) -> bool:
        return self not in _counted_dead and process_start(self.pid) == self.start


# Owners a dry run of ``nsbox gc`` counts as dead: the kept boxes' inits, which the real run
# kills before it sweeps. Empty in every other use.
_counted_dead: frozenset[Owner] = frozenset()


@contextlib.contextmanager
def counting_as_dead(owners: Iterable[Owner]) -> Iterator[None]:
    """Within: ``Owner.alive()`` is False for ``owners``. A dry run so finds what ending them
    frees (their leases, then a bridge nobody uses any more), as the real run does."""
    global _counted_dead
    previous = _counted_dead
    _counted_dead = previous | frozenset(owners)
    try:
        yield
    finally:
        _counted_dead = previous


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] == b"Z":
        return None  # a zombie is dead for our purposes
    return int(fields[19])


@contextlib.contextmanager
def locked_document(name: str, readonly: bool = False) -> Iterator[dict[str, Any]]:
    """``STATE_DIR/<name>.json`` as a dict, held under its lock; written back if changed
    (never with ``readonly``: what a dry run would change is left as it was)."""
    try:
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(
            f"cannot create the state directory {STATE_DIR}: {exc}; {permission_hint('writing it')}"
        ) from exc
    path = STATE_DIR / f"{name}.json"
    lock = FileLock(str(STATE_DIR / f"{name}.lock"), timeout=LOCK_TIMEOUT)
    try:
        lock.acquire()
    except Timeout:
        raise StateError(
            f"{lock.lock_file} has been locked for {LOCK_TIMEOUT:.0f}s; another pytest-nsbox process "
            "is stuck holding it (find it with `fuser`)"
        ) from None
    try:
        text = ""
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
        try:
            document = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            # Only we write it, atomically; a broken one was edited by hand. Start over: the
            # reapers find the kernel objects by name and ownership mark, not only from here.
            document = {}
        before = json.dumps(document, sort_keys=True)
        yield document
        after = json.dumps(document, sort_keys=True)
        if readonly:
            pass
        elif not document:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # nothing held: no file left behind
        elif after != before:
            write_atomically(path, after)
    finally:
        lock.release()


def write_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Replace a file whole: readers see the old text or the new, never half of one (the
    temporary file is in the same directory, so the rename stays on one filesystem)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)
