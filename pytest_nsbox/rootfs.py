"""A box's root, built by its init: scratch space, kernel filesystems, /dev, the overlay of
the image's layers, the mount points the test asked for, the pivot and the capability drop.

It runs in a process the zygote forked into fresh namespaces, mostly before anyone asks for
the box (``prepare_root`` and ``build_root`` while it waits; ``finish_root`` at hand-out).
Everything it needs after ``pivot_root`` must already be imported: once the image is the root,
the host's Python library is out of sight, and a lazy import would fail in the middle of a test.
"""

from __future__ import annotations

import errno
import os

from . import capabilities, devices, overlay, syscalls
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
_PROC_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
_SYSFS_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY  # sysfs writes reach the hardware
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)


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


def join_cgroup(cgroup_dirs: list[str], joined: bool = False) -> None:
    """Join the cgroup the zygote made for this box, then make the cgroup namespace, so the
    box sees its own cgroup as "/". Done while waiting: the first move of a process between
    cgroups waits for an RCU grace period, milliseconds no test should wait for. ``joined``:
    the zygote put us there already (a ``userns`` box's root may not write the host's files)."""
    for directory in [] if joined else cgroup_dirs:
        with open(f"{directory}/cgroup.procs", "w") as handle:
            handle.write("0")
    syscalls.unshare(syscalls.CLONE_NEWCGROUP)


def root_hint(config: dict[str, Any]) -> dict[str, Any]:
    """What of a box's options its root is built from before it is asked for: its image's
    layers, its privilege, whether it gets a resolv.conf of its own (bound over the
    image's; a bind needs its source in this mount namespace, which the pivot leaves), the
    host devices it may use (its zygote writes them into its device cgroup as it makes it),
    and whether it is bridged (its zygote makes its veth; plain boxes never pay for one)."""
    hint = {
        "lowers": list(config["lowers"]),
        "privileged": bool(config.get("privileged")),
        "resolv_conf": bool(config.get("resolv_conf")),
        "devices": [list(device) for device in config.get("devices") or ()],
        "veth": bool(config.get("veth")),
    }
    if config.get("userns"):  # [uid base, gid base] of its user namespace (made on demand)
        hint["userns"] = list(config["userns"])
    return hint


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
    #    In a user namespace (``userns``), each layer is a detached mount the zygote idmapped
    #    through our namespace (host root's files appear as our root's): they are attached in
    #    the scratch, and the overlay stacks on them; the kernel adds nodev (SB_I_NODEV) itself.
    sources = _attach_layers(hint["lower_fds"]) if hint.get("lower_fds") is not None else None
    flags = 0 if privileged else MS_NODEV
    overlay.mount_root(root, lowers, f"{SCRATCH}/upper", f"{SCRATCH}/work", flags, sources)

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
    if not privileged and (hint.get("userns") or overlay.in_user_namespace):
        # A new user namespace starts with a full bounding set, whatever the host's lacks: the
        # zygote's plan (its own sets) would leave those extra capabilities to commands.
        plan = capabilities.capabilities_to_drop(syscalls.last_capability()), syscalls.capability_sets()
        capabilities.limit_capabilities(*plan)
    elif not privileged:
        capabilities.limit_capabilities(*capabilities.CAPABILITY_PLAN)
    return {**prepared, "made": _made_by_box(prepared)}


def _attach_layers(fds: list[int]) -> list[str]:
    """Attach the idmapped layer mounts ``fds`` (top first) at ``SCRATCH/layers/N``; their paths."""
    os.mkdir(f"{SCRATCH}/layers", 0o755)
    paths = []
    for number, fd in enumerate(fds):
        path = f"{SCRATCH}/layers/{number}"
        os.mkdir(path, 0o755)
        target = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syscalls.move_mount_fd(fd, target)
        finally:
            os.close(target)
            os.close(fd)
        paths.append(path)
    return paths


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
    options = "newinstance,ptmxmode=0666,mode=0620"
    try:
        _mount_dir("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, options + ",gid=5")
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # A rootless box maps one id, or a range without group 5 (tty): devpts refuses a
        # gid= of an unmapped group, and its terminals keep their owner's group instead.
        _mount_dir("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, options)
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


__all__ = [
    "SCRATCH",
    "build_root",
    "finish_root",
    "hosts_file",
    "join_cgroup",
    "mask_kernel_files",
    "prepare_root",
    "resolve_in_root",
    "root_hint",
]
