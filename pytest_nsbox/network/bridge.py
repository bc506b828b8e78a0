"""The bridges boxes hang on: one shared per subnet, and private ones for box pairs.

Every bridge we make carries an ownership mark in its alias (``IFLA_IFALIAS``); a bridge with
one of our names but without the mark is someone else's, and is neither used nor deleted.
The shared bridge lives while some process uses it: each process registers itself in the
pool's state on first use and leaves at its end; whoever leaves last (or reclaims the dead
last user) deletes it. Private bridges are owned by one process, which keeps a few for reuse
(deleting a bridge costs some 30 ms, most of it the kernel waiting for an RCU grace period).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import threading
from typing import TYPE_CHECKING, Any

from .. import rootless, state
from ..errors import NetworkError
from . import netns, pool
from .names import MARK, PRIVATE_PREFIX, SHARED_PREFIX, shared_name

if TYPE_CHECKING:
    from pyroute2 import IPRoute

__all__ = [
    "MARK",
    "PRIVATE_PREFIX",
    "SHARED_PREFIX",
    "delete",
    "delete_dead",
    "delete_spares",
    "held_here",
    "join_shared",
    "leave_shared",
    "lookup",
    "ours",
    "shared_name",
    "take_private",
]


def ours(ipr: IPRoute, index: int) -> bool:
    links = ipr.get_links(index)
    return bool(links) and (links[0].get_attr("IFLA_IFALIAS") or "").startswith(MARK)


def lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _create(ipr: IPRoute, name: str, alias: str) -> int:
    try:
        # nf_call_iptables off: where br_netfilter is loaded (Docker hosts), a FORWARD policy
        # of DROP would otherwise silently drop the traffic between boxes.
        ipr.link("add", ifname=name, kind="bridge", br_nf_call_iptables=0, br_stp_state=0, br_forward_delay=0)
    except Exception as exc:
        raise NetworkError(f"cannot create bridge {name}: {netns.describe(exc)}") from exc
    index = lookup(ipr, name)
    assert index is not None
    try:
        ipr.link("set", index=index, ifalias=alias)
    except BaseException:
        ipr.link("del", index=index)  # unmarked, it would never be ours again: not even to delete
        raise
    return index


def _ensure_gateway(ipr: IPRoute, index: int, gateway: str, prefixlen: int) -> None:
    """The shared bridge has its address and is up (a run interrupted while making it may
    have left it without either)."""
    try:
        ipr.addr("add", index=index, address=gateway, prefixlen=prefixlen)
    except Exception as exc:
        if netns.netlink_errno(exc) != errno.EEXIST:
            raise NetworkError(
                f"cannot give the box bridge its address {gateway}: {netns.describe(exc)}"
            ) from exc
    ipr.link("set", index=index, state="up")


def delete(ipr: IPRoute, name: str) -> None:
    index = lookup(ipr, name)
    if index is None or not ours(ipr, index):
        return
    try:
        ipr.link("del", index=index)
    except Exception as exc:
        if netns.netlink_errno(exc) != errno.ENODEV:
            raise NetworkError(f"cannot delete bridge {name}: {netns.describe(exc)}") from exc


def check_subnet(ipr: IPRoute, subnet: ipaddress.IPv4Network, bridge: str) -> None:
    """Refuse a subnet that overlaps a route of the host (other than our own bridge's)."""
    own = lookup(ipr, bridge)
    for route in ipr.route("dump", family=2, table=254):
        length = route["dst_len"]
        if length == 0 or route.get_attr("RTA_OIF") == own:
            continue  # the default route overlaps everything; ours is ours
        network = ipaddress.IPv4Network(f"{route.get_attr('RTA_DST')}/{length}", strict=False)
        if network.overlaps(subnet):
            device = route.get_attr("RTA_OIF")
            names = ipr.get_links(device) if device else []
            where = names[0].get_attr("IFLA_IFNAME") if names else "?"
            raise NetworkError(
                f"the box subnet {subnet} overlaps this host's route to {network} (dev {where}); "
                "boxes would hide those hosts. Choose another with --nsbox-subnet (ini "
                f"nsbox_subnet), e.g. {suggest_subnet(ipr, subnet)}"
            )


def suggest_subnet(ipr: IPRoute, clash: ipaddress.IPv4Network) -> str:
    taken = [
        ipaddress.IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}", strict=False)
        for r in ipr.route("dump", family=2, table=254)
        if r["dst_len"]
    ]
    for second in range(200, 256):
        candidate = ipaddress.IPv4Network(f"10.{second}.0.0/{clash.prefixlen}", strict=False)
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    return "a free private /16"


# ---------------------------------------------------------------------------- shared


