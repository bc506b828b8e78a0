"""Give a running box an ``eth0`` on a bridge: a veth, a leased address, a route, hosts entries.

Teardown is the kernel's: when the box's network namespace goes, so does its veth, host end
included. That costs the stop nothing (deleting a veth explicitly takes 16-20 ms) but happens
a moment later, so host-side names are random (never reused while a dying one lingers) and
the address cools down in the pool until the old interface is gone.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from dataclasses import dataclass, field

from .. import state
from ..errors import NetworkError
from . import bridge, hosts, netns, pool
from .names import VETH_PREFIX
from .shaping import End, Link

BOX_INTERFACE = "eth0"
_NAME_ATTEMPTS = 3


class NameTaken(Exception):
    """The random host-side name exists already (another host tool, or astronomically bad luck)."""


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


def plug(
    init_pid: int,
    box_id: str,
    hostname: str,
    hosts_path: str,
    subnet: ipaddress.IPv4Network,
    private: tuple[int, str] | None = None,
) -> Attachment:
    """Connect the box whose init is ``init_pid`` to the shared bridge of ``subnet`` (with a
    default route through the host), or to ``private`` (index, name): a pair's own bridge."""
    owner = state.Owner.current()
    host_interface = VETH_PREFIX + os.urandom(6).hex()[:11]
    with pool.locked(subnet) as entry, netns.host() as ipr:
        bridge.delete_dead(entry, ipr)
        if private is None:
            bridge_index, bridge_name, gateway = (
                bridge.join_shared(entry, ipr),
                bridge.shared_name(subnet),
                entry.gateway,
            )
        else:
            (bridge_index, bridge_name), gateway = private, None
        address = entry.take(owner, box_id, shared=private is None)
        entry.note_interface(address, host_interface)  # before it exists: a crash leaves a trace
    try:
        for _attempt in range(_NAME_ATTEMPTS):
            try:
                host_index = _make_veth(init_pid, host_interface, bridge_index)
                break
            except NameTaken:
                taken = host_interface
                host_interface = VETH_PREFIX + os.urandom(6).hex()[:11]
                with pool.locked(subnet) as entry:
                    entry.note_interface(address, host_interface)
        else:
            raise NetworkError(
                f"veth names keep clashing ({taken} and {_NAME_ATTEMPTS - 1} more exist): something on "
                f"this host makes {VETH_PREFIX}* interfaces; remove them (`ip link del`)"
            )
        box_index = _configure_inside(init_pid, address, subnet.prefixlen, gateway)
    except BaseException:
        with pool.locked(subnet) as entry:
            entry.give_back(address)
        raise
    link = _link(box_id, init_pid, host_interface, host_index, box_index)
    attachment = Attachment(
        box_id, hostname, subnet, address, bridge_name, host_interface, host_index, gateway, link
    )
    hosts.join(bridge_name, hosts.Entry(box_id, hostname, address, hosts_path))
    return attachment


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


def replug(attachment: Attachment, init_pid: int, hosts_path: str, mac: str | None) -> None:
    """Connect a restarted box (init ``init_pid``) to its bridge again, with the address it
    holds the lease of and its old hardware address (so that its peers' ARP caches stay right)."""
    with netns.host() as ipr:
        found = ipr.link_lookup(ifname=attachment.bridge)
    if not found:
        raise NetworkError(f"box {attachment.box_id}: its bridge {attachment.bridge} is gone")
    for _attempt in range(_NAME_ATTEMPTS):
        host_interface = VETH_PREFIX + os.urandom(6).hex()[:11]
        with pool.locked(attachment.subnet) as entry:
            entry.note_interface(attachment.address, host_interface)
        try:
            host_index = _make_veth(init_pid, host_interface, int(found[0]))
            break
        except NameTaken:
            continue
    else:
        raise NetworkError(
            f"veth names keep clashing: something on this host makes {VETH_PREFIX}* interfaces"
        )
    box_index = _configure_inside(init_pid, attachment.address, attachment.prefixlen, attachment.gateway, mac)
    attachment.host_interface, attachment.host_index = host_interface, host_index
    attachment.link = _link(attachment.box_id, init_pid, host_interface, host_index, box_index)
    hosts.leave(attachment.bridge, attachment.box_id)
    hosts.join(
        attachment.bridge, hosts.Entry(attachment.box_id, attachment.hostname, attachment.address, hosts_path)
    )


def _make_veth(init_pid: int, host_interface: str, bridge_index: int) -> int:
    with netns.host() as ipr:
        try:
            ipr.link(
                "add",
                ifname=host_interface,
                kind="veth",
                master=bridge_index,
                state="up",
                peer={"ifname": BOX_INTERFACE, "net_ns_pid": init_pid},
            )
        except Exception as exc:
            if netns.netlink_errno(exc) == errno.EEXIST:
                raise NameTaken(host_interface) from exc
            raise NetworkError(
                f"cannot create veth {host_interface} into the box of pid {init_pid}: {netns.describe(exc)}"
            ) from exc
        found = ipr.link_lookup(ifname=host_interface)
        if not found:
            raise NetworkError(f"veth {host_interface} vanished right after it was made (did the box stop?)")
        return int(found[0])


def _configure_inside(
    init_pid: int, address: str, prefixlen: int, gateway: str | None, mac: str | None = None
) -> int:
    with netns.inside(init_pid) as ipr:
        try:
            index = ipr.link_lookup(ifname=BOX_INTERFACE)[0]
            if mac is not None:
                ipr.link("set", index=index, address=mac)
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
            if gateway is not None:
                ipr.route("add", dst="0.0.0.0/0", gateway=gateway)
            return int(index)
        except Exception as exc:
            raise NetworkError(
                f"cannot configure {BOX_INTERFACE} ({address}/{prefixlen}) in the box of pid {init_pid}: "
                f"{netns.describe(exc)}"
            ) from exc
