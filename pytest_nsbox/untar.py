"""Extract one image layer (a tar stream) into a directory: exactly, and never outside it.

Why not ``tarfile.extractall``: its ``data`` filter refuses device nodes and absolute
symlinks, which every root filesystem has; its ``tar`` filter clears setuid bits, which
``passwd`` needs; and with no filter it follows symlinks and writes where a hostile archive
points. So each member is created here, relative to directory descriptors opened with
``O_NOFOLLOW`` one component at a time: no path is ever resolved through a link, and a member
that would need that is refused. OCI whiteouts become overlayfs ones on the way.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from typing import Any, Self

from .errors import ImageError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
USER_OPAQUE_XATTR = "user.overlay.opaque"  # the same, for an overlay mounted with userxattr
# Whether files get the archive's owners. An ordinary user's cache (rootless boxes) cannot:
# every file is the user's, which is root in their boxes.
_OWNERS = os.geteuid() == 0
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_CHUNK = 1 << 20
_FREE_SPACE_RESERVE = 64 << 20  # leave this much of the cache's filesystem free
_KNOWN_DIRECTORIES = 64  # directory descriptors kept open while extracting

Progress = Callable[[int], None]  # called with the number of bytes just written

try:  # damaged zstd data raises the library's own error
    from zstandard import ZstdError

    _ZSTD_ERRORS: tuple[type[Exception], ...] = (ZstdError,)
except ImportError:  # pragma: no cover - a declared dependency
    _ZSTD_ERRORS = ()
_DAMAGE: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    OSError,
    ValueError,
    *_ZSTD_ERRORS,
)
_NOT_THE_ARCHIVES_FAULT = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.ENOTSUP)
# tarfile's "a block of zeros": the end-of-archive marker, the one proper way for a tar to end.
_END_OF_ARCHIVE: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]


def member_parts(name: str, what: str) -> list[str]:
    """The path components of a member name; refuses absolute paths and ``..``."""
    if name.startswith("/"):
        raise ImageError(
            f"{what}: member {name!r} has an absolute path; a layer holds relative paths only. "
            "Refusing the archive: rebuild it with a tool that writes relative names"
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{what}: member {name!r} climbs out of the layer with '..'; refusing the archive")
    return parts


class LayerExtractor:
    """Writes the members of one layer below ``dest`` (an empty directory)."""

    def __init__(self, dest: str, what: str, progress: Progress | None = None) -> None:
        self.dest = dest
        self.what = what
        self.progress = progress
        self.budget = shutil.disk_usage(dest).free - _FREE_SPACE_RESERVE
        self._root_fd = -1
        self._known: dict[tuple[str, ...], int] = {}
        self._directories: list[tuple[list[str], tarfile.TarInfo]] = []

    def extract(self, stream: Any) -> None:
        """Extract every member of the tar ``stream``; ``ImageError`` if it is damaged or hostile."""
        self._root_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with tarfile.open(fileobj=stream, mode="r|", errorlevel=2, tarinfo=StrictTarInfo) as archive:
                for member in archive:
                    self._member(archive, member)
            # Directories last, deepest first: creating their entries changed their mtimes.
            for parts, member in reversed(self._directories):
                self._set_metadata(parts, member)
        except ImageError as exc:
            if str(exc).startswith(self.what):
                raise
            raise ImageError(f"{self.what}: {exc}") from exc
        except _DAMAGE as exc:
            if isinstance(exc, OSError) and exc.errno in _NOT_THE_ARCHIVES_FAULT:
                raise ImageError(
                    f"{self.what}: cannot write the layer into the cache at {self.dest}: "
                    f"{os.strerror(exc.errno or 0)}; free space, or point --nsbox-cache at a writable "
                    "ext4 or xfs directory"
                ) from exc
            raise ImageError(
                f"{self.what}: the layer is damaged or is not a tar archive ({type(exc).__name__}: {exc}); "
                "export the image again"
            ) from exc
        finally:
            self._forget_parent()
            os.close(self._root_fd)

    # ---------------------------------------------------------------------------- members

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = member_parts(member.name, self.what)
        if not parts:
            return  # "./": the layer's root, which is our directory
        name = parts[-1]
        parent = self._parent(parts, member.name)
        try:
            if name == OPAQUE_MARKER:
                # The directory hides everything below it in lower layers.
                mark_opaque(_fd_path(parent))
            elif name.startswith(WHITEOUT_PREFIX):
                # A deletion: overlayfs spells it as a 0:0 character device of the bare name.
                hidden = name[len(WHITEOUT_PREFIX) :]
                self._clear(parent, hidden, member.name, keep_dir=False)
                os.mknod(hidden, stat.S_IFCHR, 0, dir_fd=parent)
            elif member.isdir():
                self._directory(parent, name, parts, member)
            elif member.isreg():
                self._regular(archive, parent, name, member)
            elif member.issym():
                self._clear(parent, name, member.name, keep_dir=False)
                os.symlink(member.linkname, name, dir_fd=parent)
                self._set_owner_and_times(parent, name, member)
            elif member.islnk():
                self._hardlink(parent, name, member)
            elif (member.ischr() or member.isblk()) and not _OWNERS:
                pass  # rootless: no device node can be made, and a box has its own /dev
            elif member.ischr() or member.isblk() or member.isfifo():
                self._clear(parent, name, member.name, keep_dir=False)
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
                device = os.makedev(member.devmajor, member.devminor) if not member.isfifo() else 0
                os.mknod(name, kind | 0o600, device, dir_fd=parent)
                self._set_owner_and_times(parent, name, member, mode=True)
            else:
                raise ImageError(
                    f"{self.what}: member {member.name!r} has tar type {member.type!r}, which a root "
                    "filesystem cannot hold; refusing the archive"
                )
        finally:
            os.close(parent)

    def _parent(self, parts: list[str], name: str) -> int:
        """An ``O_PATH`` descriptor of the member's directory, made as needed, never via a link.

        Recently walked directories are remembered (members come grouped by directory), so a
        walk starts from the deepest one known; the memory is dropped whenever a directory is
        removed.
        """
        key = tuple(parts[:-1])
        start = len(key)
        while start and key[:start] not in self._known:
            start -= 1
        base = self._known[key[:start]] if start else self._root_fd
        fd = os.dup(base)
        for depth in range(start, len(key)):
            fd = self._step(fd, key[depth], name)  # closes the fd it is given, even on error
            try:
                self._remember(key[: depth + 1], fd)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _step(self, fd: int, component: str, name: str) -> int:
        """Open (or make) one directory below ``fd``, refusing links; closes ``fd``."""
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                child = os.open(component, flags, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(component, 0o755, dir_fd=fd)  # tar files may omit parent entries
                child = os.open(component, flags, dir_fd=fd)
        except (NotADirectoryError, OSError) as exc:
            raise ImageError(
                f"{self.what}: member {name!r} goes through {component!r}, which is a symlink or a file "
                "in this layer; extraction never follows links: refusing the archive"
            ) from exc
        finally:
            os.close(fd)
        return child

    def _remember(self, key: tuple[str, ...], fd: int) -> None:
        if key in self._known:
            return
        if len(self._known) >= _KNOWN_DIRECTORIES:
            os.close(self._known.pop(next(iter(self._known))))  # the oldest
        self._known[key] = os.dup(fd)

    def _forget_parent(self) -> None:
        for fd in self._known.values():
            os.close(fd)
        self._known.clear()

    def _clear(self, parent: int, name: str, member_name: str, keep_dir: bool) -> None:
        """Remove what an earlier member of this layer left at ``name`` (later members win)."""
        try:
            info = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            if keep_dir:
                return
            self._forget_parent()
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError as exc:
                raise ImageError(
                    f"{self.what}: member {member_name!r} replaces a non-empty directory; "
                    "refusing the archive"
                ) from exc
        else:
            os.unlink(name, dir_fd=parent)

    def _directory(self, parent: int, name: str, parts: list[str], member: tarfile.TarInfo) -> None:
        self._clear(parent, name, member.name, keep_dir=True)
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        self._directories.append((parts, member))

    def _regular(self, archive: tarfile.TarFile, parent: int, name: str, member: tarfile.TarInfo) -> None:
        if member.size > self.budget:
            raise ImageError(
                f"{self.what}: member {member.name!r} claims {member.size} bytes, more than the "
                f"{max(self.budget, 0)} bytes left on the cache's filesystem ({self.dest}); "
                "free space or point --nsbox-cache elsewhere"
            )
        self._clear(parent, name, member.name, keep_dir=False)
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
        )
        try:
            source = archive.extractfile(member)
            written = 0
            if source is not None:
                while chunk := source.read(_CHUNK):
                    os.write(fd, chunk)
                    written += len(chunk)
                    if self.progress:
                        self.progress(len(chunk))
            if written != member.size:
                raise ImageError(
                    f"{self.what}: member {member.name!r} is cut short; the archive is truncated"
                )
            self.budget -= written
            if _OWNERS:
                os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid/setgid
            for key, value in _xattrs(member):
                try:
                    os.setxattr(fd, key, value)
                except OSError as exc:
                    _xattr_failed(exc, key, member)
            os.utime(fd, ns=(_ns(member), _ns(member)))
        finally:
            os.close(fd)

    def _hardlink(self, parent: int, name: str, member: tarfile.TarInfo) -> None:
        target = member_parts(member.linkname, self.what)
        if not target:
            raise ImageError(f"{self.what}: member {member.name!r} is a hard link to the layer's root")
        source_parent = self._parent(target, member.name)
        try:
            self._clear(parent, name, member.name, keep_dir=False)
            try:
                os.link(target[-1], name, src_dir_fd=source_parent, dst_dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError as exc:
                raise ImageError(
                    f"{self.what}: member {member.name!r} is a hard link to {member.linkname!r}, which is "
                    "not in this layer; refusing the archive"
                ) from exc
        finally:
            os.close(source_parent)

    # --------------------------------------------------------------------------- metadata

    def _set_metadata(self, parts: list[str], member: tarfile.TarInfo) -> None:
        parent = self._parent(parts, member.name)
        try:
            self._set_owner_and_times(parent, parts[-1], member, mode=True)
        finally:
            os.close(parent)

    def _set_owner_and_times(
        self, parent: int, name: str, member: tarfile.TarInfo, mode: bool = False
    ) -> None:
        if _OWNERS:
            os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        if mode:
            os.chmod(name, member.mode & 0o7777, dir_fd=parent)  # after chown, which clears setuid
        path = f"{_fd_path(parent)}/{name}"
        for key, value in _xattrs(member):
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as exc:
                _xattr_failed(exc, key, member)
        os.utime(name, ns=(_ns(member), _ns(member)), dir_fd=parent, follow_symlinks=False)


class StrictTarInfo(tarfile.TarInfo):
    """A TarInfo that calls a broken header a broken archive.

    Why: past its first member, ``tarfile`` takes a truncated, garbled or missing header for
    the end of the archive and stops without a word, and a root filesystem tarball has no
    digest that would catch the files it never read.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except _END_OF_ARCHIVE:
            raise
        except tarfile.HeaderError as exc:
            raise ImageError(
                f"the archive is cut short or damaged at byte {tarfile_.offset} ({exc}): export it again"
            ) from exc


