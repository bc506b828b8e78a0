"""The box's PID 1: the life of a box's init, and the server that starts commands for the
host, reports their exits and reaps orphans.

It runs in a process the zygote forked into fresh namespaces; ``rootfs`` builds the box's
root first. Everything it needs after ``pivot_root`` must already be imported here: once the
image is the root, the host's Python library is out of sight.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from . import channel, rootfs, rtnl, syscalls
from .environ import command_env

TYPE_CHECKING = False  # typing stays out of the box helper (see zygote_process)
if TYPE_CHECKING:
    from typing import Any


def await_box(
    control: socket.socket, cgroup_dirs: list[str], cgroup_error: str = "", hint: dict[str, Any] | None = None
) -> None:
    """Life of a pre-cloned box: get everything generic ready, wait to be asked, become the box.

    The zygote clones the next box into its namespaces as soon as the host takes one, so the
    clone, every kernel mount, and (with a ``hint``: the image layers and privilege the last
    box had, which the next one almost always shares) the whole root with its pivot happen
    while the test runs, not while it waits for its box. The host sends its options (over
    ``control``) only to a box whose hint matches them. Never returns.
    """
    status = 0
    sock: socket.socket | None = None
    try:
        syscalls.set_process_name("nsbox-waiting")  # in ps: a box nobody has asked for yet
        # Why: die with the zygote, which dies with pytest (and exits when its socket closes).
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the zygote ignores it; commands must not
        # The zygote's SIGTERM handler is its own: PID 1 of a namespace, with the default
        # disposition, ignores SIGTERM from inside the box, as a container's init does.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.umask(0o022)
        failure: BaseException | None = None
        built: dict[str, Any] | None = None
        try:
            prepared = rootfs.prepare_root()
            rootfs.join_cgroup(cgroup_dirs, joined=bool(hint and hint.get("userns")))
            prepared["cgroup"] = cgroup_dirs
            prepared["cgroup_error"] = cgroup_error
            if hint is not None:
                built = rootfs.build_root(hint, prepared)
        except Exception as exc:  # reported to the host that asks for this box
            prepared, failure = {}, exc
        message, fds = channel.recv(control)
        if message is None or len(fds) != 1:
            os._exit(0)  # the zygote is gone, or shut us down unused
        woken = time.monotonic()
        syscalls.set_process_name("nsbox-init")
        control.close()
        sock = socket.socket(fileno=fds[0])
        if failure is not None:
            raise failure
        config = message["config"]
        if built is None:
            built = rootfs.build_root(rootfs.root_hint(config), prepared)
        ready = rootfs.finish_root(config, built)
        network = config.get("network")
        if network is not None:
            # The zygote made our eth0 while we waited; the host has put its other end on the
            # bridge. The address, the link and the route are ours to set: one socket here.
            began = time.monotonic()
            ready["eth0_index"] = rtnl.configure(
                "eth0", network["address"], network["prefixlen"], network.get("gateway"), network.get("mac")
            )
            ready["network_ms"] = (time.monotonic() - began) * 1000
        ready.update(t_handoff=config["t_handoff"], t_woken=woken, t_built=time.monotonic())
        channel.send(sock, {"ready": ready})
        Server(sock, config).serve()
    except BaseException as exc:
        status = 1
        try:
            if sock is not None:
                channel.send(sock, {"error": _describe(exc)})
        except OSError:
            pass
    finally:
        os._exit(status)


def _describe(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "errno": getattr(exc, "errno", None),
        "filename": getattr(exc, "filename", None),
    }


class Server:
    """PID 1's loop: start commands the host asks for, report their exits, reap orphans."""

    def __init__(self, sock: socket.socket, config: dict[str, Any]) -> None:
        self.sock = sock
        self.hostname: str = config["hostname"]
        self.box_env: dict[str, str] = config["env"]
        self.image_env: dict[str, str] = config.get("image_env", {})
        self.workdir: str = config.get("workdir") or "/"
        self.image_user: str | None = config.get("user") or None
        self.children: set[int] = set()
        self.kept = False
        self.disks: dict[str, int] = {}  # box path -> the disk's mount (an fd), for readonly()

    def serve(self) -> None:
        """Until the host goes: then PID 1 exits and the kernel kills the rest of the box,
        unless the host asked to keep it (``--nsbox-keep``): then it goes on reaping orphans
        until someone (``nsbox gc``) kills it."""
        channel.serve(self.sock, self.handle, self.reap)
        if self.kept:
            self.sock.close()
            while True:
                try:
                    os.wait()
                except ChildProcessError:
                    time.sleep(1)  # no child now; an orphan may be handed to us later

    def handle(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        reply: dict[str, Any] = {"id": message.get("id")}
        try:
            if op == "exec":
                reply["pid"] = self.start(message, fds)
            elif op == "kill":
                reply["ok"] = self.kill(message["pid"], message["sig"], message.get("group", False))
            elif op == "keep":
                # Outlive the helper and the host: no parent-death signal, no exit on EOF.
                syscalls.prctl(syscalls.PR_SET_PDEATHSIG, 0)
                self.kept = reply["ok"] = True
            elif op == "mount_disk":
                reply["ok"] = self.mount_disk(message["path"], fds)
            elif op == "disk_readonly":
                reply["ok"] = self.disk_readonly(message["path"], bool(message["readonly"]))
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as exc:
            # Whatever a request does wrong, PID 1 must live: its death kills the whole box.
            # The host checks every argument first; this is for what it cannot foresee.
            reply["error"] = _describe(exc)
        channel.send(self.sock, reply)

    def mount_disk(self, path: str, fds: list[int]) -> bool:
        """Put a disk's mount (made by the host with ``fsmount``: attached nowhere yet) on
        ``path``, made in the root if missing. Being in this mount namespace only, it goes
        with the box."""
        if len(fds) != 1:
            raise ValueError(f"mount_disk: expected one mount fd, got {len(fds)}")
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            target = rootfs.resolve_in_root(root, path, "dir")
        finally:
            os.close(root)
        try:
            syscalls.move_mount_fd(fds[0], target)
        finally:
            os.close(target)
        self.disks[path] = os.dup(fds[0])  # still the disk's mount: readonly() switches it
        return True

    def disk_readonly(self, path: str, readonly: bool) -> bool:
        """Switch a disk's mount read-only (writes fail with EROFS) or back."""
        flag = syscalls.MOUNT_ATTR_RDONLY
        syscalls.mount_setattr_fd(self.disks[path], flag if readonly else 0, 0 if readonly else flag)
        return True

    def spawned(self, pid: int) -> int:
        """Make a new command, not init, the OOM killer's choice in the box's cgroup.

        Why: init is a Python process whose resident size (shared with the zygote) can exceed
        a small memory cap; were it chosen, the whole box would die with it. Lowering init's
        own score needs CAP_SYS_RESOURCE, which root here may lack; raising a child's needs
        nothing. ``spawn_fast`` and ``spawn_as_user`` give the child this score from its start;
        this write makes sure of it.
        """
        try:
            fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return pid  # it has exited already
        try:
            os.write(fd, b"1000")
        except OSError:
            pass
        finally:
            os.close(fd)
        return pid

    def start(self, message: dict[str, Any], fds: list[int]) -> int:
        user = message.get("user")
        uid, gid, groups, home = resolve_user(user if user is not None else self.image_user)
        env = command_env(
            self.image_env, self.hostname, home, user is not None, self.box_env, message.get("env") or {}
        )
        cwd = message.get("cwd") or self.workdir
        if uid is None:
            pid = spawn_fast(message["argv"], env, fds, cwd)
        else:
            pid = spawn_as_user(message["argv"], env, fds, cwd, (uid, gid, groups))
        self.children.add(pid)
        return self.spawned(pid)

    def kill(self, pid: int, sig: int, group: bool) -> bool:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def reap(self) -> None:
        """Report each command's exit with the time it was reaped: the host times a command to
        its exit, not to the moment it reads the report (which may be much later)."""
        for pid, status in channel.reaped_children():
            if pid in self.children:
                self.children.discard(pid)
                channel.send(self.sock, {"exit": pid, "status": status, "time": time.monotonic()})


def spawn_fast(argv: list[str], env: dict[str, str], fds: list[int], cwd: str = "/") -> int:
    """Start a command as root with ``posix_spawn`` (a vfork: no page-table copy).

    Why: it is most commands, and a fork of this Python process costs about a millisecond
    more. ``posix_spawn`` cannot change directory here, so init itself steps into ``cwd`` for
    the call (it is single-threaded). Python ignores SIGPIPE and SIGXFSZ, and ignored signals
    survive exec: restore their defaults, as ``Popen(restore_signals=True)`` would.
    """
    # posix_spawnp walks PATH itself, in C: as execvp, it reads init's own environment, so
    # that holds the command's PATH for the call.
    search_path = env.get("PATH", "")
    if os.environ.get("PATH") != search_path:
        os.environ["PATH"] = search_path
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
    if cwd != "/":
        try:
            os.chdir(cwd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, cwd) from None
    # The command must be the OOM killer's choice from its first instruction: a shell that forks
    # at once would otherwise hand init's score to its children. posix_spawn runs no code of ours
    # in the child, so init takes the high score for the call and gives it back (going back down
    # to a score it had needs no CAP_SYS_RESOURCE; see Init.spawned).
    own = _own_oom_score()
    _write_oom_score(OOM_FIRST)
    try:
        return os.posix_spawnp(
            argv[0],
            argv,
            env,
            file_actions=actions,
            setsid=True,  # its own process group, so a timeout can kill all of it
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, argv[0]) from None
    finally:
        _write_oom_score(own)
        if cwd != "/":
            os.chdir("/")


OOM_FIRST = b"1000"
_own_score: list[bytes] = []


def _own_oom_score() -> bytes:
    """Init's own oom_score_adj as it started (read once)."""
    if not _own_score:
        try:
            with open("/proc/self/oom_score_adj", "rb") as handle:
                _own_score.append(handle.read().strip() or b"0")
        except OSError:
            _own_score.append(b"0")
    return _own_score[0]


def _write_oom_score(value: bytes) -> None:
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, value)
    except OSError:
        pass
    finally:
        os.close(fd)


