"""Which device nodes a box may use: its own few, plus those a test names (``devices=[...]``).

A default box is kept off the host's devices three ways, as runc and bubblewrap keep theirs:

- every filesystem it gets is mounted ``nodev`` (its overlay root, the tmpfs it asks for, the
  files bound over ``/etc``), so a device node shipped in an image, or left by a privileged
  tool, cannot be opened; only its own ``/dev`` (and ``/dev/pts``) honour nodes;
- its commands lack ``CAP_MKNOD`` and ``CAP_SYS_ADMIN``, so they can neither make a node in
  ``/dev`` nor mount or bind anything that would;
- on cgroup v1 the ``devices`` controller refuses every device but the ones listed here
  (``cgroup_rules``), whatever node names it.

On cgroup v2 there is no devices controller: the kernel asks an eBPF program of type
``BPF_PROG_TYPE_CGROUP_DEVICE`` instead, which runc assembles and loads. pytest-nsbox does not:
with no node openable outside ``/dev`` (nodev) and no way to make or mount one there (no
``CAP_MKNOD``, no ``CAP_SYS_ADMIN``), the program would refuse nothing the first two guards do
not already refuse. A privileged box keeps every capability and is left as it was, on both.

Like ``init``, this module imports only the standard library: the zygote and each box's init
use it.
"""

from __future__ import annotations

import os
import stat

from .errors import ConfigError

TYPE_CHECKING = False  # typing stays out of the box helper (see zygote_process)
if TYPE_CHECKING:
    from typing import Any

# The nodes every box may open, as runc's default allowlist (libcontainer's default devices):
# null, zero, full, random, urandom, tty, console, ptmx and the pseudo-terminals of its devpts.
# Less runc's "mknod any node" rules ("c *:* m", "b *:* m") and no "m" here: a box's /dev is
# made before it joins its cgroup, and nothing in it may make another node. Less tun (10:200)
# too: a box that needs it asks with devices=["/dev/net/tun"].
ALLOWED = (
    "c 1:3 rw",  # /dev/null
    "c 1:5 rw",  # /dev/zero
    "c 1:7 rw",  # /dev/full
    "c 1:8 rw",  # /dev/random
    "c 1:9 rw",  # /dev/urandom
    "c 5:0 rw",  # /dev/tty
    "c 5:1 rw",  # /dev/console
    "c 5:2 rw",  # /dev/pts/ptmx (/dev/ptmx links to it)
    "c 136:* rw",  # /dev/pts/N
)


def box_devices(paths: tuple[str, ...] | list[str]) -> list[list[Any]]:
    """``[path, "c" | "b", major, minor, mode]`` of each host device node in ``paths``.

    Read when the box starts (``spec.py`` checked them when the box was described), so the box
    gets the node the host has now; sent to the box's init and its zygote as plain lists.
    """
    found: list[list[Any]] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as exc:
            raise ConfigError(
                f"devices: {path!r} is gone from this host ({exc.strerror}); name a device node that exists"
            ) from None
        kind = "b" if stat.S_ISBLK(info.st_mode) else "c"
        found.append([path, kind, os.major(info.st_rdev), os.minor(info.st_rdev), stat.S_IMODE(info.st_mode)])
    return found


def cgroup_rules(devices: list[list[Any]]) -> list[str]:
    """The v1 ``devices.allow`` lines of a box: the default allowlist, then its own devices,
    which it may also ``mknod`` (its init makes their nodes once it is in the cgroup)."""
    return list(ALLOWED) + [f"{kind} {major}:{minor} rwm" for _path, kind, major, minor, _mode in devices]


def restrict_v1(directory: str, rules: list[str]) -> None:
    """Make the v1 devices cgroup ``directory`` deny every device but ``rules``.

    Why "a" first: writing it to ``devices.deny`` switches the cgroup to deny-by-default and
    clears what it inherited (the kernel refuses that while the cgroup has children, and a box's
    never has). An allow line the parent itself does not allow (a host that runs us in a
    restricted cgroup) is refused with EPERM: the box could not have that device anyway.
    """
    with open(f"{directory}/devices.deny", "w") as handle:
        handle.write("a")
    # One descriptor for every rule: the kernel parses each write(2) as one rule, and an open
    # per rule cost four times as much (0.17 ms against 0.04 ms a box, here).
    allow = os.open(f"{directory}/devices.allow", os.O_WRONLY | os.O_CLOEXEC)
    try:
        for rule in rules:
            try:
                os.write(allow, rule.encode())
            except PermissionError:
                continue
    finally:
        os.close(allow)


def make_nodes(dev: str, devices: list[list[Any]]) -> None:
    """Make each ``[path, kind, major, minor, mode]`` node under the box's ``/dev`` (``dev``),
    with its parent directories (``/dev/net/tun``); a node the box has already is kept."""
    for path, kind, major, minor, mode in devices:
        target = dev + str(path)[len("/dev") :]
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        node_type = stat.S_IFBLK if kind == "b" else stat.S_IFCHR
        try:
            os.mknod(target, mode | node_type, os.makedev(major, minor))
        except FileExistsError:
            continue
        os.chmod(target, mode)  # mknod applies the umask


__all__ = ["ALLOWED", "box_devices", "cgroup_rules", "make_nodes", "restrict_v1"]
