"""One layer directory <-> one tar stream, the same bytes every time.

A layer directory (the cache's ``l/<digest>``, or a box's upper directory) holds overlayfs's
spelling of an image layer: deletions are 0:0 character devices, a directory that hides
what lies below has ``trusted.overlay.opaque=y``. An image archive spells the same thing the
OCI way: ``.wh.<name>`` and ``.wh..wh..opq`` files. ``walk`` reads a directory in one fixed
order and yields the tar entries the OCI spelling calls for, so that

- ``write_tar`` (``Image.save``) writes a layer's tar;
- ``copy_layer`` (``Box.snapshot``) copies a box's upper directory into the cache *and*
  computes, on the way, the digest of the tar ``write_tar`` would write from the copy: the
  snapshot's content address (its ``diff_id``) costs no second pass over the data;
- ``squash`` merges several layers into one (a deep chain of snapshots).

Why a tar of our own rather than ``tarfile.add``: the digest must not depend on anything but
the files (no user names looked up, no record padding, whiteouts with fixed metadata, entries
sorted), or the same snapshot would get a new address on every run.

Every walk goes by directory descriptors opened with ``O_NOFOLLOW``: a box's upper directory
is written by the box, and a symlink it planted must never steer us onto the host's files.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from .errors import ImageError
from .untar import OPAQUE_MARKER, OPAQUE_XATTR, USER_OPAQUE_XATTR, WHITEOUT_PREFIX, mark_opaque

BLOCK = 512
_CHUNK = 1 << 20
_END = b"\0" * (2 * BLOCK)
_OVERLAY_XATTRS = "trusted.overlay."
_USER_OVERLAY_XATTRS = "user.overlay."  # overlay's own in a user namespace (userxattr)
USERNS_RANGE = 65536  # ids a userns box maps (idmap.RANGE_SIZE)
# Overlay features that spell a change in a way an image layer cannot: a snapshot refuses them.
_UNPORTABLE = ("trusted.overlay.redirect", "trusted.overlay.metacopy")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Entry:
    """One tar entry of a layer, and where it came from.

    ``info`` is what the tar says; ``parent_fd``/``name`` reach the file (valid only while the
    walk is at this entry); ``kind`` is one of dir, file, hardlink, symlink, node, whiteout,
    opaque (the marker entry after an opaque directory); ``xattrs`` are those the tar carries.
    """

    info: tarfile.TarInfo
    kind: str
    parent_fd: int
    name: str
    rel: str
    stat: os.stat_result | None
    xattrs: dict[str, bytes]

    def header(self) -> bytes:
        return self.info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def walk(
    root: str, exclude: frozenset[str] = frozenset(), what: str = "", shift: tuple[int, int] | None = None
) -> Iterator[Entry]:
    """The entries of the layer directory ``root``, depth first, names sorted.

    ``exclude`` names paths (relative, no leading slash) left out, with all below them:
    mount points a box made for itself, and the directories copied up only to hold them.
    ``shift``: ``root`` is the upper layer of a ``userns`` box whose ids start at these host
    (uid, gid): owners are given as the box sees them, and overlay's opaque marks are read
    from ``user.overlay.*``, where overlay keeps them in a user namespace.
    """
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        yield from _walk_dir(root_fd, "", {}, exclude, what or root, shift)
    finally:
        os.close(root_fd)


def unshift(host_id: int, base: int) -> int:
    """A host id found in a ``userns`` box's upper layer as the box sees it: its offset in
    the box's range, or 65534 (nobody, as the kernel shows it) for an id outside it."""
    return host_id - base if base <= host_id < base + USERNS_RANGE else 65534


