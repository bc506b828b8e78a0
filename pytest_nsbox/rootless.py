"""Boxes without root: the box helper in a user namespace of the user who runs pytest.

When pytest runs as an ordinary user, the helper (``zygote``) makes a user namespace as it
starts, in which it is root with every capability over what that namespace owns: the mount,
pid, uts, ipc, net and time namespaces of every box it forks. The host's kernel still sees
the user's own ids, so a box can do no more on the host than the user could.

Which ids the namespace maps (``IdPlan``):

- the user's subordinate range from ``/etc/subuid`` and ``/etc/subgid``, written by the
  setuid helpers ``newuidmap``/``newgidmap`` (Debian's ``uidmap`` package): root in the box
  is the user, and ids 1..65535 are the range's, so ``su``, ``chown`` and apt's ``_apt``
  work in a box;
- otherwise the user's own id alone, which the user may map without help: root in the box is
  the user, and no other id exists there (``chown`` to another user fails, as in
  ``unshare --map-root-user``).

Where things go: the image cache under ``$XDG_CACHE_HOME`` (``~/.cache``), the state under
``$XDG_RUNTIME_DIR`` (``/run/user/UID``; a private directory in ``/tmp`` without one).

Why this module imports nothing of the package but ``errors``: ``state`` and ``layers`` ask
it where their directories are, and the plugin asks it what this host lacks.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import HostUnsupportedError

RANGE_SIZE = 65536  # ids a rootless box maps when the user has a subordinate range


def active() -> bool:
    """Whether boxes are made rootless: pytest is not root."""
    return os.geteuid() != 0


@dataclass(frozen=True)
class IdPlan:
    """How the helper's user namespace maps ids: ``(inside, outside, count)`` lines."""

    uid_lines: tuple[tuple[int, int, int], ...]
    gid_lines: tuple[tuple[int, int, int], ...]
    helpers: bool  # written by newuidmap/newgidmap (a subordinate range), not by ourselves

    @property
    def describe(self) -> str:
        if self.helpers:
            start, count = self.uid_lines[1][1], self.uid_lines[1][2]
            return f"root is uid {os.geteuid()}, ids 1-{count} are {start}-{start + count - 1} (/etc/subuid)"
        return f"root is uid {os.geteuid()}, no other id (no /etc/subuid range, or no newuidmap)"


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return ""


def subordinate_range(kind: str, path: str | None = None) -> tuple[int, int] | None:
    """The first range of ``/etc/sub{kind}`` (kind "uid" or "gid") for this user, by name or
    by number, of at least ``RANGE_SIZE - 1`` ids: ``(start, count)``, or None."""
    names = {_user_name(), str(os.getuid())} - {""}
    try:
        with open(path or f"/etc/sub{kind}") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in names:
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if start > 0 and count >= RANGE_SIZE - 1:
            return start, RANGE_SIZE - 1
    return None


def id_plan() -> IdPlan:
    """The subordinate ranges through newuidmap/newgidmap when the user has both and the
    programs are installed; the user's own ids otherwise."""
    uid, gid = os.geteuid(), os.getegid()
    uids, gids = subordinate_range("uid"), subordinate_range("gid")
    if uids and gids and shutil.which("newuidmap") and shutil.which("newgidmap"):
        return IdPlan(((0, uid, 1), (1, *uids)), ((0, gid, 1), (1, *gids)), helpers=True)
    return IdPlan(((0, uid, 1),), ((0, gid, 1),), helpers=False)


def map_ids(pid: int, plan: IdPlan) -> None:
    """Write the id maps of process ``pid``, which has just made its user namespace."""
    if plan.helpers:
        for program, lines in (("newuidmap", plan.uid_lines), ("newgidmap", plan.gid_lines)):
            argv = [program, str(pid)] + [str(n) for line in lines for n in line]
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                why = result.stderr.strip() or f"exit status {result.returncode}"
                raise HostUnsupportedError(
                    f"rootless boxes: `{' '.join(argv)}` failed: {why}; "
                    "check this user's lines in /etc/subuid and /etc/subgid, or remove them to map "
                    "your own id alone"
                )
        return
    try:
        # An unprivileged process may map its own ids only, and a group map only once the
        # namespace may no longer call setgroups (which could drop a group that denies access).
        _write(f"/proc/{pid}/setgroups", "deny")
        _write(f"/proc/{pid}/uid_map", "".join(f"{a} {b} {c}\n" for a, b, c in plan.uid_lines))
        _write(f"/proc/{pid}/gid_map", "".join(f"{a} {b} {c}\n" for a, b, c in plan.gid_lines))
    except OSError as exc:
        raise HostUnsupportedError(
            f"rootless boxes: cannot write the id maps of the box helper (pid {pid}): {exc}"
        ) from exc


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/pytest-nsbox`` (``~/.cache/pytest-nsbox``): the user's image cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-nsbox"


def runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/pytest-nsbox``: the user's state (leases, locks), gone at logout;
    ``/tmp/pytest-nsbox-UID`` without a runtime directory (a CI job, ``su``)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return Path(base) / "pytest-nsbox"
    return Path(f"/tmp/pytest-nsbox-{os.getuid()}")


# Host directories a rootless box of the host's root may add files to (see host_skeleton).
SKELETON_TREES = ("etc", "var", "opt", "srv", "usr/local", "mnt", "media")
_SKELETON_MAX = 20000  # directories at most: the walk and the copy stay tens of milliseconds


def host_skeleton() -> str | None:
    """A layer of empty directories mirroring the host's ``/etc``, ``/var``, ``/opt``, ...,
    owned by the user, to stack over the host's root in a rootless box.

    Why: the host root's directories belong to an id the user's namespace does not have, so
    root in the box could create nothing in them (``/etc/app``, ``/var/lib/app``, ``/opt``).
    Overlay takes a merged directory's owner from its topmost layer: with this one on top,
    they are the box root's, and the box writes new files there (into its own upper layer).
    Existing host files stay read-only. Built once per set of directories (a walk of about
    2,000 directories), kept in the user's cache; None if it cannot be made.
    """
    entries: list[tuple[str, int]] = []
    cache = cache_home()
    for tree in SKELETON_TREES:
        top = f"/{tree}"
        if str(cache.resolve()).startswith(f"/{tree.split('/')[0]}/"):
            continue  # the layer would lie inside the directory it covers: overlay refuses that
        try:
            device = os.lstat(top).st_dev
        except OSError:
            continue
        for directory, names, _files in os.walk(top):
            try:
                info = os.lstat(directory)
            except OSError:
                names[:] = []
                continue
            if info.st_dev != device or len(entries) >= _SKELETON_MAX:
                names[:] = []  # another filesystem (a container store, a share): not ours to mirror
                continue
            entries.append((directory.lstrip("/"), info.st_mode & 0o7777))
    if not entries:
        return None
    digest = hashlib.sha256(repr(entries).encode()).hexdigest()[:16]
    final = cache / f"host-skeleton-{digest}"
    if final.is_dir():
        return str(final)
    building = cache / f"host-skeleton-{digest}.{os.getpid()}.tmp"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _remove_tree(building)
        building.mkdir(mode=0o755)
        modes = {relative: mode for relative, mode in entries}
        for parts in {
            Path(relative).parts[:i] for relative in modes for i in range(1, len(Path(relative).parts))
        }:
            modes.setdefault(str(Path(*parts)), os.lstat("/" + str(Path(*parts))).st_mode & 0o7777)
        for relative in sorted(modes):  # parents first, all writable while we fill them
            (building / relative).mkdir(mode=0o700, exist_ok=True)
        for relative in sorted(modes, reverse=True):  # then their modes, children first
            (building / relative).chmod(modes[relative])
        os.rename(building, final)
    except FileExistsError:
        _remove_tree(building)  # another process of ours was first
    except OSError:
        _remove_tree(building)
        return None
    except BaseException:
        _remove_tree(building)
        raise
    for old in cache.glob("host-skeleton-*"):
        if old != final and not old.name.endswith(".tmp"):
            _remove_tree(old)
    return str(final)


def is_skeleton(layer: str) -> bool:
    """Whether ``layer`` is a ``host_skeleton``: never one of an image's layers (a snapshot or
    a template of a rootless box records the host's root without it)."""
    return os.path.basename(layer).startswith("host-skeleton-")


