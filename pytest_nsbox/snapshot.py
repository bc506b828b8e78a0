"""``Box.snapshot()``: a running box's root as a new image, its changes one more layer.

The box's changes are exactly its overlay's upper directory (added and modified files,
deletions as whiteouts, opaque directories). That directory is copied into the layer cache
(``layer_tar.copy_layer``), which names the new layer by the digest of its tar: the same
changes made twice are stored once, and a saved image carries the same layer.

Why freeze: a process writing while the copy runs would leave a file half old, half new in
the layer. The box's cgroup is frozen for the copy (the box's processes stop where they
stand and notice nothing but lost time), then thawed.

A chain of snapshots of snapshots grows one layer per link; past ``MAX_SNAPSHOT_LAYERS`` the
links are folded into one layer (``layer_tar.squash``), so that overlayfs's limits (a page of
options, a few hundred layers) are never reached however deep a chain gets.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

from . import layer_tar
from .cgroups import Cgroup
from .errors import BoxError, CgroupError, ImageError
from .image import Image
from .layers import LayerInfo, LayerStore
from .overlay import OverlayRoot
from .untar import OPAQUE_XATTR

MAX_SNAPSHOT_LAYERS = 16
_EMPTY_LAYER_SIZE = 1024  # a tar with no entries: its end-of-archive blocks alone


def snapshot(
    box_id: str,
    root: OverlayRoot,
    image: Image,
    cgroup: Cgroup,
    cache: str | None,
    shift: tuple[int, int] | None = None,
) -> Image:
    """The image of a running box's root (``root``, over ``image``) as it is now; its
    processes (``cgroup``) are frozen for the copy. The new layer goes into ``cache``.

    ``shift``: the host (uid, gid) a ``userns`` box's ids start at. Its upper layer holds
    host ids (base + the box's id): the copy gives them back as the box's (its root's files
    are root's again, as in any image), so the snapshot boots in any box, userns or not."""
    store = LayerStore(cache)
    what = f"box {box_id}"
    exclude = _made_by_box(root, shift)
    with _frozen(cgroup, box_id):
        layer = store.add_layer(
            lambda target: layer_tar.copy_layer(root.upper, target, exclude, what, shift), what
        )
    if layer.size <= _EMPTY_LAYER_SIZE or _only_copied_up_directories(layer.path, root):
        return _renamed(image, box_id)  # nothing changed: the box's own image is its snapshot
    chain = image.lowers[: image.snapshots]  # the layers earlier snapshots added, top first
    if layer.path in image.lowers[image.snapshots :]:
        raise ImageError(
            f"box {box_id}: its changes are byte for byte a layer its image has already "
            f"({layer.diff_id}); overlayfs cannot stack a layer twice. Change one more file first"
        )
    if image.snapshots + 1 > MAX_SNAPSHOT_LAYERS or layer.path in chain:
        # Fold the chain (and the new layer) into one; a layer met twice is folded too, as
        # overlayfs refuses a directory listed twice.
        folded = _fold(store, [*reversed(chain), layer.path], what)
        base = image.lowers[image.snapshots :]
        base_ids = image.diff_ids[: len(image.diff_ids) - image.snapshots]
        return Image(
            _reference(image, box_id),
            (folded.path, *base),
            image.config,
            (*base_ids, folded.diff_id),
            image.base_dir,
            1,
            image.tags,
        )
    return Image(
        _reference(image, box_id),
        (layer.path, *image.lowers),
        image.config,
        (*image.diff_ids, layer.diff_id),
        image.base_dir,
        image.snapshots + 1,
        image.tags,
    )


def _made_by_box(root: OverlayRoot, shift: tuple[int, int] | None = None) -> frozenset[str]:
    """Paths of the upper layer that are the box's doing, not the test's: the files it made
    as mount points (``/etc/hosts`` in an image without one), and the directories that hold
    nothing else: mount points it made (a ``tmpfs=`` target), and those the image has already,
    with the same mode and owner, copied up to hold them (with a new mtime, they would make
    every snapshot of an unchanged box differ)."""
    made = {path.strip("/") for path in root.made_by_box}
    excluded: set[str] = set()
    directories: set[str] = set()
    for rel in made:
        try:
            info = os.lstat(os.path.join(root.upper, rel))
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            directories.add(rel)
        else:
            excluded.add(rel)
    parents = {
        "/".join(parts[:depth]) for parts in (p.split("/") for p in made) for depth in range(1, len(parts))
    }
    for rel in sorted(directories | parents, key=lambda rel: -rel.count("/")):  # deepest first
        path = os.path.join(root.upper, rel)
        try:
            info = os.lstat(path)
            children = os.listdir(path)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or _is_opaque(path, shift is not None):
            continue
        if not all(f"{rel}/{child}" in excluded for child in children):
            continue  # it holds a change of the test's
        below = root.stat_below("/" + rel)
        if below is None:
            if rel in directories:
                excluded.add(rel)  # a mount point the image lacked
        elif (below.st_mode, below.st_uid, below.st_gid) == (info.st_mode, *_owner(info, shift)):
            excluded.add(rel)
    return frozenset(excluded)


def _only_copied_up_directories(layer: str, root: OverlayRoot) -> bool:
    """Whether the layer holds nothing but directories the image has already, with the same
    mode and owner: what a box leaves in its upper layer by making its mount points (their
    parents are copied up), not a change of its own."""
    for top, dirs, files in os.walk(layer):
        if files:
            return False
        for name in dirs:
            path = os.path.join(top, name)
            below = root.stat_below("/" + os.path.relpath(path, layer))
            info = os.lstat(path)
            if below is None or not stat.S_ISDIR(info.st_mode) or _is_opaque(path):
                return False
            if (below.st_mode, below.st_uid, below.st_gid) != (info.st_mode, info.st_uid, info.st_gid):
                return False
    return True


def _owner(info: os.stat_result, shift: tuple[int, int] | None) -> tuple[int, int]:
    """(uid, gid) of a file of the upper layer as its box sees it (see ``snapshot``)."""
    if shift is None:
        return info.st_uid, info.st_gid
    return layer_tar.unshift(info.st_uid, shift[0]), layer_tar.unshift(info.st_gid, shift[1])


def _is_opaque(path: str, userns: bool = False) -> bool:
    for key in (layer_tar.USER_OPAQUE_XATTR, OPAQUE_XATTR) if userns else (OPAQUE_XATTR,):
        try:
            if os.getxattr(path, key, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def _fold(store: LayerStore, layers: list[str], what: str) -> LayerInfo:
    def build(target: str) -> tuple[str, int]:
        layer_tar.squash(layers, target, what)
        return layer_tar.tar_digest(target, what)

    return store.add_layer(build, f"{what} (a chain of {len(layers)} snapshots, folded)")


@contextlib.contextmanager
def _frozen(cgroup: Cgroup, box_id: str) -> Iterator[None]:
    """Freeze the box's cgroup for the block, if it has one; a box without (a host with no
    usable cgroups) is copied as it runs."""
    if cgroup.driver is None or cgroup.is_frozen():
        yield  # no freezer here, or the caller froze it already: leave it as it is
        return
    try:
        cgroup.freeze()
    except CgroupError as exc:
        raise BoxError(f"box {box_id}: cannot freeze it for a consistent snapshot: {exc}") from exc
    try:
        yield
    finally:
        cgroup.thaw()


def _reference(image: Image, box_id: str) -> str:
    """``snapshot of box ID, over debian.tar``: the box, and the image the chain started from."""
    origin = image.reference.split(", over ", 1)[-1]
    return f"snapshot of box {box_id}, over {origin}"


def _renamed(image: Image, box_id: str) -> Image:
    return Image(
        _reference(image, box_id),
        image.lowers,
        image.config,
        image.diff_ids,
        image.base_dir,
        image.snapshots,
        image.tags,
    )