def _walk_dir(
    dir_fd: int,
    prefix: str,
    links: dict[tuple[int, int], str],
    exclude: frozenset[str],
    what: str,
    shift: tuple[int, int] | None = None,
) -> Iterator[Entry]:
    for name in sorted(os.listdir(dir_fd)):
        rel = prefix + name
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mode = info.st_mode
        if rel in exclude:
            continue
        if stat.S_ISSOCK(mode):
            continue  # a socket is a running program's, not a file an image can carry
        xattrs = _xattrs(dir_fd, name, mode, rel, what)
        opaque = xattrs.pop(OPAQUE_XATTR, None) == b"y"
        user_opaque = xattrs.pop(USER_OPAQUE_XATTR, None) == b"y"
        # user.overlay.* is overlay's own only in a user namespace (shift: the layer of a userns
        # box, or the cache's second mark); elsewhere it is a copy-up's, never an image's.
        if shift is not None or (user_opaque and os.geteuid() != 0):
            opaque = opaque or user_opaque
        xattrs = {key: value for key, value in xattrs.items() if not key.startswith(_USER_OVERLAY_XATTRS)}
        if stat.S_ISCHR(mode) and info.st_rdev == 0:
            yield Entry(_fixed(prefix + WHITEOUT_PREFIX + name), "whiteout", dir_fd, name, rel, info, {})
            continue
        tar = _tarinfo(rel, info, xattrs)
        if shift is not None:
            tar.uid, tar.gid = unshift(info.st_uid, shift[0]), unshift(info.st_gid, shift[1])
        if stat.S_ISDIR(mode):
            tar.name = rel + "/"
            tar.type = tarfile.DIRTYPE
            yield Entry(tar, "dir", dir_fd, name, rel, info, xattrs)
            if opaque:
                yield Entry(_fixed(rel + "/" + OPAQUE_MARKER), "opaque", dir_fd, name, rel, info, {})
            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                yield from _walk_dir(child, rel + "/", links, exclude, what, shift)
            finally:
                os.close(child)
            continue
        if stat.S_ISREG(mode):
            key = (info.st_dev, info.st_ino)
            if info.st_nlink > 1 and key in links:
                tar.type, tar.linkname, tar.size = tarfile.LNKTYPE, links[key], 0
                yield Entry(tar, "hardlink", dir_fd, name, rel, info, xattrs)
                continue
            if info.st_nlink > 1:
                links[key] = rel
            tar.type, tar.size = tarfile.REGTYPE, info.st_size
            yield Entry(tar, "file", dir_fd, name, rel, info, xattrs)
        elif stat.S_ISLNK(mode):
            tar.type, tar.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
            yield Entry(tar, "symlink", dir_fd, name, rel, info, xattrs)
        else:  # character and block devices, fifos
            tar.type = (
                tarfile.CHRTYPE
                if stat.S_ISCHR(mode)
                else tarfile.BLKTYPE
                if stat.S_ISBLK(mode)
                else tarfile.FIFOTYPE
            )
            if not stat.S_ISFIFO(mode):
                tar.devmajor, tar.devminor = os.major(info.st_rdev), os.minor(info.st_rdev)
            yield Entry(tar, "node", dir_fd, name, rel, info, xattrs)


