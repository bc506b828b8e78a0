"""The kernel calls Python 3.11 lacks, as errno-checked ctypes wrappers.

This is the only module that touches ctypes. Every wrapper raises ``SyscallError`` (or
``MountError``) naming the operation and its arguments, because a bare ``EINVAL`` from
``mount`` says nothing about which of five arguments was wrong.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct

from .errors import MountError, SyscallError, permission_hint

TYPE_CHECKING = False  # the box helper loads this module: nothing it does not need at run time
if TYPE_CHECKING:
    from collections.abc import Iterable

_MACHINE = os.uname().machine  # _MACHINE, without importing platform

# Namespace flags (linux/sched.h).
CLONE_NEWTIME = 0x00000080  # Linux 5.6: unshare() only; the caller's next children get it
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# Mount flags (linux/mount.h).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MNT_DETACH = 0x2
_SIGCHLD = 17

# prctl options (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# Capability numbers (linux/capability.h), by the names /proc/PID/status and capsh use.
CAPABILITIES = {
    name: number
    for number, name in enumerate(
        (
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        )
    )
}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# openat2 resolve flags (linux/openat2.h).
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_MOUNT_FLAG_NAMES = {
    MS_RDONLY: "MS_RDONLY",
    MS_NOSUID: "MS_NOSUID",
    MS_NODEV: "MS_NODEV",
    MS_NOEXEC: "MS_NOEXEC",
    MS_REMOUNT: "MS_REMOUNT",
    MS_BIND: "MS_BIND",
    MS_MOVE: "MS_MOVE",
    MS_REC: "MS_REC",
    MS_PRIVATE: "MS_PRIVATE",
    MS_SLAVE: "MS_SLAVE",
    MS_SHARED: "MS_SHARED",
}

_CLONE_FLAG_NAMES = {
    CLONE_NEWTIME: "CLONE_NEWTIME",
    CLONE_NEWNS: "CLONE_NEWNS",
    CLONE_NEWCGROUP: "CLONE_NEWCGROUP",
    CLONE_NEWUTS: "CLONE_NEWUTS",
    CLONE_NEWIPC: "CLONE_NEWIPC",
    CLONE_NEWUSER: "CLONE_NEWUSER",
    CLONE_NEWPID: "CLONE_NEWPID",
    CLONE_NEWNET: "CLONE_NEWNET",
}

# Syscalls glibc does not wrap: pivot_root has no wrapper, openat2 came after glibc 2.36.
# Numbers from 424 up are shared by every architecture; older ones are not.
_SYSCALL_NUMBERS = {
    "x86_64": {"pivot_root": 155, "clone": 56, "bpf": 321},
    "aarch64": {"pivot_root": 41, "clone": 220, "bpf": 280},
}
_SYS_OPENAT2 = 437

_libc = ctypes.CDLL(None, use_errno=True)
# Calls through PyDLL keep the GIL held, which a fork-like clone requires (as os.fork does).
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc_gil.syscall.restype = ctypes.c_long
_python = ctypes.pythonapi

_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.sethostname.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.capget.restype = ctypes.c_int
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.capset.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_CapDataPair = _CapData * 2  # made once, not per call: a new ctypes type costs 0.1 ms


class _BpfProgLoad(ctypes.Structure):
    """The ``BPF_PROG_LOAD`` part of ``union bpf_attr``, up to ``expected_attach_type`` (4.17).

    Why not the whole union: the kernel takes any size up to its own and zero-fills the rest.
    """

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class _BpfProgAttach(ctypes.Structure):
    """The ``BPF_PROG_ATTACH`` part of ``union bpf_attr``."""

    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
    ]


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def _check(result: int, operation: str, detail: str = "", hint: str = "") -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise SyscallError(err, operation, detail, hint)
    return result


def flag_names(flags: int, names: dict[int, str]) -> str:
    """Render a bit mask by its kernel names (``MS_BIND|MS_REC``), as errors must."""
    parts = [name for bit, name in names.items() if flags & bit]
    rest = flags & ~sum(bit for bit in names if flags & bit)
    if rest:
        parts.append(hex(rest))
    return "|".join(parts) or "0"


def unshare(flags: int) -> None:
    """Move the caller into new namespaces (``CLONE_NEWPID`` affects only its children)."""
    _check(_libc.unshare(flags), "unshare", flag_names(flags, _CLONE_FLAG_NAMES))


def fork_into_namespaces(flags: int) -> int:
    """Fork straight into new namespaces: ``clone(flags|SIGCHLD)`` with the stack shared
    copy-on-write, exactly like ``fork()``. Returns 0 in the child, its pid in the parent.

    Why not ``unshare`` then ``fork``: with ``CLONE_NEWPID`` that needs a second fork to get
    a PID 1, and each Python fork costs a millisecond or more. Python's own fork bookkeeping
    (``PyOS_BeforeFork``/``AfterFork``) runs around the call, as ``os.fork`` does, and the
    ``AfterFork`` half runs whatever happens (``BeforeFork`` takes the import lock). The caller
    must be single-threaded (the zygote is), should block signals across the call, and in the
    child must reset the parent's handlers before unblocking them (see ``zygote_process``).
    """
    numbers = _SYSCALL_NUMBERS.get(_MACHINE)
    if numbers is None:
        raise SyscallError(38, "clone", f"no syscall number known for {_MACHINE}")
    # x86_64 and aarch64 both take (flags, newsp, parent_tid, child_tid, tls); newsp=0 keeps
    # the caller's stack, as fork does. Built before BeforeFork: nothing between it and the
    # call that could raise.
    arguments = (
        ctypes.c_long(numbers["clone"]),
        ctypes.c_ulong(flags | _SIGCHLD),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_ulong(0),
    )
    pid, err = -1, 0
    _python.PyOS_BeforeFork()
    try:
        pid = _libc_gil.syscall(*arguments)
        err = ctypes.get_errno()
    finally:
        if pid == 0:
            _python.PyOS_AfterFork_Child()
        else:
            _python.PyOS_AfterFork_Parent()
    if pid == 0:
        return 0
    if pid < 0:
        raise SyscallError(err, "clone", flag_names(flags, _CLONE_FLAG_NAMES))
    return int(pid)


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace behind ``fd`` (a ``/proc/PID/ns/*`` file)."""
    _check(_libc.setns(fd, nstype), "setns", f"fd {fd}, {flag_names(nstype, _CLONE_FLAG_NAMES)}")


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2); the error names source, target, type, flags and data."""
    result = _libc.mount(
        None if source is None else os.fsencode(source),
        os.fsencode(target),
        None if fstype is None else os.fsencode(fstype),
        flags,
        None if data is None else os.fsencode(data),
    )
    if result < 0:
        err = ctypes.get_errno()
        detail = (
            f"source={source!r} target={target!r} type={fstype!r} "
            f"flags={flag_names(flags, _MOUNT_FLAG_NAMES)} data={data!r}"
        )
        hint = ""
        if err == 28:  # ENOSPC
            # Why: mount(2) says ENOSPC when the mount table is full, not when a disk is.
            hint = "the mount table is full (fs.mount-max), not the disk"
        elif err == 1 or err == 13:  # EPERM, EACCES
            hint = permission_hint("mounting (CAP_SYS_ADMIN in the host's namespaces)")
        elif err == 19:  # ENODEV
            hint = f"the kernel does not support filesystem type {fstype!r} (modprobe it?)"
        raise MountError(err, "mount", detail, hint)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2): ``MNT_DETACH`` lets busy mounts go once their last user does."""
    result = _libc.umount2(os.fsencode(target), flags)
    if result < 0:
        err = ctypes.get_errno()
        raise MountError(err, "umount2", f"target={target!r} flags={flags:#x}")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2); ``pivot_root(".", ".")`` stacks the old root on the new one (as runc does)."""
    numbers = _SYSCALL_NUMBERS.get(_MACHINE)
    if numbers is None:
        raise MountError(38, "pivot_root", f"no syscall number known for {_MACHINE}")
    result = _libc.syscall(
        ctypes.c_long(numbers["pivot_root"]),
        ctypes.c_char_p(os.fsencode(new_root)),
        ctypes.c_char_p(os.fsencode(put_old)),
    )
    if result < 0:
        err = ctypes.get_errno()
        raise MountError(
            err,
            "pivot_root",
            f"new_root={new_root!r} put_old={put_old!r}",
            "new_root must be a mount point in a private propagation tree" if err == 22 else "",
        )


def sethostname(name: str) -> None:
    """Set the UTS namespace's hostname."""
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname", repr(name))


