"""The zygote process itself: the loop that clones every box (the host's handle is ``zygote``).

Why a module of its own, and why so few imports: every page of this process is shared with
each box it forks, so its size is paid at every fork (page tables copied), every box's exit
(page tables torn down) and every write after the fork (a page copied). Everything here and
below (``init``, ``channel``, ``syscalls``, ``errors``) therefore imports only the standard
library's basics: no ``typing``, ``subprocess``, ``pathlib`` or ``dataclasses``, and no cgroup
driver: the host works out where box cgroups go and hands over plain paths (``Plan``).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time

from . import channel, devices, init, overlay, rtnl, syscalls
from .errors import permission_hint
from .syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWTIME,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# No CLONE_NEWCGROUP here: the box joins its own cgroup when it is handed out, and only then
# makes its cgroup namespace, so that inside it /proc/self/cgroup shows "/".
BOX_NAMESPACES = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID
NAME_PREFIX = "nsb-"  # cgroups.NAME_PREFIX, which this process does not import
VETH_PREFIX = "nsbv"  # network.names.VETH_PREFIX, which this process does not import
BOX_INTERFACE = "eth0"
_VETH_ATTEMPTS = 3
USERNS_SIZE = 65536  # ids a box's user namespace maps (idmap.RANGE_SIZE, which this process does not import)


def main(argv: list[str]) -> None:
    """Entry point: ``FD PARENT_PID PDEATHSIG CGROUP_PLAN_JSON [rootless]`` (see ``zygote.Zygote``)."""
    fd, parent, pdeathsig = int(argv[1]), int(argv[2]), argv[3] == "1"
    rootless = len(argv) > 5 and argv[5] == "rootless"
    global _plan
    _plan = Plan(json.loads(argv[4]) if len(argv) > 4 else {})
    # Its command line names the host's interpreter and cgroup paths, its environment is what
    # the host gave it: every box it forks would show both as its PID 1's. Each box renames
    # itself again (nsbox-waiting, then nsbox-init) in its own copy of these pages.
    syscalls.set_process_name("nsbox-zygote")
    syscalls.hide_environment()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Why SIGTERM, not SIGKILL: when pytest dies, the zygote still kills and reaps its boxes and
    # removes their cgroups, which nobody else would.
    signal.signal(signal.SIGTERM, _terminate)
    if pdeathsig:
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above: nobody to serve
            os._exit(0)
    sock = socket.socket(fileno=fd)
    if rootless:
        _enter_user_namespace(sock)
    syscalls.release_free_heap()  # before the first fork: every box would carry it
    _serve(sock)


def _enter_user_namespace(sock: socket.socket) -> None:
    """Rootless: make our user namespace, have the host write its id maps (it may run the
    setuid ``newuidmap``; we, inside, no longer could), and become its root. Every namespace
    a box is born in is then owned by it, so this process may make them, mount in them and
    own their files, with no right over the host's.
    """
    try:
        syscalls.unshare(CLONE_NEWUSER)
    except OSError as exc:
        channel.send(sock, {"userns": {"errno": exc.errno, "strerror": exc.strerror or str(exc)}})
        os._exit(0)
    channel.send(sock, {"userns": "made"})
    message, _fds = channel.recv(sock)
    if not message or message.get("go") is not True:
        os._exit(0)  # the host could not map our ids: it says why
    try:
        os.setgroups([])
    except OSError:
        pass  # one id mapped: setgroups is denied, and we have no other group anyway
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # A change of ids makes a process undumpable, and its /proc files root's of the host's
    # namespace: set_process_name of every box writes /proc/self/mem.
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)
    # Overlay in a user namespace keeps its own xattrs (opaque directories) in user.overlay.*.
    overlay.in_user_namespace = True
    # The session's own network namespace: the bridges of its bridged boxes and their veths'
    # host ends live here, where we may change anything; the host's is out of our reach.
    syscalls.unshare(CLONE_NEWNET)
    syscalls.set_link_up("lo")


class Plan:
    """Where box cgroups are made and removed, worked out by the host's cgroup driver.

    ``make``: the parent directories a box cgroup is made in (one per hierarchy every box
    joins); ``remove``: every parent one may be in (the host joins some late, on demand);
    ``delegate``: the controllers to enable again in a v2 parent that had to be remade;
    ``devices``: the v1 devices parent (one of ``make``), whose box cgroups get an allowlist;
    ``device_filter``: the v2 parent (one of ``make``), whose box cgroups get the allowlist as
    an eBPF device program;
    ``error``: why there are no box cgroups, told to a box that asks for limits.
    """

    def __init__(self, plan: dict[str, Any]) -> None:
        self.make: list[str] = list(plan.get("make", []))
        self.remove: list[str] = list(plan.get("remove", []))
        self.delegate: list[str] = list(plan.get("delegate", []))
        self.devices: str = str(plan.get("devices", ""))
        self.device_filter: str = str(plan.get("device_filter", ""))
        # Why the first failure is kept: a kernel without CONFIG_CGROUP_BPF, or a container
        # without CAP_SYS_ADMIN/CAP_BPF, refuses every box alike; trying again costs each one.
        self.device_filter_error: str = ""
        self.error: str = str(plan.get("error", ""))

    def make_cgroup(self, name: str, device_rules: list[str] | None = None) -> list[str]:
        """mkdir the box's cgroup in every ``make`` parent, its devices cgroup (v1) or its v2
        cgroup's device program allowing only ``device_rules`` (None: all its parent allows);
        raises OSError (and undoes).

        Why here, before the box joins: the allowlist is in place before anything in the box
        can open a device, and the zygote, root with every capability, may write it.
        """
        made: list[str] = []
        try:
            for parent in self.make:
                path = f"{parent}/{name}"
                try:
                    if self.delegate:
                        self._delegate_in(parent)
                    os.mkdir(path)
                except FileNotFoundError:
                    self._remake_parent(parent)  # another process removed it with its last box
                    os.mkdir(path)
                made.append(path)
                if parent == self.devices and device_rules is not None:
                    devices.restrict_v1(path, device_rules)
                if parent == self.device_filter and device_rules is not None and not self.device_filter_error:
                    try:
                        devices.restrict_v2(path, device_rules)
                    except OSError as exc:
                        # The box still starts: nodev and no CAP_MKNOD keep it off host
                        # devices; `nsbox doctor` tells whether this host has the filter.
                        self.device_filter_error = str(exc)
        except OSError:
            self.remove_cgroup(name)
            raise
        return made

    def _remake_parent(self, parent: str) -> None:
        try:
            os.mkdir(parent)
        except FileExistsError:
            pass
        self._delegate_in(parent)

    def _delegate_in(self, parent: str) -> None:
        """Have the v2 ``parent`` delegate our controllers before a box cgroup is made in it.

        Why each time (one small read): the shared parent can be removed by another process
        with its last box and remade by a third, and a box cgroup made in it before that one
        has enabled the controllers would have no ``pids.max``, ``memory.max``, ... files.
        """
        try:
            with open(f"{parent}/cgroup.subtree_control") as handle:
                enabled = handle.read().split()
        except FileNotFoundError:
            if not os.path.isdir(parent):
                raise  # the parent itself is gone: the caller remakes it
            return  # a v1 hierarchy: nothing to delegate
        except OSError:
            return
        for controller in self.delegate:
            if controller in enabled:
                continue
            try:
                with open(f"{parent}/cgroup.subtree_control", "w") as handle:
                    handle.write(f"+{controller}")
            except OSError:
                pass  # a box that needs it is told by the host when it sets the limit

    def remove_cgroup(self, name: str) -> bool:
        """rmdir the box's cgroup wherever it is; False if one is still busy (host retries)."""
        gone = True
        for parent in self.remove:
            try:
                os.rmdir(f"{parent}/{name}")
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone

    def remove_parents(self) -> None:
        """The shared parents go with the last process using them; others' boxes keep them."""
        for parent in self.remove:
            try:
                os.rmdir(parent)
            except OSError:
                pass


