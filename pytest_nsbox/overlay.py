"""A box's overlay root as the host sees it, and what the box changed in it.

The mounts themselves are made by the box's init inside its own mount namespace (so they
vanish with it); the host reaches them through ``/proc/PID/root`` (the merged view) and
``/proc/PID/fd/N`` (init's open handle on the scratch tmpfs holding the upper layer).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import BoxError

_OPAQUE_XATTR = "trusted.overlay.opaque"


@dataclass(frozen=True)
class Changes:
    """Box paths the box added, modified or deleted, relative to its image (sorted)."""

    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.deleted)

    def summary(self, limit: int = 20) -> str:
        """A short text for failure reports: ``A /x``, ``M /y``, ``D /z`` lines."""
        lines = [f"A {p}" for p in self.added] + [f"M {p}" for p in self.modified]
        lines += [f"D {p}" for p in self.deleted]
        more = len(lines) - limit
        return "\n".join(lines[:limit] + ([f"... and {more} more"] if more > 0 else []))


@dataclass(frozen=True)
class OverlayRoot:
    """The layers of a box's root: ``lowers`` (read-only, top first), ``upper``, ``merged``.

    ``made_by_box`` lists paths the box itself created in the upper layer while starting
    (mount points such as ``/etc/hosts`` that the image lacked); ``diff()`` leaves them out.
    ``is_running`` tells whether the box (``box_id``) still runs: its upper layer goes with it.
    """

    lowers: tuple[str, ...]
    upper: str
    merged: str
    made_by_box: frozenset[str] = frozenset()
    box_id: str = ""
    is_running: Callable[[], bool] | None = field(default=None, compare=False, repr=False)

    def diff(self) -> Changes:
        """What the box changed, read from the upper layer (whiteouts are deletions).

        A directory that exists below counts as changed only through its entries; a directory
        made opaque (``rm -rf dir && mkdir dir``) reports every entry below it as deleted.
        With the host's ``/`` as the image, existence below is checked against the host's
        tree, which is exact everywhere but under the host's own mount points.

        Raises ``BoxError`` once the box has stopped: its upper layer is gone, and an empty
        answer would make every "nothing changed" assertion pass by accident.
        """
        if (self.is_running is not None and not self.is_running()) or not os.path.isdir(self.upper):
            raise BoxError(
                f"box {self.box_id or '?'}: its overlay root is gone with the stopped box; call diff() "
                "before stop() (inside the test, not after the fixture's teardown)"
            )
        added: list[str] = []
        modified: list[str] = []
        deleted: list[str] = []
        for top, dirs, files in os.walk(self.upper):
            rel_top = os.path.relpath(top, self.upper)
            box_top = "/" if rel_top == "." else "/" + rel_top
            for name in sorted(dirs + files):
                box_path = os.path.join(box_top, name)
                if box_path in self.made_by_box:
                    continue  # a mount point the box had to create, not a change of the test's
                info = os.lstat(os.path.join(top, name))
                below = self._exists_below(box_path)
                if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                    if below:
                        deleted.append(box_path)
                    continue
                if stat.S_ISDIR(info.st_mode):
                    if not below:
                        added.append(box_path)
                    elif _is_opaque(os.path.join(top, name)):
                        deleted.extend(self._hidden_below(box_path, os.path.join(top, name)))
                    continue
                (modified if below else added).append(box_path)
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
        return Changes(sorted(added), sorted(modified), sorted(deleted))

    def _exists_below(self, box_path: str) -> bool:
        """Whether the image has ``box_path``, reading its layers as overlayfs does."""
        parts = box_path.strip("/").split("/")
        for lower in self.lowers:  # top first: the first layer that says anything decides
            try:
                info = os.lstat(os.path.join(lower, *parts))
            except OSError:
                if self._hides_below(lower, parts):
                    return False  # a whiteout or opaque directory on the way hides lower layers
                continue
            return not (stat.S_ISCHR(info.st_mode) and info.st_rdev == 0)
        return False

    def _hides_below(self, lower: str, parts: list[str]) -> bool:
        for depth in range(1, len(parts)):
            path = os.path.join(lower, *parts[:depth])
            try:
                info = os.lstat(path)
            except OSError:
                return False
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                return True
            if stat.S_ISDIR(info.st_mode) and _is_opaque(path):
                return True
        return False

    def _hidden_below(self, box_path: str, upper_dir: str) -> list[str]:
        present = set(os.listdir(upper_dir))
        hidden: set[str] = set()
        for lower in self.lowers:
            try:
                names = os.listdir(os.path.join(lower, box_path.lstrip("/")))
            except OSError:
                continue
            hidden.update(os.path.join(box_path, n) for n in names if n not in present)
        return sorted(hidden)


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, _OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False