def prctl(option: int, arg2: int = 0) -> int:
    """prctl(2) with one argument, which is all we use."""
    return _check(_libc.prctl(option, arg2, 0, 0, 0), "prctl", f"option {option}, arg {arg2}")


def capability_sets() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) capability sets as bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    _check(_libc.capget(ctypes.byref(header), ctypes.byref(data)), "capget")

    def mask(field: str) -> int:
        return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32

    return mask("effective"), mask("permitted"), mask("inheritable")


def set_capability_sets(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) for this thread: sets can only shrink without CAP_SETPCAP."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    for half in (0, 1):
        shift = 32 * half
        data[half].effective = (effective >> shift) & 0xFFFFFFFF
        data[half].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[half].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    detail = f"effective={effective:#x} permitted={permitted:#x} inheritable={inheritable:#x}"
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset", detail)


def last_capability() -> int:
    """The highest capability number this kernel knows (``/proc/sys/kernel/cap_last_cap``)."""
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        return int(handle.read())


def in_bounding_set(cap: int) -> bool:
    """Whether ``cap`` is in this thread's bounding set (PR_CAPBSET_READ)."""
    return bool(_check(_libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0), "prctl(PR_CAPBSET_READ)", f"cap {cap}"))


def drop_from_bounding_set(caps: Iterable[int]) -> None:
    """Take ``caps`` out of this thread's bounding set for good (needs CAP_SETPCAP).

    The thread keeps its own capabilities; what changes is what its programs get: an
    ``execve`` grants at most the bounding set, plus what the inheritable set carries over.
    """
    for cap in caps:
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "prctl(PR_CAPBSET_DROP)", f"cap {cap}")