_plan = Plan({})


def _terminate(_sig: int, _frame: object) -> None:
    raise SystemExit(0)  # unwinds the serve loop into its cleanup


def _serve(sock: socket.socket) -> None:
    def handle(message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        with _sigterm_held:
            if op == "want":  # the host has no waiting box that fits: make one now
                _clone_warm(sock, dict(message["hint"]), int(message["seq"]))
            elif op == "make":  # a box made for its options (clocks, user namespace), handed out at once
                clock = message.get("clock")
                _clone_warm(
                    sock, dict(message["hint"]), int(message["seq"]), dict(clock) if clock else None, True
                )
            elif op == "taken":  # the host gave a waiting box to a test: make the next
                _taken(int(message["pid"]))
                _clone_warm(sock, dict(message["hint"]), int(message["seq"]))
            elif op == "forget":
                _forget(int(message["pid"]))
            elif op == "socket":  # rootless: the host's way into a namespace it may not join
                _open_socket(sock, message)

    def reap() -> None:
        with _sigterm_held:
            _reap()

    try:
        channel.serve(sock, handle, reap)  # until EOF: pytest is gone, or done with us
    finally:
        _shutdown()  # also after SIGTERM (pytest died) or a crash: boxes and cgroups go


class _SigtermHeld:
    """Defer SIGTERM until the bookkeeping is consistent again.

    Why: a SIGTERM that lands between making a cgroup and recording it (or between forgetting
    a reaped box's cgroup and removing it) would leave that cgroup to nobody.
    """

    def __enter__(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def __exit__(self, *exc_info: object) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


_sigterm_held = _SigtermHeld()

_boxes: set[int] = set()  # pids of the box inits this zygote forked and has not reaped


def _reap() -> None:
    for pid, _status in channel.reaped_children():
        _boxes.discard(pid)
        _remove_box_cgroup(pid)


def _remove_box_cgroup(pid: int) -> None:
    """Once a box's init is reaped its cgroup is empty (the kernel killed the rest first):
    remove it, in every hierarchy, those the host joined late included. The host tries too;
    the first one wins. This covers the boxes that never started, and every box of a host
    that died."""
    name = _unclaimed_cgroups.pop(pid, "") or _handed_out_cgroups.pop(pid, "")
    if name and not _plan.remove_cgroup(name):
        # Busy for a moment (a v1 cgroup can refuse rmdir just after its last task left):
        # the host retries, but a host that died will not, so it is tried again at our end.
        _busy_cgroups.add(name)
        if len(_busy_cgroups) > 64:  # keep the record short: forget those removed since
            _busy_cgroups.difference_update([n for n in list(_busy_cgroups) if _plan.remove_cgroup(n)])


def _forget(pid: int) -> None:
    """A kept box (``--nsbox-keep``) is on its own now: neither killed, reaped nor its cgroup
    removed by us; ``nsbox gc`` ends it."""
    _boxes.discard(pid)
    _handed_out_cgroups.pop(pid, None)


def _shutdown() -> None:
    """Kill every box still running and reap them all before exiting.

    Why not just exit: PDEATHSIG would kill them, but their zombies (and those of boxes the
    host just stopped) would be left to the host's init, which may take its time reaping.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # a second one must not cut this short
    for pid in _boxes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Only our boxes: a kept one is a child too, and lives on (adopted by the host's init).
    for pid in list(_boxes) + list(_unclaimed_cgroups):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        _remove_box_cgroup(pid)
    deadline = time.monotonic() + 2.0
    while _busy_cgroups and time.monotonic() < deadline:
        _busy_cgroups.difference_update([n for n in list(_busy_cgroups) if _plan.remove_cgroup(n)])
        if _busy_cgroups:
            time.sleep(0.01)
    _plan.remove_parents()
    os._exit(0)


# Box cgroup names by init pid, removed when the init is reaped: unclaimed ones (never handed
# out) and handed-out ones (the host's from then on; should it die, ours again at the end).
_unclaimed_cgroups: dict[int, str] = {}
_handed_out_cgroups: dict[int, str] = {}
_busy_cgroups: set[str] = set()  # whose removal failed: tried again at the end


def _taken(pid: int) -> None:
    """The host's now: it renames nothing, but should it die without removing the box's
    cgroup, the zygote does so at its own end (see _shutdown)."""
    name = _unclaimed_cgroups.pop(pid, "")
    if name:
        _handed_out_cgroups[pid] = name


def _clone_warm(
    zygote_sock: socket.socket,
    hint: dict[str, Any],
    seq: int,
    clock: dict[str, int] | None = None,
    made: bool = False,
) -> None:
    """Clone the next box and announce it to the host with its control socket.

    The box builds its root from ``hint`` (the layers and privilege of the box before it,
    which the next test most likely wants too) while the test runs, on the other core. The
    host sends its options straight to it; should the host drop the socket unused, the box
    exits on EOF and is reaped here. With ``clock`` (nanoseconds by clock name), the box is
    born in a time namespace of its own with those offsets; ``made``: the box is the host's at
    once (made for its clocks or its user namespace, not one of the waiting boxes).
    """
    own_time = -1
    if clock:
        try:
            own_time = _unshare_time(clock)
        except _ClockError as exc:
            _announce(zygote_sock, {"error": {"message": str(exc), "kind": "config"}, "seq": seq})
            return
        except OSError as exc:
            message = f"cannot make the box's time namespace: {exc}"
            _announce(zygote_sock, {"error": {"message": message}, "seq": seq})
            return
    try:
        _clone_box(zygote_sock, hint, seq, made)
    finally:
        if own_time >= 0:
            _restore_time(own_time)


def _clone_box(zygote_sock: socket.socket, hint: dict[str, Any], seq: int, handed_out: bool) -> None:
    name = NAME_PREFIX + os.urandom(4).hex()
    cgroup_error = _plan.error
    cgroup: list[str] = []
    if _plan.make:
        try:
            # A privileged box keeps every device its parent allows, as before.
            rules = None if hint.get("privileged") else devices.cgroup_rules(hint.get("devices") or [])
            cgroup = _plan.make_cgroup(name, rules)
        except OSError as exc:
            # A read-only cgroupfs (a container without --privileged): boxes still run, without
            # limits; a box that asks for limits is told why it cannot have them.
            cgroup_error = f"cannot create cgroup {name} ({exc.strerror}); " + permission_hint(
                "creating a cgroup"
            )
    ours, theirs = channel.socketpair()
    userns = hint.get("userns")
    flags = BOX_NAMESPACES
    sync: tuple[socket.socket, socket.socket] | None = None
    if userns:
        # Why a pipe of its own: the child must not go on (mount anything, or become the
        # namespace's root) before its id maps are written and its layers idmapped, here.
        flags |= CLONE_NEWUSER
        sync = channel.socketpair()
    # Every signal is blocked across the fork: a handler of the zygote's (SIGTERM raises
    # SystemExit) must never run in the child, where it would unwind the zygote's stack and
    # its shutdown inside the new box. Each side restores the mask itself.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        # The child is born in the box's namespaces as PID 1 of its new pid namespace.
        pid = syscalls.fork_into_namespaces(flags)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        ours.close()
        theirs.close()
        for end in sync or ():
            end.close()
        if cgroup:
            _plan.remove_cgroup(name)
        _announce(zygote_sock, {"error": {"message": f"clone into new namespaces: {exc}"}, "seq": seq})
        return
    if pid == 0:
        _become_box(zygote_sock, ours, theirs, mask, cgroup, cgroup_error, hint, sync)  # never returns
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    theirs.close()
    _boxes.add(pid)  # the zygote reaps it in _reap() when it dies
    if cgroup:
        _unclaimed_cgroups[pid] = name
    if handed_out:
        _taken(pid)
    if sync is not None and userns:
        sync[1].close()
        try:
            _release_into_userns(pid, userns, hint, cgroup, sync[0])
        except OSError as exc:
            ours.close()  # the child gets EOF on its sync socket and exits; reaped in _reap()
            error = {"message": str(exc)}
            if isinstance(exc, _IdmapRefused):
                error["kind"] = "unsupported"  # this host's filesystem, not the box: a skip
            _announce(zygote_sock, {"error": error, "seq": seq})
            return
        finally:
            sync[0].close()
    announcement: dict[str, Any] = {"warm": pid, "hint": hint, "seq": seq}
    if hint.get("veth"):
        try:
            announcement["veth"] = _make_veth(pid)
        except OSError as exc:
            # The box is of no use without it: it exits on EOF as we close our end below.
            ours.close()
            _announce(zygote_sock, {"error": {"message": f"cannot create the box's veth: {exc}"}, "seq": seq})
            return
    _announce(zygote_sock, announcement, ours)


class _ClockError(Exception):
    """An offset the kernel refuses for the clock's current value (the host's fault, not ours)."""


def _unshare_time(clock: dict[str, int]) -> int:
    """Give the next child a time namespace of its own with ``clock``'s offsets (nanoseconds
    by clock name); returns a descriptor of the zygote's own, for ``_restore_time``.

    Why here and so: ``unshare(CLONE_NEWTIME)`` leaves the caller where it is and puts its
    *next children* in the new namespace, whose offsets can be written only until a process
    enters it. So they are written now, between the unshare and the fork of the box's PID 1.
    Raises ``_ClockError`` for an offset the kernel refuses, OSError for anything else.
    """
    own = os.open("/proc/self/ns/time", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.unshare(CLONE_NEWTIME)
        offsets = os.open("/proc/self/timens_offsets", os.O_WRONLY | os.O_CLOEXEC)
        try:
            for name, nanoseconds in clock.items():
                seconds, rest = divmod(int(nanoseconds), 1_000_000_000)  # rest 0..999999999, as it must
                try:
                    os.write(offsets, f"{name} {seconds} {rest}\n".encode())
                except OSError as exc:
                    if exc.errno in (errno.EINVAL, errno.ERANGE):
                        raise _ClockError(_refused(name, nanoseconds)) from None
                    raise
        finally:
            os.close(offsets)
    except BaseException:
        _restore_time(own)
        raise
    return own


def _refused(name: str, nanoseconds: int) -> str:
    clock_id = time.CLOCK_BOOTTIME if name == "boottime" else time.CLOCK_MONOTONIC
    now = time.clock_gettime(clock_id)
    offset = nanoseconds / 1e9
    if offset < 0:
        why = f"it would take the box's {name} clock below zero"
        what = f"give a negative offset of less than {now:.0f} seconds"
    else:
        why = f"it would take the box's {name} clock beyond the kernel's range (about 146 years)"
        what = "give a smaller offset"
    return (
        f"clock: the kernel refuses a {name} offset of {offset:+.0f} seconds: {why}; "
        f"the host's {name} clock (its uptime) reads {now:.0f} seconds ({now / 86400:.1f} days) now; {what}"
    )


def _restore_time(own: int) -> None:
    """Back to the zygote's own time namespace for its later children (closes ``own``).

    Why the zygote cannot go on without it: every box forked afterwards would share the
    offsets of this one. It is alone in its process (setns of a time namespace needs a single
    thread) and root, so this does not fail; if it ever did, it stops, with its boxes.
    """
    try:
        syscalls.setns(own, CLONE_NEWTIME)
    except OSError:
        raise SystemExit(1) from None  # unwinds into _shutdown; the host starts another helper
    finally:
        os.close(own)


def _release_into_userns(
    pid: int, userns: list[int], hint: dict[str, Any], cgroup: list[str], sync: socket.socket
) -> None:
    """Make the child of a ``userns`` box its namespace's root, then let it go on.

    Done here, as the host's root, because the child cannot: it writes its own id maps
    (``0 <base> 65536``; a process may write another's maps only with CAP_SETUID/CAP_SETGID
    over the parent namespace), puts it into its cgroup (whose files belong to the host's
    root, which the box's root is not), and clones each image layer as a detached mount
    idmapped through the child's user namespace (mount_setattr needs CAP_SYS_ADMIN in the
    namespace that owns the layer's filesystem: the host's). The mounts go to the child with
    the go-ahead; it stacks its overlay on them (see ``rootfs.build_root``).
    """
    uid_base, gid_base = int(userns[0]), int(userns[1])
    for name, base in (("uid_map", uid_base), ("gid_map", gid_base)):
        try:
            with open(f"/proc/{pid}/{name}", "w") as handle:
                handle.write(f"0 {base} {USERNS_SIZE}\n")
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot write the box's {name} (0 {base} {USERNS_SIZE}): {exc.strerror}"
            ) from None
    for directory in cgroup:
        with open(f"{directory}/cgroup.procs", "w") as handle:
            handle.write(str(pid))
    namespace = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    mounts: list[int] = []
    try:
        for lower in hint["lowers"]:
            try:
                fd = syscalls.open_tree_clone(lower)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot clone the mount of layer {lower}: {exc.strerror}") from None
            mounts.append(fd)
            try:
                syscalls.mount_setattr_idmap(fd, namespace, syscalls.MOUNT_ATTR_RDONLY)
            except OSError as exc:
                raise _IdmapRefused(exc.errno, _idmap_refused(lower, exc)) from None
        channel.send(sync, {"go": True}, mounts)
    finally:
        os.close(namespace)
        for fd in mounts:
            os.close(fd)


class _IdmapRefused(OSError):
    """The kernel refuses an idmapped mount of an image layer (its filesystem lacks them)."""


def _idmap_refused(lower: str, exc: OSError) -> str:
    fstype = "?"
    try:
        best = ""
        with open("/proc/self/mounts") as handle:
            for line in handle:
                fields = line.split()
                point = fields[1].replace("\\040", " ")
                if (lower == point or lower.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, fstype = point, fields[2]
    except OSError:
        pass
    return (
        f"userns: the kernel refuses an idmapped mount of layer {lower} (filesystem {fstype}): "
        f"{exc.strerror}; idmapped mounts need Linux 5.12 and a filesystem that supports them "
        "(ext4, xfs, btrfs, tmpfs from 6.3; not 9p, hostfs or NFS). Put the image cache "
        "(--nsbox-cache) on such a filesystem, or run without userns"
    )


def _open_socket(zygote_sock: socket.socket, message: dict[str, Any]) -> None:
    """Open a socket in the network namespace of box init ``pid`` (0: our own, the session's)
    and hand it to the host.

    Why: a rootless host may not join a box's network namespace (setns needs CAP_SYS_ADMIN
    over its own user namespace too), but a socket keeps the namespace it was made in, and a
    netlink socket the rights of whoever opened it: ours, root over every namespace we made.
    """
    pid, seq = int(message["pid"]), int(message["seq"])
    own = target = -1
    try:
        if pid:
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            syscalls.setns(target, CLONE_NEWNET)
        try:
            made = socket.socket(int(message["family"]), int(message["type"]), int(message["proto"]))
        finally:
            if pid:
                syscalls.setns(own, CLONE_NEWNET)
    except OSError as exc:
        where = f"process {pid}'s network namespace" if pid else "the session's network namespace"
        _announce(zygote_sock, {"error": {"message": f"cannot open a socket in {where}: {exc}"}, "seq": seq})
        return
    finally:
        for fd in (own, target):
            if fd >= 0:
                os.close(fd)
    _announce(zygote_sock, {"socket": True, "seq": seq}, made)


def _make_veth(pid: int) -> list[Any]:
    """The veth of a waiting box that will be bridged: its ``eth0`` in the box's network
    namespace, the host end (a random name, down, on no bridge) here; [name, index].

    Why now: the host only enslaves it and the box configures its end when the box is
    claimed (a few tenths of a millisecond instead of several). Nothing of it needs tearing
    down: both ends go with the box's network namespace, whenever and however the box ends
    (claimed and stopped, dropped unused, or killed with this helper).
    """
    for attempt in range(_VETH_ATTEMPTS):
        name = VETH_PREFIX + os.urandom(6).hex()[:11]
        try:
            return [name, rtnl.make_veth(name, BOX_INTERFACE, pid)]
        except FileExistsError:
            if attempt == _VETH_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _become_box(
    zygote_sock: socket.socket,
    ours: socket.socket,
    theirs: socket.socket,
    mask: set[int | signal.Signals],
    cgroup: list[str],
    cgroup_error: str,
    hint: dict[str, Any],
    sync: tuple[socket.socket, socket.socket] | None = None,
) -> None:
    """The child's side of ``_clone_warm``: drop the zygote's plumbing and become a box.

    Ends in ``os._exit`` whatever happens: an exception here must not return into the
    zygote's loop (a second zygote, inside a box, shutting down the first one's boxes).
    """
    try:
        # The zygote's handlers go before any signal is let through: SIGTERM with the default
        # disposition is ignored by a PID 1 when sent from inside its namespace.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        channel.forget_signal_wakeup()
        # The mask the zygote had, less the SIGTERM it holds while it handles a request.
        signal.pthread_sigmask(signal.SIG_SETMASK, set(mask) - {signal.SIGTERM})
        zygote_sock.close()
        ours.close()
        # Any other descriptor of the zygote must not be held by this one: boxes learn of
        # their host's end by EOF.
        keep = sorted({theirs.fileno(), *([sync[1].fileno()] if sync else [])})
        low = 3
        for fd in keep:
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 16)
        if sync is not None:
            hint = _await_userns(sync[1], hint)
        init.await_box(theirs, cgroup, cgroup_error, hint)  # ends in os._exit itself
    finally:
        os._exit(1)


def _await_userns(sync: socket.socket, hint: dict[str, Any]) -> dict[str, Any]:
    """In the child of a ``userns`` box: wait for the zygote's go-ahead (its id maps written,
    its layers idmapped), then become the namespace's root: uid and gid 0, which are the
    range's first ids on the host, no supplementary groups of the host's root. Returns the
    hint with the layers' mounts (descriptors) for ``rootfs.build_root``."""
    message, fds = channel.recv(sync)
    sync.close()
    if message is None:
        os._exit(0)  # the zygote gave up on this box
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)  # from an unmapped id to the namespace's 0: every capability stays
    # A change of ids makes a process undumpable: its /proc/self files become the host root's,
    # which it no longer is (set_process_name writes /proc/self/mem). Its commands still
    # cannot ptrace it: they have fewer capabilities.
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)
    return {**hint, "lower_fds": fds}


def _announce(
    zygote_sock: socket.socket, message: dict[str, Any], control: socket.socket | None = None
) -> None:
    """Tell the host of a waiting box (and hand it the box's control socket), or of a failure."""
    try:
        channel.send(zygote_sock, message, [control.fileno()] if control is not None else [])
    except OSError:
        pass  # the host is gone: EOF on our socket ends the loop
    finally:
        if control is not None:
            control.close()  # the host's copy is the box's only link now
