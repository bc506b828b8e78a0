"""The capabilities a box's commands may hold, and how the rest are taken away.

Root in a box is root to the host's kernel, with fewer capabilities: this module decides
which. Loaded by the box helper, so it imports the standard library and ``syscalls`` only.
"""

from __future__ import annotations

from . import syscalls

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


def capabilities_to_drop(last_cap: int) -> list[int]:
    """What a box that is not privileged gives up: this process's bounding set (the host's
    may lack some already) less ``BOX_CAPABILITIES``, up to capability ``last_cap``."""
    return [
        cap for cap in range(last_cap + 1) if cap not in _KEPT_CAPABILITIES and syscalls.in_bounding_set(cap)
    ]


# Worked out once, in the zygote before it forks any box (each inherits the zygote's sets):
# the reads would cost every new box most of a millisecond of cold calls.
CAPABILITY_PLAN = (capabilities_to_drop(syscalls.last_capability()), syscalls.capability_sets())


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


__all__ = ["BOX_CAPABILITIES", "CAPABILITY_PLAN", "capabilities_to_drop", "limit_capabilities"]