def spawn_as_user(
    argv: list[str],
    env: dict[str, str],
    fds: list[int],
    cwd: str,
    ids: tuple[int | None, int | None, list[int] | None],
) -> int:
    """Start a command as another user: fork, drop to its ids, exec.

    Why not ``subprocess.Popen``: that module (and what it imports) would be copied into every
    box at fork, for the few commands that change user. A failure before exec comes back
    through a close-on-exec pipe as the ``OSError`` it was, naming the directory or program.
    """
    uid, gid, groups = ids
    program = find_program(argv[0], env.get("PATH", ""))
    failure_read, failure_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        step = "chdir"
        try:
            os.close(failure_read)
            _write_oom_score(OOM_FIRST)  # the OOM killer's choice before init (see spawn_fast)
            os.setsid()  # its own process group, so a timeout can kill all of it
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            os.chdir(cwd)
            step = "ids"
            if groups is not None:
                os.setgroups(groups)
            if gid is not None:
                os.setgid(gid)
            os.setuid(uid if uid is not None else 0)
            step = "exec"
            for ignored in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(ignored, signal.SIG_DFL)
            os.execve(program, argv, env)
        except Exception as exc:  # whatever it is, the parent must hear of it, not see a 127
            reason = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            os.write(failure_write, f"{getattr(exc, 'errno', 0) or 0}\n{step}\n{reason}".encode())
        finally:
            os._exit(127)
    os.close(failure_write)
    with open(failure_read, "rb") as pipe:
        report = pipe.read()
    if not report:
        return pid
    os.waitpid(pid, 0)
    number, step, reason = report.decode(errors="replace").split("\n", 2)
    filename = {"chdir": cwd, "exec": argv[0]}.get(step)
    raise OSError(int(number), reason, filename)