def set_process_name(name: str) -> None:
    """Name this process for ``ps``: its ``comm`` (``/proc/PID/comm``, 15 bytes kept) and its
    command line (``/proc/PID/cmdline``, which ``ps -f``, ``ps -o args`` and ``pgrep -f`` show).

    Why the command line too: the helper starts as the host's interpreter with its package
    directory and a JSON plan of the host's cgroup paths, and every box it forks would show
    that as its PID 1. Why by overwriting the argv strings, as ``setproctitle`` does:
    ``prctl(PR_SET_MM_ARG_START)`` needs ``CAP_SYS_RESOURCE``. Never fails: a name is for
    people reading ``ps``.
    """
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)
    area = _memory_area("arg")
    if area is None or area[1] - area[0] < 2:
        return
    start, end = area
    title = name.encode()[: end - start - 2] + b"\0"
    # The last byte not NUL: the kernel then reads the command line as a title, up to its first
    # NUL (as after setproctitle), so that /proc/PID/cmdline is "name\0", not "name" and a page
    # of NULs that ps shows as empty arguments.
    _write_own_memory(start, title.ljust(end - start - 1, b"\0") + b" ")


def hide_environment() -> None:
    """Blank this process's environment strings as ``/proc/PID/environ`` shows them.

    Why: that file shows the strings the process was started with, for its whole life, and
    forked children show them too: each box's PID 1 would show the host's environment. Python
    has copied them into ``os.environ`` already; C code calling ``getenv`` finds nothing
    after this, which the helper and a box's init never need.
    """
    area = _memory_area("env")
    if area is not None and area[1] > area[0]:
        _write_own_memory(area[0], bytes(area[1] - area[0]))