_registered: dict[str, int] = {}  # subnet -> index of the shared bridge this process joined
_used = False  # whether this process ever took a bridge (shared or private)
_registered_lock = threading.Lock()


def join_shared(entry: pool.Pool, ipr: IPRoute | None = None) -> int:
    """The index of the shared bridge of ``entry``'s subnet, made if needed, with this
    process counted among its users. Called with the pool locked. Without ``ipr``, a netlink
    socket is opened only if the bridge is not the one this process joined already."""
    global _used
    _used = True
    subnet = entry.subnet
    name = shared_name(subnet)
    with _registered_lock:
        cached = _registered.get(str(subnet))
    if cached is not None and netns_index_alive(name, cached):
        return cached
    if ipr is None:
        with netns.host() as opened:
            return join_shared(entry, opened)
    index = lookup(ipr, name)
    if index is not None and not ours(ipr, index):
        raise NetworkError(
            f"an interface named {name} exists but was not made by pytest-nsbox; "
            "delete it, or choose another subnet with --nsbox-subnet"
        )
    if index is None:
        check_subnet(ipr, subnet, name)
        index = _create(ipr, name, f"{MARK} shared {subnet}")
    _ensure_gateway(ipr, index, entry.gateway, subnet.prefixlen)
    entry.add_user(state.Owner.current())
    with _registered_lock:
        _registered[str(subnet)] = index
    return index


def netns_index_alive(name: str, index: int) -> bool:
    """Whether interface ``name`` still has ``index`` (read from sysfs: no netlink round trip).
    Rootless, the bridge is in the session's own network namespace, which only this process
    changes: it is there as long as we did not delete it."""
    if rootless.active():
        return True
    try:
        with open(f"/sys/class/net/{name}/ifindex") as handle:
            return int(handle.read()) == index
    except OSError:
        return False


def leave_shared() -> None:
    """This process is done with the shared bridges: the last user out deletes each one."""
    owner = state.Owner.current()
    with _registered_lock:
        subnets = sorted(_registered)
        _registered.clear()  # a later box joins afresh
    for text in subnets:
        subnet = ipaddress.IPv4Network(text)
        with pool.locked(subnet) as entry, netns.host() as ipr:
            entry.remove_user(owner)
            for address in entry.leases_of(owner):
                entry.give_back(address)
            if entry.unused:
                delete(ipr, shared_name(subnet))


def held_here() -> set[str]:
    """The bridges this process uses or keeps for reuse: never left over, whatever the state says."""
    with _registered_lock:
        names = {shared_name(ipaddress.IPv4Network(subnet)) for subnet in _registered}
    with _spare_lock:
        names |= {name for spares in _spare.values() for name in spares}
    return names


# ---------------------------------------------------------------------------- private


_spare: dict[str, list[str]] = {}  # subnet -> private bridges of ours, free for the next pair
_spare_lock = threading.Lock()


def take_private(subnet: ipaddress.IPv4Network) -> tuple[int, str]:
    """A private bridge (no address on the host: its boxes reach only each other)."""
    global _used
    _used = True
    with _spare_lock:
        spare = _spare.get(str(subnet), [])
        name = spare.pop() if spare else None
    with netns.host() as ipr:
        if name is not None:
            index = lookup(ipr, name)
            if index is not None:
                return index, name
        name = PRIVATE_PREFIX + os.urandom(6).hex()[:11]
        with pool.locked(subnet) as entry:
            _delete_private(ipr, entry.dead_private)
            entry.add_private(name, state.Owner.current())
        index = _create(ipr, name, f"{MARK} private {subnet}")
        ipr.link("set", index=index, state="up")
        return index, name


def give_back_private(subnet: ipaddress.IPv4Network, name: str) -> None:
    """Keep the bridge for the next pair of this process (deleted by ``delete_spares``)."""
    with _spare_lock:
        _spare.setdefault(str(subnet), []).append(name)


def used() -> bool:
    """Whether this process ever took a bridge: if not, it has nothing of networking to end
    (and may not even be allowed to look at the shared state, running as another user)."""
    return _used


def delete_spares() -> None:
    with _spare_lock:
        spares = {subnet: list(names) for subnet, names in _spare.items()}
        _spare.clear()
    for subnet, names in spares.items():
        network = ipaddress.IPv4Network(subnet)
        with pool.locked(network) as entry, netns.host() as ipr:
            _delete_private(ipr, names)
            for name in names:
                entry.remove_private(name)


def delete_dead(entry: pool.Pool, ipr: IPRoute) -> None:
    """Delete the private bridges that ``entry.reclaim()`` found orphaned."""
    _delete_private(ipr, entry.dead_private)
    entry.dead_private = []


def _delete_private(ipr: Any, names: list[str]) -> None:
    for name in names:
        delete(ipr, name)
