"""Give a box an ``eth0`` on a bridge: a veth, a leased address, a route, hosts entries.

Most of it happens before anyone asks: a waiting box made for a bridged box has its veth
already (the box helper makes it, ``zygote_process._make_veth``: its ``eth0`` inside, the host
end down and on no bridge). Claiming it costs a lease under the pool's lock, one netlink
request that puts the host end on the bridge, and the box's own configuration of its ``eth0``
(address, up, route: ``rtnl.configure``, run by its init as it finishes its start).

Teardown is the kernel's: when the box's network namespace goes, so does its veth, host end
included, whether the box was claimed or never was. That costs the stop nothing (deleting a
veth explicitly takes 16-20 ms) but happens a moment later, so host-side names are random
(never reused while a dying one lingers) and the address cools down in the pool until the
old interface is gone.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import rtnl, state
from ..errors import NetworkError
from . import bridge, hosts, netns, pool
from .shaping import End, Link

BOX_INTERFACE = "eth0"


@dataclass
class Attachment:
    """A box's place on a network; ``release()`` at box stop."""

    box_id: str
    hostname: str
    subnet: ipaddress.IPv4Network
    address: str
    bridge: str
    host_interface: str
    host_index: int
    gateway: str | None
    link: Link
    released: bool = field(default=False)
    hosts_entry: hosts.Entry | None = field(default=None)

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    def hand_over(self, owner: state.Owner) -> None:
        """The box is kept beyond its process: its lease now belongs to ``owner`` (its init)."""
        with pool.locked(self.subnet) as entry:
            lease = entry.entry["leases"].get(self.address)
            if lease is not None:
                lease["owner"] = owner.to_json()
        self.released = True  # nothing of it is ours to give back any more

    def release(self) -> None:
        """The box has stopped: its address goes back to the pool, its name out of the hosts
        files of its peers. Idempotent, and each step is: a release cut short is finished by
        the next call."""
        if self.released:
            return
        self.link.close()
        hosts.leave(self.bridge, self.box_id)
        with pool.locked(self.subnet) as entry:
            entry.give_back(self.address)
        self.released = True


def lease(
    box_id: str,
    hostname: str,
    subnet: ipaddress.IPv4Network,
    private: tuple[int, str] | None,
    veth: list[Any],
) -> Attachment:
    """Lease an address for the box being claimed and put its prebuilt veth's host end
    (``veth``: [name, index], made by the box helper while the box waited) on the shared
    bridge of ``subnet`` (with a default route through the host) or on ``private`` (index,
    name): a pair's or a cluster's own bridge. The box configures its ``eth0`` itself with
    ``inside()``; ``finish()`` once it is ready. On an error nothing is held."""
    owner = state.Owner.current()
    host_interface, host_index = str(veth[0]), int(veth[1])
    with pool.locked(subnet) as entry:
        if entry.dead_private:
            with netns.host() as ipr:
                bridge.delete_dead(entry, ipr)
        if private is None:
            bridge_index, bridge_name, gateway = (
                bridge.join_shared(entry),
                bridge.shared_name(subnet),
                entry.gateway,
            )
        else:
            (bridge_index, bridge_name), gateway = private, None
        address = entry.take(owner, box_id, shared=private is None)
        entry.note_interface(address, host_interface)  # a crash leaves a trace
    attachment = Attachment(
        box_id,
        hostname,
        subnet,
        address,
        bridge_name,
        host_interface,
        host_index,
        gateway,
        Link(f"{box_id}:{BOX_INTERFACE}", []),
    )
    try:
        _enslave(attachment, bridge_index)
    except BaseException:
        attachment.release()
        raise
    return attachment


def inside(attachment: Attachment, mac: str | None = None) -> dict[str, Any]:
    """What the box's init configures its ``eth0`` with (``rtnl.configure``)."""
    return {
        "address": attachment.address,
        "prefixlen": attachment.prefixlen,
        "gateway": attachment.gateway,
        "mac": mac,
    }


