"""Reading and writing files of a running box from the host, without escaping it.

The host opens box paths relative to ``/proc/PID/root`` with ``openat2(RESOLVE_IN_ROOT)``.
Why not plain ``open("/proc/PID/root/etc/x")``: an absolute symlink inside the box (say
``/etc/x -> /etc/shadow``) would then resolve against the *host's* root, and a test helper
would write to the host. With ``RESOLVE_IN_ROOT`` the kernel treats the box root as ``/``.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

from . import syscalls
from .syscalls import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS

_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
_CHUNK = 1 << 20


class BoxFiles:
    """File operations on one box's root, given an ``O_PATH`` descriptor of it."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd

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

    def read_bytes(self, path: str) -> bytes:
        fd = self.open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write (create or truncate) a file, making missing parent directories.

        A symlink on the way is followed inside the box, as a write by a box process would be.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = self.open(path, flags, mode)
        except FileNotFoundError:
            os.close(self._parent(path, create=True)[0])
            fd = self.open(path, flags, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), mode)

    def makedirs(self, path: str) -> None:
        os.close(self._directory(path, create=True))

    def copy_in(self, host_src: str, box_dst: str) -> None:
        """Copy a host file or tree into the box; into ``box_dst`` if it is a directory."""
        if self._is_dir(box_dst):
            box_dst = os.path.join(box_dst, os.path.basename(os.path.normpath(host_src)))
        info = os.lstat(host_src)
        if not stat.S_ISDIR(info.st_mode):
            self._copy_file_in(host_src, box_dst, info)
            return
        for top, dirs, files in os.walk(host_src):
            rel = os.path.relpath(top, host_src)
            box_top = box_dst if rel == "." else os.path.join(box_dst, rel)
            self.makedirs(box_top)
            for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                src = os.path.join(top, name)
                self._copy_file_in(src, os.path.join(box_top, name), os.lstat(src))

    def copy_out(self, box_src: str, host_dst: str) -> None:
        """Copy a box file or tree to the host; into ``host_dst`` if it is a directory."""
        if os.path.isdir(host_dst):
            host_dst = os.path.join(host_dst, os.path.basename(os.path.normpath(box_src)) or "root")
        fd = self.open(box_src, os.O_PATH | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISDIR(info.st_mode):
            self._copy_file_out(box_src, host_dst, info)
            return
        top_fd = self.open(box_src, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # fwalk works on directory fds and never follows symlinks: nothing can lead it out.
            for top, _dirs, files, dir_fd in os.fwalk(".", dir_fd=top_fd):
                target_dir = os.path.normpath(os.path.join(host_dst, top))
                os.makedirs(target_dir, exist_ok=True)
                for name in files + [d for d in _dirs if stat.S_ISLNK(os.lstat(d, dir_fd=dir_fd).st_mode)]:
                    self._copy_entry_out(dir_fd, name, os.path.join(target_dir, name))
        finally:
            os.close(top_fd)

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

    def _copy_file_in(self, src: str, box_dst: str, info: os.stat_result) -> None:
        parent, name = self._parent(box_dst, create=True)
        try:
            if stat.S_ISLNK(info.st_mode):
                try:
                    os.unlink(name, dir_fd=parent)
                except FileNotFoundError:
                    pass
                os.symlink(os.readlink(src), name, dir_fd=parent)
                return
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            out = os.open(name, flags, stat.S_IMODE(info.st_mode), dir_fd=parent)
        finally:
            os.close(parent)
        with open(src, "rb") as source, os.fdopen(out, "wb") as target:
            shutil.copyfileobj(source, target, _CHUNK)
            os.fchmod(target.fileno(), stat.S_IMODE(info.st_mode))

    def _copy_file_out(self, box_src: str, host_dst: str, info: os.stat_result) -> None:
        if stat.S_ISLNK(info.st_mode):
            parent, name = self._parent(box_src, create=False)
            try:
                os.symlink(os.readlink(name, dir_fd=parent), host_dst)
            finally:
                os.close(parent)
            return
        fd = self.open(box_src, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as source, open(host_dst, "wb") as target:
            shutil.copyfileobj(source, target, _CHUNK)
        os.chmod(host_dst, stat.S_IMODE(info.st_mode))

    def _copy_entry_out(self, dir_fd: int, name: str, host_dst: str) -> None:
        info = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(name, dir_fd=dir_fd), host_dst)
        elif stat.S_ISREG(info.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as source, open(host_dst, "wb") as target:
                shutil.copyfileobj(source, target, _CHUNK)
            os.chmod(host_dst, stat.S_IMODE(info.st_mode))
        # Devices, fifos and sockets are not copied out: they mean nothing on the host.


def _relative(path: str) -> str:
    """Box paths are absolute; openat2 with RESOLVE_IN_ROOT takes them relative to the root fd."""
    clean = path.lstrip("/")
    return clean or "."