def find_program(name: str, search_path: str) -> str:
    """Resolve ``name`` on the box's PATH as execvp would; FileNotFoundError names it."""
    if "/" in name:
        return name
    for directory in search_path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(2, f"{name}: command not found", name)


def resolve_user(user: Any) -> tuple[int | None, int | None, list[int] | None, str]:
    """Turn ``None``, ``1000``, ``"nobody"``, ``"1000:1000"`` or ``"app:staff"`` into ids.

    Names are looked up in the box's own ``/etc/passwd`` and ``/etc/group``, parsed here
    rather than through NSS, which may try to load libraries the image does not have.
    The rules are runc's (``GetExecUser``), which Docker and podman use for ``USER`` and
    ``--user``: a uid not in ``/etc/passwd`` runs with gid 0 and ``HOME=/``, and a user given
    with its group gets that group alone, not the supplementary groups ``/etc/group`` lists.
    """
    if user is None:
        return None, None, None, "/root"
    text = str(user)
    name, _, group_part = text.partition(":")
    passwd = _read_table("/etc/passwd")
    entry = next((row for row in passwd if row[0] == name or (name.isdigit() and row[2] == name)), None)
    if entry is None and not name.isdigit():
        raise LookupError(f"user {name!r} not found in the box's /etc/passwd")
    uid = int(entry[2]) if entry else int(name)
    gid = int(entry[3]) if entry else 0
    home = entry[5] if entry and len(entry) > 5 and entry[5] else "/"
    groups_table = _read_table("/etc/group")
    if group_part:
        match = next((row for row in groups_table if row[0] == group_part), None)
        if match is not None:
            gid = int(match[2])
        elif group_part.isdigit():
            gid = int(group_part)
        else:
            raise LookupError(f"group {group_part!r} not found in the box's /etc/group")
        return uid, gid, [], home
    username = entry[0] if entry else None
    extra = sorted(
        {int(row[2]) for row in groups_table if username and len(row) > 3 and username in row[3].split(",")}
    )
    return uid, gid, extra, home


def _read_table(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n").split(":") for line in handle if line.count(":") >= 2]
    except FileNotFoundError:
        return []


__all__ = [
    "Server",
    "await_box",
    "find_program",
    "resolve_user",
    "spawn_as_user",
    "spawn_fast",
]
