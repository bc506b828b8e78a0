"""``nsbox shell``: a shell (or any command) inside a running box, as ``docker exec -it`` gives.

We join the box's namespaces with ``setns`` (mount last: the host's ``/proc`` is gone after
it), fork once more so the shell is born in the box's pid namespace, join the box's cgroup so
its limits hold, and give up the capabilities the box's own commands do not have. Its exit
status is ours.

Why not the box's init, which starts every other command: a kept box's init serves no host
any more (it only reaps), and ``nsbox shell`` is mostly for kept boxes.

When our stdin and stdout are terminals the command gets one of its own, in the box
(``terminal``): it is made a session leader with the pty slave as its controlling terminal, so a
shell has job control, and we relay between it and the user's terminal. Otherwise (a pipe, CI,
output sent to a file) it inherits our stdin, stdout and stderr as they are, so scripts work and
``nsbox shell BOX -- cat log > copy`` copies the file as it is (a pty would turn its newlines
into CRLF, as ``docker exec -t`` does). With no command given, it is the
login shell of root in the box's own ``/etc/passwd`` (``/bin/sh`` if that names none that is
there), started as ``login`` does, with ``-`` before its name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat
import sys
import termios
import traceback

from . import capabilities, cgroups, kept, state, syscalls, terminal
from .box import Box
from .boxfs import BoxFiles
from .environ import DEFAULT_PATH
from .errors import BoxError

_NAMESPACES = ("ipc", "uts", "net", "cgroup", "pid", "mnt")
_FALLBACK_SHELL = "/bin/sh"
_PASSWD_LIMIT = 1 << 20


def shell(box_id: str | None, command: list[str], image: str | None = None) -> int:
    """Enter a kept box (``box_id``, a prefix will do), or a fresh box of ``image``; an empty
    ``command`` means the box's login shell."""
    if box_id is not None:
        entry = kept.find(box_id)
        pid, start = int(entry["pid"]), int(entry["start"])
        return enter(pid, entry["id"], entry.get("cgroup", ""), entry["privileged"], command, start)
    with Box(image=image, hostname="shell") as box:
        assert box.pid is not None
        return enter(
            box.pid, box.id, box.cgroup.name if box.cgroup.driver else "", box.spec.privileged, command
        )


def enter(
    pid: int, box_id: str, cgroup: str, privileged: bool, command: list[str], start: int | None = None
) -> int:
    procs_files = _cgroup_procs_files(cgroup)
    # A userns box's user namespace first: it owns the others, whose setns needs our
    # capabilities in it. Then we become its root (the host's root is no id there).
    userns = _own_user_namespace(pid)
    names = ("user", *_NAMESPACES) if userns else _NAMESPACES
    namespaces = [os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in names]
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if start is not None and state.process_start(pid) != start:
            raise BoxError(f"box {box_id} has just ended (its init, pid {pid}, is gone)")
        files = BoxFiles(root)
        home, login = login_shell(files)
        program, argv = (command[0], command) if command else (login, [f"-{os.path.basename(login)}"])
        pty = _open_pty(files, box_id) if os.isatty(0) and os.isatty(1) else None
    except BaseException:
        for fd in namespaces:
            os.close(fd)
        raise
    finally:
        os.close(root)
    if pty is not None:
        terminal.copy_window_size(0, pty[0])
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": home,
        "TERM": os.environ.get("TERM", "xterm"),
        "PS1": f"[nsbox {box_id}] \\w # ",
    }
    sys.stdout.flush()
    with terminal.raw_mode(0) if pty is not None else contextlib.nullcontext():
        child = os.fork()
        if child == 0:
            status = 127
            try:
                for path in procs_files:
                    with open(path, "w") as handle:
                        handle.write(str(os.getpid()))
                for fd in namespaces:
                    syscalls.setns(fd, 0)
                if userns:
                    try:
                        os.setgroups([])
                    except PermissionError:
                        pass  # a rootless box of one id: setgroups is denied, and no group is held
                    os.setresgid(0, 0, 0)
                    os.setresuid(0, 0, 0)
                shell_pid = os.fork()  # only a child is born in the pid namespace just joined
                if shell_pid == 0:
                    if pty is not None:
                        _take_terminal(*pty)
                    os.chdir("/")
                    if not privileged:
                        capabilities.limit_capabilities(
                            capabilities.capabilities_to_drop(syscalls.last_capability()),
                            syscalls.capability_sets(),
                        )
                    for ignored in (signal.SIGPIPE, signal.SIGXFSZ):  # Python's; `yes | head` needs them
                        signal.signal(ignored, signal.SIG_DFL)
                    os.execvpe(program, argv, env)
                if pty is not None:
                    for fd in pty:
                        os.close(fd)
                _, wait_status = os.waitpid(shell_pid, 0)
                status = os.waitstatus_to_exitcode(wait_status) & 0xFF
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)  # both children: never back into the caller's stack
        for fd in namespaces:
            os.close(fd)
        if pty is not None:
            master, slave = pty
            os.close(slave)
            try:
                terminal.relay(master, child)
            finally:
                os.close(master)
        _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _open_pty(files: BoxFiles, box_id: str) -> tuple[int, int]:
    try:
        return terminal.open_box_pty(files)
    except OSError as exc:
        raise BoxError(
            f"box {box_id}: cannot open a terminal in its /dev/pts ({exc}); "
            "give the command a pipe as stdin to run it without one"
        ) from exc


def _take_terminal(master: int, slave: int) -> None:
    """In the command's process: a session of its own, the pty slave its controlling terminal
    and its stdin, stdout and stderr (``login_tty(3)``)."""
    os.close(master)
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(slave, target)
    os.close(slave)


def login_shell(files: BoxFiles) -> tuple[str, str]:
    """(home, shell) of root in the box's own ``/etc/passwd``; ``/root`` and ``/bin/sh`` for
    what it does not name, or names but the box lacks (a shell that is not an executable file).

    The first entry with uid 0 counts, as ``getpwuid(0)`` would have it. Read through the box's
    root, so a symlink there cannot lead to a host file, and only if it is a regular file.
    """
    home, shell = "/root", _FALLBACK_SHELL
    try:
        fd = files.open("/etc/passwd", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return home, shell
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return home, shell
        text = handle.read(_PASSWD_LIMIT).decode(errors="replace")
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[2] == "0":
            home = fields[5] or home
            if fields[6].startswith("/") and _is_program(files, fields[6]):
                shell = fields[6]
            break
    return home, shell


def _is_program(files: BoxFiles, path: str) -> bool:
    try:
        fd = files.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


def _own_user_namespace(pid: int) -> bool:
    """Whether the box of init ``pid`` has a user namespace of its own (``userns=True``)."""
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
    except OSError:
        return False


def _cgroup_procs_files(name: str) -> list[str]:
    backend = cgroups.driver()
    if backend is None or not name:
        return []
    return [str(path / "cgroup.procs") for path in backend.existing() if path.name == name]
