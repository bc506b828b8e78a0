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
# Set by a rootless box helper (zygote_process) in its user namespace: every overlay it mounts
# there must keep its xattrs in user.overlay.* (trusted.* is out of reach).
in_user_namespace = False


def mount_root(
    target: str, lowers: list[str], upper: str, work: str, flags: int, sources: list[str] | None = None
) -> None:
    """Mount the overlay of ``lowers`` (image layers, top first) and ``upper`` on ``target``.

    ``upper`` and ``work`` must share one filesystem, and it may not be an overlay itself.
    ``sources``: where each layer is to be found instead (idmapped mounts of them: userns).
    """
    if lowers and lowers[-1] == "/" and sources is None and in_user_namespace:
        _mount_host_root_by_directory(target, lowers[:-1], upper, work, flags)
        return
    if sources is not None:
        if len(lowers) > 1 and lowers[-1] == "/":
            sources = [*sources[:-1], _host_root_layer(os.path.dirname(upper), sources[-1])]
        lowers = sources
    elif len(lowers) > 1 and lowers[-1] == "/":
        lowers = [*lowers[:-1], _host_root_layer(os.path.dirname(upper))]
    joined = ":".join(escape_overlay_path(path) for path in short_lowers(lowers))
    # Why redirect_dir and metacopy off (the kernel's defaults, said out loud): with them on,
    # a renamed directory or a chmod is recorded in xattrs that mean nothing outside this
    # overlay, and the upper directory would no longer be a snapshot's exact layer.
    options = f"lowerdir={joined},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off"
    if sources is not None or in_user_namespace:
        # In a user namespace the trusted.* xattrs are out of reach: overlay keeps its own
        # (opaque directories) in user.overlay.* instead, and refuses to follow redirects.
        options = options.replace("redirect_dir=off", "redirect_dir=nofollow") + ",userxattr"
    syscalls.mount("nsbox", target, "overlay", flags, options)


# Top-level directories of the host that a box never sees: it mounts its own over them.
_OWN_DIRECTORIES = ("proc", "sys", "dev")


def _mount_host_root_by_directory(target: str, above: list[str], upper: str, work: str, flags: int) -> None:
    """A rootless box of the host's ``/``: one overlay per top-level directory, on a tmpfs.

    Why not one overlay of ``/``: in a user namespace the host's mounts below ``/`` (``/proc``,
    ``/run/user/...``) are locked to the one above them, and overlay refuses a layer with
    locked mounts below it (EINVAL, "failed to clone lowerpath"). ``/usr`` or ``/etc`` have
    none: each gets an overlay of its own, its upper at ``upper/<name>``, so the upper tree is
    laid out as one overlay's would be (a box's changes read the same). A directory with
    mounts below it (``/usr`` with ``/usr/lib/modules`` mounted, ``/run``) is bound read-only
    instead, mounts and all.
    ``above``: layers over the host's root (top first: a restarted box's changes, snapshots),
    each stacked over the directory of the same name.
    """
    syscalls.mount("nsbox-root", target, "tmpfs", flags, "mode=0755")
    for name in sorted(os.listdir("/")):
        path = f"/{name}"
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(path), f"{target}/{name}")
            continue
        if not stat.S_ISDIR(info.st_mode):
            continue
        os.mkdir(f"{target}/{name}", stat.S_IMODE(info.st_mode))
        if name in _OWN_DIRECTORIES:
            continue
        os.mkdir(f"{upper}/{name}", stat.S_IMODE(info.st_mode))
        os.mkdir(f"{work}/{name}", 0o755)
        # Only layers that changed the directory: the cache may lie under it (~/.cache in
        # /home), and overlay refuses a layer nested in another (ELOOP).
        layers = [f"{layer}/{name}" for layer in above if _stacks_on(layer, name)] + [path]
        joined = ":".join(escape_overlay_path(layer) for layer in layers)
        options = (
            f"lowerdir={joined},upperdir={upper}/{name},workdir={work}/{name},"
            "redirect_dir=nofollow,metacopy=off,userxattr"
        )
        try:
            try:
                syscalls.mount("nsbox", f"{target}/{name}", "overlay", flags, options)
            except MountError as exc:
                if exc.errno != errno.ELOOP or len(layers) == 1:
                    raise
                # The layers above lie inside the host's directory (the user's cache in /tmp
                # or /home): overlay refuses to stack a layer on its own parent. The box's
                # changes win; what else the host has there stays out of the box.
                options = options.replace(f":{escape_overlay_path(path)},", ",", 1)
                syscalls.mount("nsbox", f"{target}/{name}", "overlay", flags, options)
        except MountError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM, errno.EACCES):
                raise
            os.rmdir(f"{upper}/{name}")
            if exc.errno == errno.EINVAL:
                # Mounts below it: the host's directory as it is, without the layers above
                # (a box's changes there, the skeleton's owners), rather than none of it.
                _bind_read_only(path, f"{target}/{name}")