def _tarinfo(rel: str, info: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
    tar = tarfile.TarInfo(rel)
    tar.mode = stat.S_IMODE(info.st_mode)
    tar.uid, tar.gid = info.st_uid, info.st_gid
    tar.uname = tar.gname = ""
    tar.mtime = info.st_mtime_ns // 1_000_000_000
    tar.size = 0
    if xattrs:
        tar.pax_headers = {
            "SCHILY.xattr." + key: value.decode("utf-8", "surrogateescape")
            for key, value in sorted(xattrs.items())
        }
    return tar


def _fixed(name: str) -> tarfile.TarInfo:
    """A whiteout or opaque marker: an empty file with fixed metadata, so that a layer's tar
    depends only on what it deletes (extraction makes device nodes of them, with no times)."""
    tar = tarfile.TarInfo(name)
    tar.mode, tar.uid, tar.gid, tar.mtime, tar.uname, tar.gname = 0o600, 0, 0, 0, "", ""
    return tar


def _xattrs(dir_fd: int, name: str, mode: int, rel: str, what: str) -> dict[str, bytes]:
    if stat.S_ISLNK(mode):
        return {}  # user xattrs cannot be set on symlinks, and nothing else is kept there
    path = f"/proc/self/fd/{dir_fd}/{name}"
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise
    found: dict[str, bytes] = {}
    for key in keys:
        if key.startswith(_UNPORTABLE):
            raise ImageError(
                f"{what}: /{rel} carries {key}: overlayfs recorded a renamed directory or a "
                "metadata-only copy, which no image layer can hold; mount overlay with "
                "redirect_dir=off and metacopy=off (the defaults) on this host"
            )
        if key.startswith(_OVERLAY_XATTRS) and key != OPAQUE_XATTR:
            continue  # overlay's own bookkeeping (origin, impure, ...), meaningless elsewhere
        try:
            found[key] = os.getxattr(path, key, follow_symlinks=False)
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------------- writing


def write_tar(root: str, out: IO[bytes], what: str = "") -> tuple[str, int]:
    """Write the layer directory ``root`` to ``out`` as a tar; its sha256 digest and size."""
    digest = hashlib.sha256()
    size = 0

    def emit(data: bytes | memoryview) -> None:
        nonlocal size
        digest.update(data)
        out.write(data)
        size += len(data)

    for entry in walk(root, what=what):
        emit(entry.header())
        if entry.kind == "file":
            written = _stream_file(entry, emit)
            emit(b"\0" * (-written % BLOCK))
    emit(_END)
    return "sha256:" + digest.hexdigest(), size


def tar_digest(root: str, what: str = "") -> tuple[str, int]:
    """The digest and size of the tar ``write_tar`` would write, without writing it."""

    class _Sink:
        def write(self, data: bytes) -> int:
            return len(data)

    return write_tar(root, _Sink(), what)  # type: ignore[arg-type]


def _stream_file(entry: Entry, emit: object) -> int:
    """Pass the file's bytes to ``emit``; exactly ``info.size`` of them (a file that grew
    or shrank meanwhile is cut or padded, so the tar stays well formed)."""
    fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=entry.parent_fd)
    want = entry.info.size
    done = 0
    try:
        while done < want:
            chunk = os.read(fd, min(_CHUNK, want - done))
            if not chunk:
                break
            emit(chunk)  # type: ignore[operator]
            done += len(chunk)
    finally:
        os.close(fd)
    if done < want:
        emit(b"\0" * (want - done))  # type: ignore[operator]
    return want


# --------------------------------------------------------------------------------- copying


def copy_layer(
    src: str,
    dst: str,
    exclude: frozenset[str] = frozenset(),
    what: str = "",
    shift: tuple[int, int] | None = None,
) -> tuple[str, int]:
    """Copy the layer directory ``src`` into the empty directory ``dst``, exactly (owners,
    modes with setuid, xattrs, hard links, devices, whiteouts, opaque directories, times);
    ``shift``: see ``walk`` (the copy's owners are the box's ids, as an image's are).

    Returns the digest and size of the tar of the copy (``write_tar(dst)``), computed from
    the bytes as they pass: one read of the data in all.
    """
    digest = hashlib.sha256()
    size = 0
    made: dict[str, str] = {}  # rel of a hard link's first path -> its path in dst
    directories: list[tuple[str, os.stat_result]] = []
    for entry in walk(src, exclude, what, shift):
        header = entry.header()
        digest.update(header)
        size += len(header)
        target = os.path.join(dst, entry.rel)
        if entry.kind == "dir":
            os.mkdir(target, 0o700)
            _set_metadata(target, entry)
            assert entry.stat is not None
            directories.append((target, entry.stat))
        elif entry.kind == "opaque":
            mark_opaque(target)
        elif entry.kind == "whiteout":
            os.mknod(target, stat.S_IFCHR, 0)
        elif entry.kind == "file":
            written = _copy_file(entry, target, digest)
            size += written + (-written % BLOCK)
            digest.update(b"\0" * (-written % BLOCK))
            _set_metadata(target, entry)
            made[entry.rel] = target
        elif entry.kind == "hardlink":
            os.link(made[entry.info.linkname], target)
        elif entry.kind == "symlink":
            os.symlink(entry.info.linkname, target)
            _set_metadata(target, entry)
        else:
            assert entry.stat is not None
            os.mknod(target, stat.S_IFMT(entry.stat.st_mode) | 0o600, entry.stat.st_rdev)
            _set_metadata(target, entry)
    for target, info in reversed(directories):  # their entries changed their times
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    digest.update(_END)
    return "sha256:" + digest.hexdigest(), size + len(_END)


