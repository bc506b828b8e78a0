"""Shapes between two nodes of a cluster: a traffic-control tree per node, one class per peer.

Why per destination, in the sender's own namespace: a cluster's nodes share one bridge, so a
shape on a whole veth (as ``shaping.Link`` does for a box pair) would slow a node down towards
every peer. Instead each node's ``eth0`` egress sorts its packets by destination address, and
only those to a shaped peer go through that peer's class; a -> b is shaped on a's egress,
b -> a on b's. The tree lives in the node's network namespace, so it dies with the node and
nothing of it is ever on the host.

Why HTB + u32: HTB is the classful qdisc in every kernel (the guest's and this one's), and a
class with a rate is the cap; a class with a very high rate (``rate64``) shapes nothing, for
pairs that ask only for delay or loss, which a ``netem`` leaf under the class adds. The root's
``default`` names a class that never exists, so what no filter claims (ARP, unshaped peers)
takes HTB's direct path, untouched. A ``u32`` filter matches the IPv4 destination (offset 16
of the IP header) of each shaped peer.

Each change rebuilds the node's whole tree (delete the root, add it again): a tree holds a few
classes at most, and a rebuild cannot leave a stale class of an earlier shape behind.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Mapping
from typing import Any

from ..errors import NetworkError
from . import netns
from .shaping import Shape, _netem_options

INTERFACE = "eth0"
_TC_H_ROOT = 0xFFFFFFFF
_ROOT = 0x10000  # 1:
_UNUSED_DEFAULT = 0xFFFF  # 1:ffff, never made: unclassified packets go HTB's direct path
_FIRST_CLASS = 0x10  # the peers' classes are 1:10, 1:11, ...; their netem leaves 10:, 11:, ...
_UNLIMITED = "100gbit"  # a class rate that shapes nothing (above any veth's speed here)
_ETH_P_IP = 0x0800


def describe(shape: Shape) -> str:
    """``delay 100 ms (jitter 10 ms), loss 10%, rate 1mbit``: a shape for people."""
    parts = []
    if shape.delay_ms:
        jitter = f" (jitter {shape.jitter_ms:g} ms)" if shape.jitter_ms else ""
        parts.append(f"delay {shape.delay_ms:g} ms{jitter}")
    if shape.loss_pct:
        parts.append(f"loss {shape.loss_pct:g}%")
    if shape.rate_bits is not None:
        parts.append(f"rate {_rate_text(shape.rate_bits)}")
    return ", ".join(parts) or "nothing"


def is_empty(shape: Shape) -> bool:
    return shape.rate_bits is None and not shape.needs_netem


def rebuild(node: str, pid: int, start: int | None, peers: Mapping[str, Shape]) -> None:
    """Make node ``node`` (init ``pid``, started at ``start``) shape its packets to each peer
    address of ``peers`` as its shape says (rate and loss whole, delay and jitter halved: the
    other half is on the peer's side). No peers: no tree at all."""
    shaped = [(address, shape) for address, shape in sorted(peers.items()) if not is_empty(shape)]
    try:
        with netns.inside(pid, start) as ipr:
            found = ipr.link_lookup(ifname=INTERFACE)
            if not found:
                raise NetworkError(f"node {node} has no {INTERFACE} (it is not on the cluster's network)")
            index = int(found[0])
            _delete_root(ipr, node, index)
            if not shaped:
                return
            try:
                _build(ipr, index, shaped)
            except BaseException:
                _delete_root(ipr, node, index)  # no half-built tree: the caller puts the old one back
                raise
    except NetworkError:
        raise
    except Exception as exc:
        if netns.netlink_errno(exc) == errno.ENOENT and any(shape.needs_netem for _, shape in shaped):
            raise NetworkError(
                f"node {node}: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM; "
                "`modprobe sch_netem`), so delay, jitter and loss cannot be emulated here; "
                "rate= (htb) and down()/up() work without it"
            ) from None
        raise NetworkError(f"node {node}: cannot shape its links: {netns.describe(exc)}") from exc


def _build(ipr: Any, index: int, shaped: list[tuple[str, Shape]]) -> None:
    ipr.tc("add", "htb", index, _ROOT, default=_UNUSED_DEFAULT)
    for number, (address, shape) in enumerate(shaped, _FIRST_CLASS):
        classid = _ROOT | number
        rate = f"{shape.rate_bits}bit" if shape.rate_bits is not None else _UNLIMITED
        rate_bytes = (shape.rate_bits if shape.rate_bits is not None else 100 * 1000**3) // 8
        burst = max(rate_bytes // 100, 4 * 1514)  # 10 ms worth, at least a few full frames
        ipr.tc(
            "add-class",
            "htb",
            index,
            classid,
            parent=_ROOT,
            rate=rate,
            ceil=rate,
            burst=burst,
            cburst=burst,
            quantum=60000,  # one class per parent: no sharing to weigh; keeps the kernel quiet
        )
        if shape.needs_netem:
            ipr.tc("add", "netem", index, number << 16, parent=classid, **_netem_options(shape, 2))
        destination = int(ipaddress.IPv4Address(address))
        ipr.tc(
            "add-filter",
            "u32",
            index,
            parent=_ROOT,
            prio=1,
            protocol=_ETH_P_IP,
            target=classid,
            keys=[f"0x{destination:08x}/0xffffffff+16"],
        )


def _delete_root(ipr: Any, node: str, index: int) -> None:
    try:
        ipr.tc("del", index=index, parent=_TC_H_ROOT)
    except Exception as exc:
        if netns.netlink_errno(exc) not in (errno.ENOENT, errno.EINVAL):
            raise NetworkError(f"node {node}: cannot remove its shaping: {netns.describe(exc)}") from exc


def _rate_text(bits: int) -> str:
    for unit, size in (("gbit", 1000**3), ("mbit", 1000**2), ("kbit", 1000)):
        if bits >= size and bits % size == 0:
            return f"{bits // size}{unit}"
    return f"{bits}bit"
