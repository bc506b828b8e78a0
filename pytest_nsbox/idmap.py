"""The host id ranges of ``userns=True`` boxes: one range of 65,536 uids and gids per box.

A box's user namespace maps its ids 0..65535 to a range of host ids no user of the host has,
so that its root is nobody to the host's kernel. Each running box leases a range of its own
(two boxes never share host ids, so one box's processes cannot signal or ptrace another's)
from a pool shared by every pytest-nsbox process on the host: ``idmap.json`` under
``state.STATE_DIR``, behind its file lock, each lease naming its owner as (pid, start time), so
that whoever takes the lock next reclaims what a dead owner left (``nsbox gc`` too).

Where the ranges come from: when ``/etc/subuid`` and ``/etc/subgid`` both name ranges for
``root`` of at least 65,536 ids, slices of those (the administrator said which ids root may
hand out, as podman and LXC read them); otherwise from ``DEFAULT_BASE`` (0x10000000, far above
any user or the ranges ``useradd`` gives out, which start at 100000) upward, ``DEFAULT_SLOTS``
ranges in all.

How the image's files become the box's root's: the cached layers belong to the host's root,
and each box's helper clones each layer's mount and idmaps it through the box's namespace
(``mount_setattr(MOUNT_ATTR_IDMAP)``, Linux 5.12), then the box stacks its overlay on those
mounts (overlayfs takes idmapped lower layers from Linux 5.19). Why not copy the layers with
their owners shifted into the range, as runtimes did before idmapped mounts: that copies the
whole image for every range (seconds and gigabytes per box, or per range kept around), and
the shifted copies are shared with nobody; an idmapped mount copies nothing, costs the same
for any image size, and every box, userns or not, reads the one cached copy of each layer.
What a userns box writes lands in its upper layer under the range's host ids; a snapshot
gives them back as the box's own ids (``layer_tar.unshift``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import state
from .errors import BoxError

DOCUMENT = "idmap"
RANGE_SIZE = 65536
DEFAULT_BASE = 0x10000000
DEFAULT_SLOTS = 4096  # 0x10000000 .. 0x20000000
SUBUID = "/etc/subuid"
SUBGID = "/etc/subgid"


@dataclass(frozen=True)
class Source:
    """Where slot N's ids start: ``uid_base + N * RANGE_SIZE`` (gids alike), N < ``slots``."""

    uid_base: int
    gid_base: int
    slots: int
    origin: str

    def bases(self, slot: int) -> tuple[int, int]:
        return self.uid_base + slot * RANGE_SIZE, self.gid_base + slot * RANGE_SIZE


def sub_range(path: str, user: str = "root") -> tuple[int, int] | None:
    """The first ``user:start:count`` line of ``path`` (a subuid/subgid file) with at least
    ``RANGE_SIZE`` ids and a non-zero start; None if there is none (or no file)."""
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (user, "0"):
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if start > 0 and count >= RANGE_SIZE:
            return start, count
    return None


def source(subuid: str | None = None, subgid: str | None = None) -> Source:
    """The ranges this host gives boxes (see the module's docstring)."""
    subuid, subgid = subuid or SUBUID, subgid or SUBGID
    uids, gids = sub_range(subuid), sub_range(subgid)
    if uids is not None and gids is not None:
        slots = min(uids[1], gids[1]) // RANGE_SIZE
        return Source(uids[0], gids[0], slots, f"{subuid} and {subgid}")
    return Source(DEFAULT_BASE, DEFAULT_BASE, DEFAULT_SLOTS, f"the default range from {DEFAULT_BASE:#x}")


@dataclass(frozen=True)
class Lease:
    """One box's ids: host uid ``uid`` is its root, up to ``uid + RANGE_SIZE - 1`` (gids alike)."""

    slot: int
    uid: int
    gid: int


class Pool:
    """The state document's leases, while its lock is held."""

    def __init__(self, document: dict[str, Any], where: Source) -> None:
        self.source = where
        self.leases: dict[str, Any] = document.setdefault("leases", {})
        self.reclaimed = self.reclaim()

    def reclaim(self) -> list[str]:
        """Drop the leases of dead owners; one line for each."""
        dead = []
        for slot, lease in list(self.leases.items()):
            if not state.Owner.from_json(lease["owner"]).alive():
                del self.leases[slot]
                dead.append(
                    f"id range {slot} of box {lease.get('box', '?')} (owner {lease['owner'][0]} gone)"
                )
        return dead

    def take(self, owner: state.Owner, box: str) -> Lease:
        for slot in range(self.source.slots):
            if str(slot) not in self.leases:
                uid, gid = self.source.bases(slot)
                self.leases[str(slot)] = {"owner": owner.to_json(), "box": box, "uid": uid, "gid": gid}
                return Lease(slot, uid, gid)
        raise BoxError(
            f"box {box}: every one of the {self.source.slots} id ranges of {self.source.origin} is "
            "leased by a running userns box; stop some, or give root a larger range in /etc/subuid "
            "and /etc/subgid"
        )

    def give_back(self, lease: Lease) -> None:
        self.leases.pop(str(lease.slot), None)


@contextlib.contextmanager
def locked(readonly: bool = False) -> Iterator[Pool]:
    """The pool under the host-wide lock, dead owners' leases reclaimed first (in memory only,
    with ``readonly``)."""
    with state.locked_document(DOCUMENT, readonly) as document:
        pool = Pool(document, source())
        yield pool
        if not pool.leases:
            document.clear()


def lease(box: str) -> Lease:
    """A range of ids of its own for box ``box``, owned by this process."""
    with locked() as pool:
        return pool.take(state.Owner.current(), box)


def give_back(lease: Lease) -> None:
    with locked() as pool:
        pool.give_back(lease)


def hand_over(lease: Lease, owner: state.Owner) -> None:
    """The box is kept beyond this process: its range now belongs to ``owner`` (its init), so
    no later box gets the same host ids while it runs."""
    with locked() as pool:
        entry = pool.leases.get(str(lease.slot))
        if entry is not None:
            entry["owner"] = owner.to_json()


def sweep(dry_run: bool = False) -> list[str]:
    """For ``nsbox gc``: the leases of dead owners, freed (or listed, with ``dry_run``)."""
    if not (state.STATE_DIR / f"{DOCUMENT}.json").exists():
        return []
    with locked(readonly=dry_run) as pool:
        return list(pool.reclaimed)
