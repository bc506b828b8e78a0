"""Reading and writing files of a running box from the host, without escaping it.

The host opens box paths relative to ``/proc/PID/root`` with ``openat2(RESOLVE_IN_ROOT)``.
Why not plain ``open("/proc/PID/root/etc/x")``: an absolute symlink inside the box (say
``/etc/x -> /etc/shadow``) would then resolve against the *host's* root, and a test helper
would write to the host. With ``RESOLVE_IN_ROOT`` the kernel treats the box root as ``/``.

Copies go by descriptors on both sides, never by a path walk a box process can steer:

- ``copy_out`` opens each box entry once (``O_PATH|O_NOFOLLOW``), decides by the descriptor's
  type, reads a regular file through that same descriptor and descends into a directory from
  it; on the host it creates every name relative to its parent directory's descriptor, with
  ``O_NOFOLLOW`` and ``O_EXCL``, so a name the box flips into a symlink mid-copy is copied as the
  symlink it was when looked at and never followed on the host.
- ``copy_in`` reads the host tree the same way; the box side resolves every path with
  ``RESOLVE_IN_ROOT``, so a box directory flipped into a symlink (absolute, ``../..``,
  ``/proc/1/root``: a magic link, refused by ``RESOLVE_NO_MAGICLINKS``) redirects the write
  inside the box at most, as a write by a box process would be.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import re
import stat
import threading
from collections.abc import Iterator

from . import syscalls
from .syscalls import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS

_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
_CHUNK = 1 << 20
_MAGIC = re.compile(r"[*?[]")  # what makes a path component a pattern (as glob.has_magic)


_libc = ctypes.CDLL(None, use_errno=True)
_inside = threading.local()  # .owner: the ids this thread creates files as, within _filesystem_ids


@contextlib.contextmanager
def _filesystem_ids(owner: tuple[int, int] | None) -> Iterator[None]:
    """Within: this thread creates files as host (uid, gid) ``owner`` (a ``userns`` box's root),
    with the host root's file capabilities kept; None: as it is.

    Why: a ``userns`` box's overlay belongs to its user namespace, which does not map the
    host's root: a file the host's root creates there would have no owner the box can name,
    and the kernel refuses it (EOVERFLOW). setfsuid is per thread, and undone at once.
    """
    if owner is None or getattr(_inside, "owner", None) == owner:
        yield  # as it is, or already so (a copy_in makes directories)
        return
    capabilities = syscalls.capability_sets()
    _libc.setfsgid(owner[1])
    _libc.setfsuid(owner[0])
    try:
        # setfsuid to a non-zero id clears the file capabilities (CAP_DAC_OVERRIDE ...) from
        # the effective set: back, so that the host writes wherever the box's root could.
        syscalls.set_capability_sets(*capabilities)
        _inside.owner = owner
        yield
    finally:
        _inside.owner = None
        _libc.setfsuid(0)
        _libc.setfsgid(0)
        syscalls.set_capability_sets(*capabilities)


class BoxFiles:
    """File operations on one box's root, given an ``O_PATH`` descriptor of it; ``owner``:
    the host (uid, gid) files the host creates in it belong to (a ``userns`` box's root)."""

    def __init__(self, root_fd: int, owner: tuple[int, int] | None = None) -> None:
        self.root_fd = root_fd
        self.owner = owner

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """A descriptor for a box path, resolved inside the box (symlinks followed there)."""
        try:
            return syscalls.openat2(self.root_fd, _relative(path), flags, mode, _RESOLVE)
        except OSError as exc:
            # OSError(errno, ...) becomes FileNotFoundError, PermissionError, ... as callers
            # of a file API expect; the message says the path is the box's.
            raise OSError(exc.errno, f"{os.strerror(exc.errno or 0)} (in the box)", path) from None

    def exists(self, path: str) -> bool:
        try:
            os.close(self.open(path, os.O_PATH))
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False
            raise
        return True

    def resolve(self, path: str) -> str:
        """``path`` with every symlink on it resolved inside the box: an absolute box path that
        names no symlink, so that ``/proc/PID/root`` + it cannot be steered to a host file by an
        absolute symlink (``/etc/x -> /etc/shadow``) or one climbing with ``..``.

        Components that do not exist are kept as given (a path about to be created).
        """
        pending = [part for part in path.split("/") if part not in ("", ".")]
        pending.reverse()
        done: list[str] = []
        links = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if done:
                    done.pop()
                continue
            try:
                fd = self.open("/".join([*done, part]), os.O_PATH | os.O_NOFOLLOW)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
                done.append(part)
                done.extend(reversed(pending))
                break
            try:
                if not stat.S_ISLNK(os.fstat(fd).st_mode):
                    done.append(part)
                    continue
                links += 1
                if links > 40:  # the kernel's own limit on symlinks in one lookup
                    raise OSError(errno.ELOOP, "too many levels of symbolic links (in the box)", path)
                target = os.readlink("", dir_fd=fd)
            finally:
                os.close(fd)
            if target.startswith("/"):
                done.clear()
            pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
        return "/" + "/".join(done)

    def read_bytes(self, path: str) -> bytes:
        fd = self.open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def read_tail(self, path: str, limit: int) -> tuple[bytes, int]:
        """The last ``limit`` bytes of a regular file (read from there: a log of gigabytes
        costs what its end does) and its whole size. A fifo, a device or a directory is
        refused without being opened for reading (``OSError``, EINVAL or EISDIR)."""
        entry = self.open(path, os.O_PATH)
        try:
            mode = os.fstat(entry).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, "a directory (in the box)", path)
            if not stat.S_ISREG(mode):  # opening a fifo would wait for a writer
                raise OSError(errno.EINVAL, "not a regular file (in the box)", path)
            fd = _reopened(entry)  # the inode checked above, whatever the name means by now
        finally:
            os.close(entry)
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - limit)
            return os.pread(fd, size - start, start), size
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        """The names in a box directory (resolved inside the box), sorted."""
        fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def lstat(self, path: str) -> os.stat_result:
        """``lstat`` of a box path: symlinks on the way are followed inside the box, the last
        component is not."""
        fd = self.open(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory in the box (a symlink to one counts; False if absent)."""
        return self._is_dir(path)

    def glob(self, pattern: str) -> list[str]:
        """The box paths matching ``pattern``, sorted: ``*``, ``?`` and ``[...]`` match within
        one component, as ``glob.glob`` does (a leading ``.`` only where the pattern has one).
        Directories are listed inside the box, never through a host path."""
        found = ["/"]
        for part in [part for part in pattern.split("/") if part]:
            if not _MAGIC.search(part):
                found = [os.path.join(path, part) for path in found]
                continue
            matched: list[str] = []
            for directory in found:
                try:
                    names = self.listdir(directory)
                except OSError:
                    continue
                for name in names:
                    if fnmatch.fnmatchcase(name, part) and (part.startswith(".") or not name.startswith(".")):
                        matched.append(os.path.join(directory, name))
            found = matched
        return sorted(path for path in found if path != "/" and self.exists(path))

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write (create or truncate) a file, making missing parent directories.

        A symlink on the way is followed inside the box, as a write by a box process would be.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        with _filesystem_ids(self.owner):
            try:
                fd = self.open(path, flags, mode)
            except FileNotFoundError:
                os.close(self._parent(path, create=True)[0])
                fd = self.open(path, flags, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), mode)

    def makedirs(self, path: str) -> None:
        with _filesystem_ids(self.owner):
            os.close(self._directory(path, create=True))

    def copy_in(self, host_src: str, box_dst: str) -> None:
        """Copy a host file or tree into the box; into ``box_dst`` if it is a directory."""
        if self._is_dir(box_dst):
            box_dst = os.path.join(box_dst, os.path.basename(os.path.normpath(host_src)))
        # The host source is the caller's own path: its last component is not followed (a
        # symlink is copied as one), and below it everything is read through descriptors.
        fd = os.open(host_src, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with _filesystem_ids(self.owner):
                self._copy_in(fd, box_dst)
        finally:
            os.close(fd)

    def copy_out(self, box_src: str, host_dst: str) -> None:
        """Copy a box file or tree to the host; into ``host_dst`` if it is a directory.

        Special files (devices, fifos, sockets) are skipped; modes keep their permission bits
        only (a setuid program made in the box must not become a setuid program of the host's).
        An existing host file is replaced as ``cp`` does, by unlinking it first, never by
        writing through it.
        """
        if os.path.isdir(host_dst):
            parent_path, name = host_dst, os.path.basename(os.path.normpath(box_src)) or "root"
        else:
            parent_path, name = os.path.split(os.path.abspath(host_dst))
        source = self.open(box_src, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # The destination's parent is the caller's own path, opened once; everything under
            # it is made relative to descriptors.
            parent = os.open(parent_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._copy_out(source, parent, name, box_src)
            finally:
                os.close(parent)
        finally:
            os.close(source)

    # ---------------------------------------------------------------------------- helpers

    def _is_dir(self, path: str) -> bool:
        try:
            fd = self.open(path, os.O_PATH)
        except OSError:
            return False
        try:
            return stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def _directory(self, path: str, create: bool) -> int:
        """An ``O_PATH`` fd of a box directory, creating missing components if asked."""
        try:
            return self.open(path, os.O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            if not create:
                raise
        parent, name = self._parent(path, create=True)
        try:
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
        finally:
            os.close(parent)
        return self.open(path, os.O_PATH | os.O_DIRECTORY)

    def _parent(self, path: str, create: bool) -> tuple[int, str]:
        clean = os.path.normpath("/" + path.lstrip("/"))
        parent, name = os.path.split(clean)
        if not name:
            raise IsADirectoryError(errno.EISDIR, "the box root is a directory", path)
        return self._directory(parent, create), name

    def _copy_in(self, source: int, box_dst: str) -> None:
        """Copy the host entry open as ``source`` (``O_PATH``) to ``box_dst``, depth first."""
        stack: list[tuple[int, str, list[str]]] = []
        try:
            directory = self._copy_entry_in(source, box_dst)
            if directory is not None:
                stack.append((directory, box_dst, sorted(os.listdir(directory))))
            while stack:
                parent, box_parent, names = stack[-1]
                if not names:
                    os.close(parent)
                    stack.pop()
                    continue
                name = names.pop()
                try:
                    entry = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                except FileNotFoundError:
                    continue  # removed from the host tree meanwhile
                try:
                    target = os.path.join(box_parent, name)
                    directory = self._copy_entry_in(entry, target)
                finally:
                    os.close(entry)
                if directory is not None:
                    stack.append((directory, target, sorted(os.listdir(directory))))
        finally:
            for parent, _, _ in stack:
                os.close(parent)

    def _copy_entry_in(self, entry: int, box_dst: str) -> int | None:
        """Copy one host entry; for a directory, make it in the box and return a readable fd of it."""
        info = os.fstat(entry)
        if stat.S_ISDIR(info.st_mode):
            self.makedirs(box_dst)
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=entry)
        if stat.S_ISLNK(info.st_mode):
            parent, name = self._parent(box_dst, create=True)
            try:
                _unlink_if_present(parent, name, box_dst)
                os.symlink(os.readlink("", dir_fd=entry), name, dir_fd=parent)
            finally:
                os.close(parent)
        elif stat.S_ISREG(info.st_mode):
            source = _reopened(entry)
            try:
                parent, name = self._parent(box_dst, create=True)
                try:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                    out = os.open(name, flags, 0o600, dir_fd=parent)
                finally:
                    os.close(parent)
                try:
                    _pump(source, out, info.st_size)
                    os.fchmod(out, stat.S_IMODE(info.st_mode))
                finally:
                    os.close(out)
            finally:
                os.close(source)
        return None  # special files are not copied

    def _copy_out(self, source: int, parent: int, name: str, box_src: str) -> None:
        """Copy the box entry open as ``source`` (``O_PATH``) to ``name`` in host dir ``parent``."""
        stack: list[tuple[int, int, str, list[str]]] = []
        try:
            pair = _copy_entry_out(source, parent, name, box_src)
            if pair is not None:
                stack.append((*pair, box_src, sorted(os.listdir(pair[0]))))
            while stack:
                box_dir, host_dir, box_path, names = stack[-1]
                if not names:
                    os.close(box_dir)
                    os.close(host_dir)
                    stack.pop()
                    continue
                name = names.pop()
                try:
                    entry = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=box_dir)
                except FileNotFoundError:
                    continue  # removed in the box meanwhile: as if the copy had come first
                try:
                    child = os.path.join(box_path, name)
                    pair = _copy_entry_out(entry, host_dir, name, child)
                finally:
                    os.close(entry)
                if pair is not None:
                    stack.append((*pair, child, sorted(os.listdir(pair[0]))))
        finally:
            for box_dir, host_dir, _, _ in stack:
                os.close(box_dir)
                os.close(host_dir)


def _copy_entry_out(entry: int, parent: int, name: str, box_path: str) -> tuple[int, int] | None:
    """Copy one box entry, decided by its descriptor's type (what lstat said earlier counts for
    nothing: the box may have swapped the name since). A directory is made on the host and
    returned as (box fd, host fd) to descend into; anything else is copied and None returned."""
    info = os.fstat(entry)
    if stat.S_ISDIR(info.st_mode):
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            pass  # copying over an existing tree, as cp -r does; O_NOFOLLOW below refuses a link
        try:
            host_dir = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot copy the box directory {box_path} out: the host destination {name!r} exists "
                f"and is not a directory ({os.strerror(exc.errno or 0)}); remove it or copy elsewhere",
            ) from exc
        try:
            box_dir = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=entry)
        except BaseException:
            os.close(host_dir)
            raise
        return box_dir, host_dir
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink("", dir_fd=entry)
        _unlink_if_present(parent, name, box_path)
        os.symlink(target, name, dir_fd=parent)  # copied as a link, never followed
    elif stat.S_ISREG(info.st_mode):
        source = _reopened(entry)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                out = os.open(name, flags, 0o600, dir_fd=parent)
            except FileExistsError:
                _unlink_if_present(parent, name, box_path)  # replaced as cp does, never written through
                out = os.open(name, flags, 0o600, dir_fd=parent)
            try:
                _pump(source, out, info.st_size)
                os.fchmod(out, stat.S_IMODE(info.st_mode) & 0o777)
            finally:
                os.close(out)
        finally:
            os.close(source)
    # Devices, fifos and sockets are not copied out: they mean nothing on the host.
    return None


def _reopened(entry: int) -> int:
    """A readable descriptor of the inode ``entry`` (an ``O_PATH`` fd) holds: reopening through
    ``/proc/self/fd`` reaches that very inode, whatever its name means by now."""
    fd = os.open(f"/proc/self/fd/{entry}", os.O_RDONLY | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file any more", f"/proc/self/fd/{entry}")
    return fd


def _pump(source: int, target: int, size_hint: int) -> None:
    """Copy ``source`` to ``target`` in the kernel (sendfile), to its end even if it grew."""
    while os.sendfile(target, source, None, max(size_hint, _CHUNK)):
        pass


def _unlink_if_present(parent: int, name: str, what: str) -> None:
    """Make room for ``name`` as ``cp`` does (unlink, never write through); a directory stays."""
    try:
        os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except IsADirectoryError as exc:
        raise IsADirectoryError(
            exc.errno, f"cannot copy {what} over the directory {name!r}; remove it or copy elsewhere"
        ) from exc


def _relative(path: str) -> str:
    """Box paths are absolute; openat2 with RESOLVE_IN_ROOT takes them relative to the root fd."""
    clean = path.lstrip("/")
    return clean or "."