def _bind_read_only(source: str, target: str) -> None:
    """The host's directory with the mounts below it (a recursive bind: a user namespace may
    copy a tree of locked mounts whole, not in part), read-only: unlike an overlay, a bind
    writes through to the host. Not ours to see (EPERM): the directory stays empty."""
    try:
        syscalls.mount(source, target, None, syscalls.MS_BIND | syscalls.MS_REC)
    except MountError:
        return
    # mount_setattr, not a remount: it changes read-only alone, where a remount must repeat
    # every flag the host's mount has locked (atime, nosuid, ...) or be refused.
    fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syscalls.mount_setattr_fd(fd, syscalls.MOUNT_ATTR_RDONLY, 0)
    finally:
        os.close(fd)


def _stacks_on(layer: str, name: str) -> bool:
    """Whether ``layer`` has a directory ``name`` to stack over the host's ``/name``: one that
    holds something, or any at all where the layer does not lie inside ``/name``."""
    try:
        with os.scandir(f"{layer}/{name}") as entries:
            return any(True for _ in entries) or not layer.startswith(f"/{name}/")
    except OSError:
        return False


def _host_root_layer(scratch: str, source: str = "/") -> str:
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
        syscalls.mount("nsbox", layer, "overlay", syscalls.MS_RDONLY, f"lowerdir={source}:{empty}")
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
        """A short text for messages: ``A /x``, ``M /y``, ``D /z`` lines, at most ``limit`` of
        them; when there are more, a first line says how many (``57 changes, the first 20:``)
        and a last one how many are left out."""
        lines = [f"A {p}" for p in self.added] + [f"M {p}" for p in self.modified]
        lines += [f"D {p}" for p in self.deleted]
        limit = max(limit, 0)
        if len(lines) <= limit:
            return "\n".join(lines)
        header = f"{len(lines)} changes, the first {limit}:"
        return "\n".join([header, *lines[:limit], f"... and {len(lines) - limit} more"])

    def collapsed(self) -> Changes:
        """These changes with each added or deleted directory as one path: of the paths added
        (deleted), only those whose parent was not added (deleted) too. ``diff(collapse=True)``
        answers the same, without walking the image below deleted directories."""
        return Changes(_top_most(self.added), self.modified, _top_most(self.deleted))


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

    def diff(self, collapse: bool = False) -> Changes:
        """What the box changed in its root, compared with its image, read from the upper layer.

        One rule for every path, files and directories alike: *added* if the box's root has it
        and the image does not, *deleted* if the image has it and the box's root does not,
        *modified* if both have it and the box wrote it (a file copied up, even by ``touch``; a
        file that became a directory, or the reverse). So a directory added or deleted is listed
        with every path below it. ``collapse=True`` lists only the top-most path of each added
        or deleted tree instead (as ``Changes.collapsed()``), and skips walking the image below
        deleted directories: ``rm -rf /usr`` is one path, not a hundred thousand.

        With the host's ``/`` as the image, the image is read from the host's tree, which is
        exact everywhere but under the host's own mount points.

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

        def gone(box_path: str, was_dir: bool) -> None:
            """``box_path`` of the image is no longer in the box's root, nor what was below it."""
            deleted.append(box_path)
            if was_dir and not collapse:
                deleted.extend(self._image_tree(box_path))

        # (upper directory, its box path, how it relates to the image): _MERGED shows the
        # image's entries it does not override; _REPLACED (an opaque directory, or one below
        # it) hides all of them; _NEW has nothing of the image below it.
        stack: list[tuple[str, str, int]] = [(self.upper, "/", _MERGED)]
        while stack:
            upper_dir, box_dir, mode = stack.pop()
            image = self._image_entries(box_dir) if mode == _REPLACED else {}
            present: set[str] = set()
            try:
                names = sorted(os.listdir(upper_dir))
            except FileNotFoundError:
                names = []  # removed by the running box meanwhile
            for name in names:
                box_path = os.path.join(box_dir, name)
                upper_path = os.path.join(upper_dir, name)
                try:
                    info = os.lstat(upper_path)
                except FileNotFoundError:
                    continue  # removed by the running box meanwhile
                is_dir = stat.S_ISDIR(info.st_mode)
                if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:  # a whiteout: deleted
                    if mode == _MERGED and (below := self.stat_below(box_path)) is not None:
                        gone(box_path, stat.S_ISDIR(below.st_mode))
                    continue
                present.add(name)
                if mode == _NEW:
                    below_is: bool | None = None
                elif mode == _REPLACED:
                    below_is = image.get(name)
                else:
                    below = self.stat_below(box_path)
                    below_is = None if below is None else stat.S_ISDIR(below.st_mode)
                if box_path in self.made_by_box:
                    # A mount point the box had to create, not a change of the test's; what
                    # the test put below it is.
                    if is_dir:
                        stack.append((upper_path, box_path, _NEW if below_is is None else _MERGED))
                    continue
                if below_is is None:
                    added.append(box_path)
                    if is_dir and not collapse:
                        stack.append((upper_path, box_path, _NEW))
                elif is_dir and below_is:
                    replaced = mode == _REPLACED or _is_opaque(upper_path)
                    stack.append((upper_path, box_path, _REPLACED if replaced else _MERGED))
                else:
                    modified.append(box_path)
                    if is_dir:  # a file of the image became a directory: all below is new
                        stack.append((upper_path, box_path, _NEW))
                    elif below_is:  # a directory of the image became a file
                        for child, child_is_dir in sorted(self._image_entries(box_path).items()):
                            gone(os.path.join(box_path, child), child_is_dir)
            for name, was_dir in sorted(image.items()):
                if name not in present:
                    gone(os.path.join(box_dir, name), was_dir)
        return Changes(sorted(added), sorted(modified), sorted(deleted))

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
        """Whether a layer hides the layers under it at ``parts``: a whiteout, an opaque
        directory or a file on the way."""
        for depth in range(1, len(parts)):
            path = os.path.join(lower, *parts[:depth])
            try:
                info = os.lstat(path)
            except OSError:
                return False
            if not stat.S_ISDIR(info.st_mode):
                return True
            if _is_opaque(path):
                return True
        return False

    def _image_entries(self, box_path: str) -> dict[str, bool]:
        """The image's entries in its directory ``box_path`` (name: is a directory), read
        through its layers as overlayfs merges them; empty if it has no such directory."""
        parts = [part for part in box_path.split("/") if part]
        found: dict[str, bool | None] = {}  # None: a whiteout, hiding the name below
        for lower in self.lowers:  # top first
            path = os.path.join(lower, *parts)
            try:
                info = os.lstat(path)
            except OSError:
                if parts and self._hides_below(lower, parts):
                    break
                continue
            if not stat.S_ISDIR(info.st_mode):
                break  # a file or a whiteout here hides the directories of the layers below
            if info.st_dev == _device(lower):  # not a host mount point below the host's /
                for name in _listdir(path):
                    if name not in found:
                        try:
                            entry = os.lstat(os.path.join(path, name))
                        except FileNotFoundError:
                            continue  # the host's /, changing under us
                        whiteout = stat.S_ISCHR(entry.st_mode) and entry.st_rdev == 0
                        found[name] = None if whiteout else stat.S_ISDIR(entry.st_mode)
            if _is_opaque(path):
                break
        return {name: is_dir for name, is_dir in found.items() if is_dir is not None}

    def _image_tree(self, box_path: str) -> list[str]:
        """Every path below the image's directory ``box_path``."""
        paths: list[str] = []
        stack = [box_path]
        while stack:
            directory = stack.pop()
            for name, is_dir in self._image_entries(directory).items():
                paths.append(os.path.join(directory, name))
                if is_dir:
                    stack.append(paths[-1])
        return paths


_MERGED, _REPLACED, _NEW = 0, 1, 2  # how an upper directory relates to the image (see diff)


def _top_most(paths: list[str]) -> list[str]:
    """``paths`` without those below another of them."""
    given = set(paths)
    kept = []
    for path in paths:
        parent = os.path.dirname(path)
        while parent not in ("/", "") and parent not in given:
            parent = os.path.dirname(parent)
        if parent in ("/", ""):
            kept.append(path)
    return kept


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _device(path: str) -> int:
    try:
        return os.lstat(path).st_dev
    except OSError:
        return -1


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, _OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False