# /proc/PID/stat fields 48-51 (proc(5)): where the argv and environment strings are. They are
# read once: a forked child has them at the same addresses.
_AREAS: dict[str, tuple[int, int]] = {}


def _memory_area(kind: str) -> tuple[int, int] | None:
    if not _AREAS:
        try:
            with open("/proc/self/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()  # the name may hold spaces
            # fields[0] is field 3 (state): field N is fields[N - 3]
            _AREAS["arg"] = (int(fields[45]), int(fields[46]))
            _AREAS["env"] = (int(fields[47]), int(fields[48]))
        except (OSError, IndexError, ValueError):
            return None
    return _AREAS.get(kind)


def _write_own_memory(address: int, data: bytes) -> None:
    """Write ``data`` at ``address`` of this process, through ``/proc/self/mem``: a wrong
    address is an error there, not a crash."""
    try:
        fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.pwrite(fd, data, address)
    except OSError:
        pass
    finally:
        os.close(fd)


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (``malloc_trim``).

    Why: the zygote's every resident page is copied into each box's page tables at fork and
    torn down at its exit; the heap that imports grew and freed again is over a megabyte of them, for nothing.
    """
    _libc.malloc_trim(0)


_OPENAT2_RETRIES = 1000


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2) (Linux 5.6+): with ``RESOLVE_IN_ROOT`` a path cannot climb out of ``dirfd``.

    Why: the host reaches box files through ``/proc/PID/root``, where an absolute symlink
    would otherwise resolve against the *host's* root.
    """
    # openat2 refuses a mode unless the call creates (O_TMPFILE includes O_DIRECTORY's bit).
    creates = bool(flags & os.O_CREAT) or flags & os.O_TMPFILE == os.O_TMPFILE
    how = _OpenHow(flags | os.O_CLOEXEC, mode if creates else 0, resolve)
    encoded = ctypes.c_char_p(os.fsencode(path))
    # EAGAIN: a lookup with RESOLVE_IN_ROOT or RESOLVE_BENEATH that met ".." (a relative
    # symlink such as /etc/os-release -> ../usr/lib/os-release) is refused when any mount or
    # rename happened on the system meanwhile, and the kernel asks the caller to try again:
    # other boxes starting and stopping make that common.
    for _attempt in range(_OPENAT2_RETRIES):
        result = _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            encoded,
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if result >= 0:
            return int(result)
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    raise SyscallError(err, "openat2", repr(path))


# bpf(2) commands, program and attach types, flags (linux/bpf.h): what a device filter needs.
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 0x2
_BPF_LOG_SIZE = 1 << 16  # the verifier's log of a program of a few dozen instructions fits

_BPF_CAPABILITY_HINT = (
    "the kernel refused: loading and attaching a cgroup BPF program needs CAP_SYS_ADMIN (or, "
    "from Linux 5.8, CAP_BPF and CAP_NET_ADMIN); a container needs --privileged or those "
    "capabilities, and kernel.unprivileged_bpf_disabled does not matter to root"
)


def _bpf(command: int, attr: ctypes.Structure) -> int:
    """bpf(2) itself: -1 with errno set on failure, as ``syscall`` returns it."""
    numbers = _SYSCALL_NUMBERS.get(_MACHINE)
    if numbers is None:
        ctypes.set_errno(38)  # ENOSYS: as a kernel without the call would say
        return -1
    return int(
        _libc.syscall(
            ctypes.c_long(numbers["bpf"]),
            ctypes.c_int(command),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
    )


def bpf_prog_load(
    prog_type: int, instructions: bytes, *, license_name: str, name: str = "", expected_attach_type: int = 0
) -> int:
    """Load a BPF program (``BPF_PROG_LOAD``); returns its descriptor (close-on-exec).

    Why load twice on failure: asking for the verifier's log costs a 64 KiB buffer and the
    kernel's time writing it; a program that loads needs neither, one that does not needs the
    log to say why, and the error carries its tail.
    """
    code = ctypes.create_string_buffer(instructions, len(instructions))
    license_text = ctypes.create_string_buffer(license_name.encode())
    attr = _BpfProgLoad()
    attr.prog_type = prog_type
    attr.insn_cnt = len(instructions) // 8
    attr.insns = ctypes.addressof(code)
    attr.license = ctypes.addressof(license_text)
    attr.prog_name = name.encode()[:15]  # letters, digits, "_" and "." only, or EINVAL
    attr.expected_attach_type = expected_attach_type
    fd = _bpf(BPF_PROG_LOAD, attr)
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    log = ""
    if err in (13, 22):  # EACCES, EINVAL: the verifier refused it (or the type is unknown)
        buffer = ctypes.create_string_buffer(_BPF_LOG_SIZE)
        attr.log_level, attr.log_size, attr.log_buf = 1, _BPF_LOG_SIZE, ctypes.addressof(buffer)
        fd = _bpf(BPF_PROG_LOAD, attr)
        if fd >= 0:  # loaded the second time: nothing left to report
            return fd
        log = buffer.value.decode("utf-8", "replace").strip()
    detail = f"program type {prog_type}, {attr.insn_cnt} instructions, license {license_name!r}"
    if err == 38:  # ENOSYS
        hint = "this kernel has no bpf(2) (CONFIG_BPF_SYSCALL is off)"
    elif err == 1:  # EPERM
        hint = _BPF_CAPABILITY_HINT
    elif err == 22 and not log:
        hint = f"this kernel does not know program type {prog_type} (CONFIG_CGROUP_BPF is off?)"
    else:
        hint = "the verifier refused the program; its log ends: " + " | ".join(log.splitlines()[-6:])
    raise SyscallError(err, "bpf(BPF_PROG_LOAD)", detail, hint)


def bpf_prog_attach(
    target_fd: int, prog_fd: int, attach_type: int, flags: int = 0, *, target: str = ""
) -> None:
    """Attach a loaded program to ``target_fd`` (``BPF_PROG_ATTACH``); ``target`` names it in errors.

    The attachment holds its own reference to the program: the caller may close ``prog_fd``.
    """
    attr = _BpfProgAttach(target_fd, prog_fd, attach_type, flags, 0)
    if _bpf(BPF_PROG_ATTACH, attr) >= 0:
        return
    err = ctypes.get_errno()
    detail = f"attach type {attach_type}, flags {flags:#x}, target {target or target_fd!r}"
    hint = ""
    if err == 1:  # EPERM
        # Why two causes: EPERM is also the answer when an ancestor's program was attached
        # without BPF_F_ALLOW_MULTI (or OVERRIDE), which forbids any below it.
        hint = _BPF_CAPABILITY_HINT + ", or a parent cgroup holds a program that allows none below it"
    elif err == 9:  # EBADF
        hint = "the target is not a cgroup v2 directory"
    elif err == 22:  # EINVAL
        hint = "this kernel cannot attach that program type to cgroups (CONFIG_CGROUP_BPF is off?)"
    raise SyscallError(err, "bpf(BPF_PROG_ATTACH)", detail, hint)


# ioctl numbers for interface flags (linux/sockios.h) and IFF_UP (linux/if.h).
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def set_link_up(name: str) -> None:
    """Bring an interface up with SIOCSIFFLAGS.

    Why an ioctl and not netlink: a box's loopback is the one link every box needs, and this
    costs microseconds, where opening a netlink socket per box would cost milliseconds.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", name.encode(), 0)
        try:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request)
            flags = struct.unpack("16sH14x", reply)[1] | _IFF_UP
            fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags))
        except OSError as exc:
            raise SyscallError(exc.errno or 0, "ioctl(SIOCSIFFLAGS)", f"interface {name!r}") from exc


# The new mount API (Linux 5.2+; mount_setattr 5.12+), which glibc 2.36 does not wrap.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_MOUNT_SETATTR = 442
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_IDMAP = 0x00100000  # Linux 5.12
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = 0o2000000  # O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
AT_EMPTY_PATH = 0x1000


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _fs_log(fs_fd: int) -> str:
    """What the filesystem said about a failed ``fsconfig`` (its context's message log)."""
    lines = []
    for _ in range(8):
        try:
            lines.append(os.read(fs_fd, 1024).decode(errors="replace").strip())
        except OSError:
            break
    return "; ".join(line for line in lines if line)


def fsopen(fstype: str) -> int:
    """fsopen(2): a filesystem context of ``fstype``, to configure with ``fsconfig``."""
    result = _libc.syscall(ctypes.c_long(_SYS_FSOPEN), ctypes.c_char_p(fstype.encode()), FSOPEN_CLOEXEC)
    hint = f"the kernel does not support filesystem type {fstype!r} (modprobe it?)"
    return _check(result, "fsopen", repr(fstype), hint if ctypes.get_errno() == errno.ENODEV else "")


def fsconfig(fs_fd: int, command: int, key: str | None = None, value: str | None = None) -> None:
    """fsconfig(2): set one option (or, with ``FSCONFIG_CMD_CREATE``, make the superblock);
    the error carries what the filesystem logged about it."""
    result = _libc.syscall(
        ctypes.c_long(_SYS_FSCONFIG),
        ctypes.c_int(fs_fd),
        ctypes.c_uint(command),
        None if key is None else ctypes.c_char_p(key.encode()),
        None if value is None else ctypes.c_char_p(value.encode()),
        ctypes.c_int(0),
    )
    if result < 0:
        err = ctypes.get_errno()
        what = "create" if command == FSCONFIG_CMD_CREATE else f"{key}={value!r}" if value else str(key)
        raise SyscallError(err, "fsconfig", what, _fs_log(fs_fd))


def fsmount(fs_fd: int, attributes: int) -> int:
    """fsmount(2): a mount of the context's filesystem, attached nowhere yet (its fd)."""
    result = _libc.syscall(
        ctypes.c_long(_SYS_FSMOUNT),
        ctypes.c_int(fs_fd),
        ctypes.c_uint(FSMOUNT_CLOEXEC),
        ctypes.c_uint(attributes),
    )
    return _check(result, "fsmount", f"attributes {attributes:#x}")


def move_mount_fd(mount_fd: int, target_fd: int) -> None:
    """move_mount(2) of the mount ``mount_fd`` onto the directory ``target_fd`` (an O_PATH fd)."""
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOVE_MOUNT),
        ctypes.c_int(mount_fd),
        ctypes.c_char_p(b""),
        ctypes.c_int(target_fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )
    _check(result, "move_mount", f"mount fd {mount_fd} onto fd {target_fd}")


def mount_setattr_fd(mount_fd: int, attr_set: int, attr_clr: int) -> None:
    """mount_setattr(2) on the mount ``mount_fd`` refers to (not recursive): e.g. read-only."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(mount_fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, "mount_setattr", f"set {attr_set:#x} clear {attr_clr:#x}")


def open_tree_clone(path: str) -> int:
    """open_tree(2) with ``OPEN_TREE_CLONE``: a detached copy of the mount at ``path`` (not
    the mounts below it), attached nowhere until ``move_mount``."""
    result = _libc.syscall(
        ctypes.c_long(_SYS_OPEN_TREE),
        ctypes.c_int(-100),  # AT_FDCWD
        ctypes.c_char_p(path.encode()),
        ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
    )
    return _check(result, "open_tree", repr(path))


def mount_setattr_idmap(mount_fd: int, userns_fd: int, attr_set: int = 0) -> None:
    """mount_setattr(2) ``MOUNT_ATTR_IDMAP`` (plus ``attr_set``) on the detached mount
    ``mount_fd``: its files' owners appear mapped through the user namespace ``userns_fd``
    (host uid N shows as the namespace's uid whose host id is N)."""
    attr = _MountAttr(attr_set | MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(mount_fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, "mount_setattr", "MOUNT_ATTR_IDMAP")