def finish(
    attachment: Attachment, init_pid: int, box_index: int, hosts_path: str, join_hosts: bool = True
) -> None:
    """The box is ready with its ``eth0`` configured: its link (for faults and shaping), and
    its name in the hosts files of its bridge's boxes (``join_hosts=False``: the caller lists
    many boxes at once, with ``hosts.join``)."""
    attachment.link = _link(
        attachment.box_id, init_pid, attachment.host_interface, attachment.host_index, box_index
    )
    entry = hosts.Entry(attachment.box_id, attachment.hostname, attachment.address, hosts_path)
    attachment.hosts_entry = entry
    if join_hosts:
        hosts.join(attachment.bridge, entry)


def _enslave(attachment: Attachment, bridge_index: int) -> None:
    """Put the host end on the bridge and bring it up: one netlink request."""
    try:
        with rtnl.Socket(netns.host_socket()) as nl:
            nl.set_link(attachment.host_index, up=True, master=bridge_index)
    except OSError as exc:
        raise NetworkError(
            f"cannot put {attachment.host_interface} of box {attachment.box_id} on bridge "
            f"{attachment.bridge}: {exc.strerror} (did the bridge or the box go?)"
        ) from exc


def _link(box_id: str, init_pid: int, host_interface: str, host_index: int, box_index: int) -> Link:
    """Shaping acts on the egress of both ends (one per direction); down() on the host end, so
    the box sees its carrier drop."""
    ends = [
        End(host_index, host_interface),
        End(
            box_index,
            f"{box_id}:{BOX_INTERFACE}",
            netns_pid=init_pid,
            can_go_down=False,
            netns_start=state.process_start(init_pid),
        ),
    ]
    return Link(f"{box_id}:{BOX_INTERFACE}", ends)


def box_mac(init_pid: int) -> str | None:
    """The hardware address of the box's ``eth0`` (None if it has none any more)."""
    try:
        with netns.inside(init_pid) as ipr:
            found = ipr.link_lookup(ifname=BOX_INTERFACE)
            return str(ipr.get_links(found[0])[0].get_attr("IFLA_ADDRESS")) if found else None
    except Exception:
        return None


def unplug(attachment: Attachment) -> None:
    """Pull the box's cable for a power cut: its veth goes at once (not with its network
    namespace, a moment later), so that nothing the dying box sends reaches its peers and its
    address and hardware address are free for the restarted box. Its lease stays."""
    attachment.link.close()
    with netns.host() as ipr:
        try:
            ipr.link("del", index=attachment.host_index)
        except Exception as exc:
            if netns.netlink_errno(exc) != errno.ENODEV:
                what = f"{attachment.host_interface} of box {attachment.box_id}"
                raise NetworkError(f"cannot remove {what}: {netns.describe(exc)}") from exc


def move(
    attachment: Attachment,
    veth: list[Any],
    mac: str | None,
    before_enslave: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Connect a restarted box (a new waiting box, with a new prebuilt ``veth``) to its bridge
    again, with the address it holds the lease of and its old hardware address (so that its
    peers' ARP caches stay right); returns what its init configures ``eth0`` with. ``rejoin()``
    once the box is ready."""
    bridge_index = netns.interface_index(attachment.bridge)
    if bridge_index is None:
        raise NetworkError(f"box {attachment.box_id}: its bridge {attachment.bridge} is gone")
    with pool.locked(attachment.subnet) as entry:
        entry.note_interface(attachment.address, str(veth[0]))
    attachment.host_interface, attachment.host_index = str(veth[0]), int(veth[1])
    if before_enslave is not None:
        before_enslave()  # what must hold before any packet crosses (a cluster's cuts)
    _enslave(attachment, bridge_index)
    return inside(attachment, mac)


def rejoin(attachment: Attachment, init_pid: int, box_index: int, hosts_path: str) -> None:
    """The restarted box is ready: a new link, and its hosts entry (its file is a new one)."""
    hosts.leave(attachment.bridge, attachment.box_id)
    finish(attachment, init_pid, box_index, hosts_path)
