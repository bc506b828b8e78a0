"""The overlay filesystem of a box's root: how it is mounted, and what a box changed in it.

The box's init mounts it (``mount_root``) inside the box's own mount namespace, so it
vanishes with the box; the host reaches it through ``/proc/PID/root`` (the merged view) and
``/proc/PID/fd/N`` (init's open handle on the scratch tmpfs holding the upper layer), and
reads the box's changes from the upper layer (``OverlayRoot.diff``).

The box helper loads this module into every box it forks: it imports the standard library's
``os`` and ``stat`` and ``syscalls`` only (no ``dataclasses``, whose imports would be copied
into every box), which is why the two records below are plain classes.
"""

from __future__ import annotations

import errno
import os
import stat

from . import syscalls
from .errors import BoxError, MountError

TYPE_CHECKING = False  # typing stays out of the box helper (see zygote_process)
if TYPE_CHECKING:
    from collections.abc import Callable

_OPAQUE_XATTR = "trusted.overlay.opaque"


def mount_root(target: str, lowers: list[str], upper: str, work: str, flags: int) -> None:
    """Mount the overlay of ``lowers`` (image layers, top first) and ``upper`` on ``target``.

    ``upper`` and ``work`` must share one filesystem, and it may not be an overlay itself.
    """
    if len(lowers) > 1 and lowers[-1] == "/":
        lowers = [*lowers[:-1], _host_root_layer(os.path.dirname(upper))]
    joined = ":".join(escape_overlay_path(path) for path in short_lowers(lowers))
    # Why redirect_dir and metacopy off (the kernel's defaults, said out loud): with them on,
    # a renamed directory or a chmod is recorded in xattrs that mean nothing outside this
    # overlay, and the upper directory would no longer be a snapshot's exact layer.
    options = f"lowerdir={joined},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off"
    syscalls.mount("nsbox", target, "overlay", flags, options)


def _host_root_layer(scratch: str) -> str:
    """The host's ``/`` as a layer under others (a snapshot of a box of the host's root).

    Why not ``/`` itself: overlayfs refuses layers nested in one another (ELOOP), and every
    cached layer lives somewhere below ``/``. A read-only overlay of ``/`` (over an empty
    directory: without an upper it needs two layers) is a filesystem of its own, so the
    layers above no longer sit inside it.
    """
    layer, empty = f"{scratch}/host-root", f"{scratch}/host-root-empty"
    os.mkdir(layer, 0o755)
    os.mkdir(empty, 0o755)
    try:
        syscalls.mount("nsbox", layer, "overlay", syscalls.MS_RDONLY, f"lowerdir=/:{empty}")
    except MountError as exc:
        if exc.errno != errno.EINVAL:
            raise
        raise MountError(
            exc.errno,
            "mount",
            "a read-only overlay of the host's / under a snapshot's layers",
            "the host's / is itself an overlay here (a container?), and the kernel stacks at most "
            "two: snapshots of boxes of the host's / need a host with a plain root; boot the box "
            "from an image archive (--nsbox-image) and snapshot that",
        ) from exc
    return layer


def short_lowers(lowers: list[str]) -> list[str]:
    """Layer paths as short as can be: overlay's options must fit in one page (4 KiB).

    Layers of the cache share a directory: work from there (the caller's working directory
    changes to it) and name them relative to it, as Docker's short ``l/`` links do, so that
    images with over a hundred layers mount.
    """
    parents = {os.path.dirname(path) for path in lowers}
    if len(lowers) > 1 and len(parents) == 1:
        os.chdir(parents.pop())
        return [os.path.basename(path) for path in lowers]
    return lowers


def escape_overlay_path(path: str) -> str:
    """Escape a layer path for overlay's option string, where ``\\``, ``,`` and ``:`` separate."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


class Changes:
    """Box paths the box added, modified or deleted, relative to its image (sorted)."""

    __slots__ = ("added", "deleted", "modified")
    added: list[str]
    modified: list[str]
    deleted: list[str]

    def __init__(
        self,
        added: list[str] | None = None,
        modified: list[str] | None = None,
        deleted: list[str] | None = None,
    ) -> None:
        for name, value in (("added", added), ("modified", modified), ("deleted", deleted)):
            object.__setattr__(self, name, list(value or []))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Changes is read-only: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Changes):
            return NotImplemented
        return (self.added, self.modified, self.deleted) == (other.added, other.modified, other.deleted)

    __hash__ = None  # type: ignore[assignment]  # lists inside: unhashable, as a dataclass of lists

    def __repr__(self) -> str:
        return f"Changes(added={self.added!r}, modified={self.modified!r}, deleted={self.deleted!r})"

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.deleted)

    def summary(self, limit: int = 20) -> str:
        """A short text for failure reports: ``A /x``, ``M /y``, ``D /z`` lines."""
        lines = [f"A {p}" for p in self.added] + [f"M {p}" for p in self.modified]
        lines += [f"D {p}" for p in self.deleted]
        more = len(lines) - limit
        return "\n".join(lines[:limit] + ([f"... and {more} more"] if more > 0 else []))


class OverlayRoot:
    """The layers of a box's root: ``lowers`` (read-only, top first), ``upper``, ``merged``.

    ``made_by_box`` lists paths the box itself created in the upper layer while starting
    (mount points such as ``/etc/hosts`` that the image lacked); ``diff()`` leaves them out.
    ``is_running`` tells whether the box (``box_id``) still runs: its upper layer goes with it.
    Read-only once made, as the box it describes.
    """

    __slots__ = ("box_id", "is_running", "lowers", "made_by_box", "merged", "upper")
    lowers: tuple[str, ...]
    upper: str
    merged: str
    made_by_box: frozenset[str]
    box_id: str
    is_running: Callable[[], bool] | None

    def __init__(
        self,
        lowers: tuple[str, ...],
        upper: str,
        merged: str,
        made_by_box: frozenset[str] = frozenset(),
        box_id: str = "",
        is_running: Callable[[], bool] | None = None,
    ) -> None:
        values = {
            "lowers": tuple(lowers),
            "upper": upper,
            "merged": merged,
            "made_by_box": frozenset(made_by_box),
            "box_id": box_id,
            "is_running": is_running,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"OverlayRoot is read-only: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OverlayRoot):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"OverlayRoot(lowers={self.lowers!r}, upper={self.upper!r}, merged={self.merged!r})"

    def _key(self) -> tuple[object, ...]:
        return (self.lowers, self.upper, self.merged, self.made_by_box, self.box_id)

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
        return self.stat_below(box_path) is not None

    def stat_below(self, box_path: str) -> os.stat_result | None:
        """``lstat`` of ``box_path`` in the image (the layers below the box's changes), read
        as overlayfs does; None where the image has no such path."""
        parts = box_path.strip("/").split("/")
        for lower in self.lowers:  # top first: the first layer that says anything decides
            try:
                info = os.lstat(os.path.join(lower, *parts))
            except OSError:
                if self._hides_below(lower, parts):
                    return None  # a whiteout or opaque directory on the way hides lower layers
                continue
            return None if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0 else info
        return None

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
