"""The box's PID 1: builds the box's root, then starts commands for the host and reaps.

It runs in a process the zygote forked into fresh namespaces. Everything it needs after
``pivot_root`` must already be imported here: once the image is the root, the host's Python
library is out of sight, and a lazy import would fail in the middle of a test.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from . import channel, devices, syscalls
from .syscalls import (
    MNT_DETACH,
    MS_BIND,
    MS_MOVE,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SLAVE,
)

TYPE_CHECKING = False  # typing stays out of the box helper (see zygote_process)
if TYPE_CHECKING:
    from typing import Any

# The scratch tmpfs (upper, work, merged root, generated /etc files) is mounted over /proc of
# the box's copy of the host mounts: every host has that directory, it never holds image layers
# or caches, and the box mounts its own /proc later, inside the new root.
SCRATCH = "/proc"
_KERNEL = f"{SCRATCH}/kernel"  # where proc, sys and dev wait before they move into the root

_DEVICES = (  # name, major, minor: the set Docker gives a container, nothing from the host.
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
# Hardening, as Docker's defaults (moby's oci/defaults.go); a privileged box gets none of it.
# Parts of the host's kernel a box's proc and sysfs would show: some only read-only ...
_READ_ONLY = ("proc/sys", "proc/sysrq-trigger", "proc/irq", "proc/bus", "proc/fs")
# ... some not at all: files become /dev/null, directories an empty read-only tmpfs. A path
# this kernel lacks is skipped.
_MASKED_FILES = (
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
)
_MASKED_DIRS = ("proc/acpi", "proc/asound", "proc/scsi", "sys/firmware", "sys/devices/virtual/powercap")
# The capabilities a box's commands may hold (root's get exactly these): Docker's default list
# without CAP_MKNOD, which Docker pairs with a device cgroup that refuses all but its own
# nodes; a box has that guard on cgroup v1 only, and a block node it made in its /dev (the one
# mount that honours nodes) would open the host's disk (see ``devices``).
BOX_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
)
_KEPT_CAPABILITIES = frozenset(syscalls.CAPABILITIES[name] for name in BOX_CAPABILITIES)

_PROC_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
_SYSFS_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY  # sysfs writes reach the hardware
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)


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
            prepared = prepare_root()
            _join_cgroup(cgroup_dirs)
            prepared["cgroup"] = cgroup_dirs
            prepared["cgroup_error"] = cgroup_error
            if hint is not None:
                built = build_root(hint, prepared)
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
            built = build_root(root_hint(config), prepared)
        ready = finish_root(config, built)
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


def prepare_root() -> dict[str, Any]:
    """The part of a box's root that no option changes, made before anyone asks for the box."""
    # Read before /proc is covered: this procfs still belongs to the host's pid namespace,
    # so /proc/self names our pid as the host sees it.
    host_pid = int(os.readlink("/proc/self"))

    # 0. Nothing mounted for the box may propagate back to the host (our copy of the host's
    #    mounts inherited its shared peer groups).
    syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)

    # 1. A tmpfs for upper+work: they must share one filesystem that is not overlayfs.
    syscalls.mount("nsbox", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for name in ("upper", "work", "root", "etc", "kernel"):
        os.mkdir(f"{SCRATCH}/{name}", 0o755)
    scratch_fd = os.open(SCRATCH, os.O_PATH | os.O_DIRECTORY)

    # 2. Kernel filesystems of the box's own namespaces, staged in the scratch and moved into
    #    the root later: proc of its pid ns, sysfs of its net ns (read-only: sysfs writes
    #    reach the real hardware), and a /dev of its own.
    _mount_dir("proc", f"{_KERNEL}/proc", "proc", _PROC_FLAGS)
    _mount_dir("sysfs", f"{_KERNEL}/sys", "sysfs", _SYSFS_FLAGS)
    _build_dev(f"{_KERNEL}/dev")
    #    Then hardened, while nobody waits for the box: undoing it costs a privileged box two
    #    mounts at the hand-off, where hardening every other box there would cost it a dozen.
    mask_kernel_files(_KERNEL, f"{_KERNEL}/dev/null")
    syscalls.set_link_up("lo")
    return {"host_pid": host_pid, "scratch_fd": scratch_fd}


def mask_kernel_files(kernel: str, null: str) -> list[str]:
    """Make the parts of proc and sysfs (mounted in ``kernel``) a box must not touch read-only
    or empty, ``null`` standing in for masked files; returns the mount points made."""
    made = []
    for name in _READ_ONLY:
        path = f"{kernel}/{name}"
        if _mount_if_there(path, path, None, MS_BIND):
            # Why the other flags: a bind remount sets all of the mount's flags at once.
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
            syscalls.mount(None, path, None, flags)
            made.append(path)
    for name in _MASKED_FILES:
        if _mount_if_there(null, f"{kernel}/{name}", None, MS_BIND):
            made.append(f"{kernel}/{name}")
    for name in _MASKED_DIRS:
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        if _mount_if_there("nsbox-masked", f"{kernel}/{name}", "tmpfs", flags, "size=4k,mode=0555"):
            made.append(f"{kernel}/{name}")
    return made


def _mount_if_there(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> bool:
    try:
        syscalls.mount(source, target, fstype, flags, data)
    except OSError as exc:
        if exc.errno == 2:  # ENOENT: this kernel has no such file
            return False
        raise
    return True


def _join_cgroup(cgroup_dirs: list[str]) -> None:
    """Join the cgroup the zygote made for this box, then make the cgroup namespace, so the
    box sees its own cgroup as "/". Done while waiting: the first move of a process between
    cgroups waits for an RCU grace period, milliseconds no test should wait for."""
    for directory in cgroup_dirs:
        with open(f"{directory}/cgroup.procs", "w") as handle:
            handle.write("0")
    syscalls.unshare(syscalls.CLONE_NEWCGROUP)


def root_hint(config: dict[str, Any]) -> dict[str, Any]:
    """What of a box's options its root is built from before it is asked for: its image's
    layers, its privilege, whether it gets a resolv.conf of its own (bound over the
    image's; a bind needs its source in this mount namespace, which the pivot leaves), and the
    host devices it may use (its zygote writes them into its device cgroup as it makes it)."""
    return {
        "lowers": list(config["lowers"]),
        "privileged": bool(config.get("privileged")),
        "resolv_conf": bool(config.get("resolv_conf")),
        "devices": [list(device) for device in config.get("devices") or ()],
    }


def build_root(hint: dict[str, Any], prepared: dict[str, Any]) -> dict[str, Any]:
    """Mount the root of an image and pivot into it: all of a box that depends only on its
    ``root_hint``, so that a waiting box can do it before anyone asks."""
    lowers, privileged = hint["lowers"], hint["privileged"]
    root = f"{SCRATCH}/root"
    if privileged:
        # Proc and sysfs with nothing masked: each bound over itself without MS_REC, which
        # copies no mount on it; the hardened ones stay behind with the host's tree. Why not
        # unmount the masks: each unmount waits for an RCU grace period, milliseconds in all.
        for kernel_fs in (f"{_KERNEL}/proc", f"{_KERNEL}/sys"):
            syscalls.mount(kernel_fs, kernel_fs, None, MS_BIND)

    # 3. The overlay: image layers below (top first), the throwaway upper on top. Why nodev:
    #    a device node shipped in the image (or made by a privileged tool that built it) would
    #    open the host's device it names, a disk included; only the box's own /dev honours nodes.
    #    A privileged box is trusted with them, as before.
    joined = ":".join(escape_overlay_path(p) for p in _short_lowers(lowers))
    syscalls.mount(
        "nsbox",
        root,
        "overlay",
        0 if privileged else MS_NODEV,
        f"lowerdir={joined},upperdir={SCRATCH}/upper,workdir={SCRATCH}/work",
    )

    # The host devices the test asked for (devices=[...]), beside the box's own in its /dev.
    devices.make_nodes(f"{_KERNEL}/dev", hint.get("devices") or [])

    # 4. Mount points in the image are found *inside* it: the image is not trusted, and an
    #    /etc or /proc that is a symlink must not lead a mount, or a file we create, to the
    #    host. Each target is resolved with RESOLVE_IN_ROOT, made if missing, and mounted on
    #    through /proc/self/fd (of the box's own proc, still at its staging place). The
    #    hostname files are filled in when the box is handed out.
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    # The files bound over /etc come from the scratch tmpfs, and a bind keeps its source's
    # flags: nosuid and nodev, as that tmpfs.
    targets: list[tuple[str, str, str | None, int, str | None]] = [
        (f"{_KERNEL}/sys", "/sys", None, MS_MOVE, None),
        (f"{_KERNEL}/dev", "/dev", None, MS_MOVE, None),
        (_scratch_file("hostname", ""), "/etc/hostname", None, MS_BIND, None),
        (_scratch_file("hosts", ""), "/etc/hosts", None, MS_BIND, None),
    ]
    if hint["resolv_conf"]:
        targets.append((_scratch_file("resolv.conf", ""), "/etc/resolv.conf", None, MS_BIND, None))
    targets.append((f"{_KERNEL}/proc", "/proc", None, MS_MOVE, None))  # last: the others use it
    _mount_all(root_fd, targets, f"{_KERNEL}/proc")
    os.close(root_fd)

    # 6. Swap roots: the overlay becomes /, the host's tree is detached from the box's view.
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    # Why slave: the detach below must not propagate to any peer of the old root.
    syscalls.mount(None, ".", None, MS_SLAVE | MS_REC)
    syscalls.umount2(".", MNT_DETACH)
    os.chdir("/")

    # Our stdio came from the zygote; the box's own /dev/null is what PID 1 should hold.
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    # 7. Last, once init has no more mounting to do but the test's own: the capabilities its
    #    commands may have. Init keeps all of its own (to start commands as any user, and to
    #    mount the test's tmpfs), which also keeps commands out of it: ptrace, /proc/1/fd and
    #    /proc/1/root need a superset of its capabilities.
    if not privileged:
        limit_capabilities(*_CAPABILITY_PLAN)
    return {**prepared, "made": _made_by_box(prepared)}


def finish_root(config: dict[str, Any], built: dict[str, Any]) -> dict[str, Any]:
    """The box's own part of its root, from the test's options: hostname, resolv.conf, the
    tmpfs it asked for, its working directory. Runs in the box's root, after the pivot."""
    scratch_fd = int(built["scratch_fd"])
    hostname = config["hostname"]
    files = {"hostname": f"{hostname}\n", "hosts": hosts_file(hostname)}
    if config.get("resolv_conf"):
        files["resolv.conf"] = config["resolv_conf"]
    for name, content in files.items():  # each bound over the image's file already
        fd = os.open(f"etc/{name}", os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, dir_fd=scratch_fd)
        try:
            os.write(fd, content.encode())
        finally:
            os.close(fd)
    syscalls.sethostname(hostname)
    if config.get("no_new_privileges"):
        # Inherited by every command init starts, and never undone: an execve no longer grants
        # privileges (setuid and setgid bits, file capabilities). Init itself never execs.
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    targets: list[tuple[str, str, str | None, int, str | None]] = []
    # 5. Size-capped scratch space the test asked for (filling it gives ENOSPC).
    # Sorted, so that a parent (/data) is mounted before what is nested in it (/data/sub).
    for path, size in sorted(config["tmpfs"].items()):
        tmpfs_options = "mode=1777" + (f",size={size}" if size else "")
        targets.append(("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs_options))
    made = built["made"]
    if targets or config.get("workdir"):
        root_fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
        try:
            _mount_all(root_fd, targets, "/proc")
            if config.get("workdir"):
                os.close(resolve_in_root(root_fd, config["workdir"], "dir"))  # Docker makes it too
        finally:
            os.close(root_fd)
        made = _made_by_box(built)
    return {key: built[key] for key in ("host_pid", "scratch_fd", "cgroup", "cgroup_error")} | {"made": made}


def _mount_all(root_fd: int, targets: list[tuple[str, str, str | None, int, str | None]], proc: str) -> None:
    """Mount each ``(source, box path, fstype, flags, data)`` on its path found in the root."""
    for source, box_path, fstype, flags, data in targets:
        # A bind of one of the box's files (/etc/hosts ...) needs a file to mount on; anything
        # else (a tmpfs anywhere, /etc/app included; the kernel filesystems) a directory.
        kind = "file" if flags & MS_BIND and not os.path.isdir(source) else "dir"
        try:
            fd = resolve_in_root(root_fd, box_path, kind)
        except OSError as exc:
            what = (
                f"the tmpfs asked for at {box_path}" if fstype == "tmpfs" else f"the mount point {box_path}"
            )
            reason = os.strerror(exc.errno or 0)
            raise OSError(exc.errno, f"cannot make {what} in the image: {reason}") from None
        try:
            syscalls.mount(source, f"{proc}/self/fd/{fd}", fstype, flags, data)
        finally:
            os.close(fd)


def _made_by_box(prepared: dict[str, Any]) -> list[str]:
    """What the box had to create in the upper layer (mount points an image lacked): its own
    doing, which ``diff()`` must not report as the test's."""
    upper = f"/proc/self/fd/{prepared['scratch_fd']}/upper"  # after the pivot: the box's proc
    return [
        os.path.join(top, name)[len(upper) :] for top, dirs, files in os.walk(upper) for name in dirs + files
    ]


def capabilities_to_drop(last_cap: int) -> list[int]:
    """What a box that is not privileged gives up: this process's bounding set (the host's
    may lack some already) less ``BOX_CAPABILITIES``, up to capability ``last_cap``."""
    return [
        cap for cap in range(last_cap + 1) if cap not in _KEPT_CAPABILITIES and syscalls.in_bounding_set(cap)
    ]


# Worked out once, in the zygote before it forks any box (each inherits the zygote's sets):
# the reads would cost every new box most of a millisecond of cold calls.
_CAPABILITY_PLAN = (capabilities_to_drop(syscalls.last_capability()), syscalls.capability_sets())


def limit_capabilities(drop: list[int], sets: tuple[int, int, int]) -> None:
    """Take ``drop`` out of every capability the commands init starts could get; init keeps
    its own. ``sets`` are init's (effective, permitted, inheritable) sets.

    An ``execve`` grants at most the bounding set (root's programs get all of it) plus what
    the inheritable and ambient sets carry over; the ambient set is a subset of the
    inheritable one, and capset trims it along.
    """
    syscalls.drop_from_bounding_set(drop)
    effective, permitted, inheritable = sets
    dropped = sum(1 << cap for cap in drop)
    if inheritable & dropped:
        syscalls.set_capability_sets(effective, permitted, inheritable & ~dropped)


def _short_lowers(lowers: list[str]) -> list[str]:
    """Layer paths as short as can be: overlay's options must fit in one page (4 KiB).

    Layers of the cache share a directory: work from there and name them relative to it,
    as Docker's short ``l/`` links do, so that images with over a hundred layers mount.
    """
    parents = {os.path.dirname(path) for path in lowers}
    if len(lowers) > 1 and len(parents) == 1:
        os.chdir(parents.pop())
        return [os.path.basename(path) for path in lowers]
    return lowers


def escape_overlay_path(path: str) -> str:
    """Escape a layer path for overlay's option string, where ``\\``, ``,`` and ``:`` separate."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def hosts_file(hostname: str) -> str:
    """``/etc/hosts`` of a box without a network: its name resolves to loopback."""
    return f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def _ensure_dir(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)


def _mount_dir(source: str, target: str, fstype: str, flags: int, data: str | None = None) -> None:
    _ensure_dir(target)
    syscalls.mount(source, target, fstype, flags, data)


def _build_dev(dev: str) -> None:
    _mount_dir("nsbox-dev", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=65536k")
    for name, major, minor in _DEVICES:
        path = f"{dev}/{name}"
        try:
            os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
            os.chmod(path, 0o666)  # mknod applies the umask
        except PermissionError:
            # Why: without CAP_MKNOD (some CI containers) bind the host's node instead.
            open(path, "w").close()
            syscalls.mount(f"/dev/{name}", path, None, MS_BIND)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    _mount_dir(
        "devpts",
        f"{dev}/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    _mount_dir("shm", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
    _mount_dir("mqueue", f"{dev}/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _scratch_file(name: str, content: str) -> str:
    path = f"{SCRATCH}/etc/{name}"
    with open(path, "w") as handle:
        handle.write(content)
    return path


def resolve_in_root(root_fd: int, box_path: str, kind: str) -> int:
    """An ``O_PATH`` fd of ``box_path`` inside the root, creating it (a ``kind`` "dir" or
    "file") and missing parents; every lookup stays in the root, symlinks included."""
    flags = os.O_PATH | os.O_CLOEXEC
    resolve = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS
    relative = box_path.strip("/")
    try:
        return syscalls.openat2(root_fd, relative, flags, 0, resolve)
    except OSError as exc:
        if exc.errno != 2:  # ENOENT: make it below
            raise
    parent_path, name = os.path.split(relative)
    parent = resolve_in_root(root_fd, parent_path, "dir") if parent_path else os.dup(root_fd)
    try:
        if kind == "dir":
            os.mkdir(name, 0o755, dir_fd=parent)
        else:
            os.close(
                os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=parent)
            )
    finally:
        os.close(parent)
    return syscalls.openat2(root_fd, relative, flags, 0, resolve)


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
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as exc:
            # Whatever a request does wrong, PID 1 must live: its death kills the whole box.
            # The host checks every argument first; this is for what it cannot foresee.
            reply["error"] = _describe(exc)
        channel.send(self.sock, reply)

    def spawned(self, pid: int) -> int:
        """Make a new command, not init, the OOM killer's choice in the box's cgroup.

        Why: init is a Python process whose resident size (shared with the zygote) can exceed
        a small memory cap; were it chosen, the whole box would die with it. Lowering init's
        own score needs CAP_SYS_RESOURCE, which root here may lack; raising a child's needs
        nothing. (The child ran at init's score for the microseconds before this write.)
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
        # Layered as Docker does: a default PATH, the image's Env, the box's env, then run()'s.
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        env.update(self.image_env)
        env["HOSTNAME"] = self.hostname
        if user is not None or "HOME" not in env:
            env["HOME"] = home
        env.update(self.box_env)
        env.update(message.get("env") or {})
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
        for pid, status in channel.reaped_children():
            if pid in self.children:
                self.children.discard(pid)
                channel.send(self.sock, {"exit": pid, "status": status})


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
        if cwd != "/":
            os.chdir("/")


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
    gid = int(entry[3]) if entry else uid
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
    "BOX_CAPABILITIES",
    "SCRATCH",
    "Server",
    "await_box",
    "capabilities_to_drop",
    "escape_overlay_path",
    "find_program",
    "finish_root",
    "hosts_file",
    "limit_capabilities",
    "mask_kernel_files",
    "prepare_root",
    "resolve_in_root",
    "resolve_user",
    "spawn_as_user",
    "spawn_fast",
]