def mark_opaque(path: str) -> None:
    """Mark a cached layer's directory opaque for the overlays that stack it.

    Root's cache gets ``trusted.overlay.opaque``, which overlay reads when the host's root
    mounts it. An ordinary user's (rootless boxes) gets ``user.overlay.opaque``: the user cannot
    set ``trusted.*``, and their boxes mount overlay in a user namespace (``userxattr``), which
    reads ``user.overlay.*`` only. Why not both in root's cache: a box of the host's root would
    see the ``user.*`` mark as an ordinary attribute of the directory (and its snapshots keep it).
    """
    os.setxattr(path, OPAQUE_XATTR if os.geteuid() == 0 else USER_OPAQUE_XATTR, b"y")


def _xattr_failed(exc: OSError, key: str, member: tarfile.TarInfo) -> None:
    """Skip an extended attribute the cache's filesystem cannot hold, as Docker does.

    ``user.*`` attributes cannot sit on symlinks, and tmpfs before Linux 6.6 holds none;
    losing them is better than refusing the image. Any other failure is real.
    """
    if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM) and not key.startswith("trusted.overlay."):
        return
    raise exc


def _xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """Extended attributes from PAX headers (``SCHILY.xattr.security.capability`` ...)."""
    return [
        (key[len(_XATTR_PAX_PREFIX) :], value.encode("utf-8", "surrogateescape"))
        for key, value in member.pax_headers.items()
        if key.startswith(_XATTR_PAX_PREFIX)
    ]


def _ns(member: tarfile.TarInfo) -> int:
    return int(member.mtime * 1_000_000_000)


def _fd_path(fd: int) -> str:
    """A path through which calls that take no dir_fd (setxattr) reach an ``O_PATH`` fd's file."""
    return f"/proc/self/fd/{fd}"