def _remove_tree(path: Path) -> None:
    """rmtree of a skeleton, whose directories may be read-only (the host's modes)."""
    if not path.exists():
        return
    for directory, _names, _files in os.walk(path):
        try:
            os.chmod(directory, 0o700)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


_helper_pid = 0  # this process's box helper, whose network namespace is the session's


def note_helper(pid: int) -> None:
    """The box helper (``zygote``) records itself as it starts: its namespace is the session's."""
    global _helper_pid
    _helper_pid = pid


def session_interfaces() -> set[str]:
    """The interfaces of the session's network namespace (the helper's ``/proc/PID/net/dev``:
    our own sysfs shows the host's); empty before a helper started, as then none exist."""
    if not _helper_pid:
        return set()
    try:
        with open(f"/proc/{_helper_pid}/net/dev") as handle:
            return {line.split(":", 1)[0].strip() for line in handle.readlines()[2:]}
    except OSError:
        return set()


# Sysctls that keep an ordinary user from making a user namespace, and the fix for each.
_SYSCTLS = (
    (
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        lambda v: v == "1",
        "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10+): "
        "`sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor profile "
        "allowing `userns` for this Python",
    ),
    (
        "/proc/sys/user/max_user_namespaces",
        lambda v: v == "0",
        "user namespaces are switched off (user.max_user_namespaces=0): "
        "`sudo sysctl user.max_user_namespaces=15000`",
    ),
    (
        "/proc/sys/kernel/unprivileged_userns_clone",
        lambda v: v == "0",
        "unprivileged user namespaces are switched off (Debian's kernel.unprivileged_userns_clone=0): "
        "`sudo sysctl kernel.unprivileged_userns_clone=1`",
    ),
)


def blockers() -> list[str]:
    """What on this host keeps an ordinary user from making boxes, each with its fix; empty
    when nothing is known to. A seccomp profile that forbids ``unshare`` (a container's) shows
    only when trying: ``unshare_refused`` words that."""
    found = []
    for path, blocks, fix in _SYSCTLS:
        try:
            with open(path) as handle:
                value = handle.read().strip()
        except OSError:
            continue
        if blocks(value):
            found.append(fix)
    if not os.path.exists("/proc/self/ns/user"):
        found.append("the kernel has no user namespaces (CONFIG_USER_NS): a kernel with them, or run as root")
    return found


def try_user_namespace() -> str | None:
    """Make a user namespace in a throwaway process (util-linux ``unshare``); None if it
    worked (or cannot be tried), else why not: what only trying shows, such as a container's
    seccomp profile that forbids ``unshare``."""
    program = shutil.which("unshare")
    if program is None:
        return None
    try:
        result = subprocess.run([program, "--user", "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode == 0:
        return None
    stderr = result.stderr.strip()
    if "Operation not permitted" in stderr:
        return unshare_refused(1, "Operation not permitted")
    if "No space left" in stderr:
        return unshare_refused(28, "No space left on device")
    return f"rootless boxes: `unshare --user true` failed: {stderr or result.returncode}"


def unshare_refused(err: int, strerror: str) -> str:
    """Why the helper could not make its user namespace, and what to do."""
    known = blockers()
    if known:
        return "rootless boxes: cannot make a user namespace: " + "; ".join(known)
    if err == 1:  # EPERM with no sysctl to blame: a seccomp filter (a container's profile)
        return (
            f"rootless boxes: unshare(CLONE_NEWUSER) was refused ({strerror}): a seccomp profile "
            "forbids it here (a container's default?); run the container with a profile that "
            "allows unshare (podman/docker --security-opt seccomp=unconfined), or run pytest as root"
        )
    if err == 28:  # ENOSPC: the per-user count of user namespaces
        return (
            f"rootless boxes: unshare(CLONE_NEWUSER) failed ({strerror}): this user has as many user "
            "namespaces as user.max_user_namespaces allows; raise it with sysctl"
        )
    return f"rootless boxes: unshare(CLONE_NEWUSER) failed ({strerror})"


__all__ = [
    "RANGE_SIZE",
    "IdPlan",
    "active",
    "blockers",
    "cache_home",
    "id_plan",
    "map_ids",
    "runtime_dir",
    "subordinate_range",
    "unshare_refused",
]