def _copy_file(entry: Entry, target: str, digest: hashlib._Hash) -> int:
    source = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=entry.parent_fd)
    want = entry.info.size
    done = 0
    try:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            buffer = bytearray(min(_CHUNK, max(want, 1)))
            view = memoryview(buffer)
            while done < want:
                count = os.readv(source, [view[: min(len(buffer), want - done)]])
                if count == 0:
                    break
                digest.update(view[:count])
                os.write(out, view[:count])
                done += count
            if done < want:  # it shrank since we looked: the tar said its old size
                pad = b"\0" * (want - done)
                digest.update(pad)
                os.write(out, pad)
        finally:
            os.close(out)
    finally:
        os.close(source)
    return want


def _set_metadata(target: str, entry: Entry) -> None:
    info = entry.stat
    assert info is not None
    os.chown(target, entry.info.uid, entry.info.gid, follow_symlinks=False)  # the tar's: unshifted
    for key, value in entry.xattrs.items():
        os.setxattr(target, key, value, follow_symlinks=False)
    if not stat.S_ISLNK(info.st_mode):
        os.chmod(target, stat.S_IMODE(info.st_mode))  # after chown, which clears setuid
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)


# --------------------------------------------------------------------------------- squashing


def squash(layers: list[str], dst: str, what: str = "") -> None:
    """Merge ``layers`` (bottom first) into the empty directory ``dst``: one layer that means,
    over the layers below them, what they meant together.

    Why: overlayfs stacks at most a few hundred layers and its options fit in one page; a
    chain of snapshots of snapshots is folded into one layer before it gets there.
    """
    for layer in layers:
        directories: list[tuple[str, os.stat_result]] = []
        made: dict[str, str] = {}
        for entry in walk(layer, what=what):
            target = os.path.join(dst, entry.rel)
            if entry.kind == "opaque":
                _clear_directory(target)
                mark_opaque(target)
                continue
            existing = _lstat(target)
            if entry.kind == "dir":
                was_whiteout = existing is not None and _is_whiteout(existing)
                if existing is not None and not stat.S_ISDIR(existing.st_mode):
                    os.unlink(target)
                    existing = None
                if existing is None:
                    os.mkdir(target, 0o700)
                if was_whiteout:
                    # A directory over a deletion: what lay below stays hidden.
                    mark_opaque(target)
                _set_metadata(target, entry)
                assert entry.stat is not None
                directories.append((target, entry.stat))
                continue
            if existing is not None:
                _remove(target, existing)
            if entry.kind == "whiteout":
                os.mknod(target, stat.S_IFCHR, 0)
            elif entry.kind == "file":
                _copy_file(entry, target, hashlib.sha256())
                _set_metadata(target, entry)
                made[entry.rel] = target
            elif entry.kind == "hardlink":
                os.link(made.get(entry.info.linkname, os.path.join(dst, entry.info.linkname)), target)
            elif entry.kind == "symlink":
                os.symlink(entry.info.linkname, target)
                _set_metadata(target, entry)
            else:
                assert entry.stat is not None
                os.mknod(target, stat.S_IFMT(entry.stat.st_mode) | 0o600, entry.stat.st_rdev)
                _set_metadata(target, entry)
        for target, info in reversed(directories):
            os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _is_whiteout(info: os.stat_result) -> bool:
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0


def _remove(path: str, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _clear_directory(path: str) -> None:
    for name in os.listdir(path):
        child = os.path.join(path, name)
        _remove(child, os.lstat(child))
