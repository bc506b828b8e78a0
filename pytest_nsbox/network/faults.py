"""Network cuts between boxes: tc filters on the host end of each receiving box's veth.

Why there: the host end's egress is where the bridge hands a box its packets, so a cut packet
has crossed the "switch" and is dropped just before the box. Its sender sees what it would
see on a partitioned network (silence, then a timeout), not an error from its own stack;
TCP, UDP and ICMP are all cut, at layer 3, with no process in the path. And the host end
goes with the box's network namespace (a veth dies with either end's namespace), so no cut
outlives its box, crash included, and root inside the box cannot lift it.

Why tc, not nftables: HTB and u32 are in every kernel we run on (built in on most distribution
kernels), while nftables's ip/inet families are not (Debian's user-mode-linux kernel has only
its bridge family); and a change is a few netlink requests (well under a millisecond), not an
``nft`` program run per namespace.

How: a root ``htb`` qdisc with no default class (unclassified packets take HTB's direct path,
untouched: ARP, and traffic of sources not cut), one class whose leaf is a ``pfifo`` of limit
0 (every packet queued there is dropped), and one u32 filter per cut-off source address (IPv4
source, offset 12) into that class. Each change replaces the tree whole.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import NetworkError
from . import netns

_TC_H_ROOT = 0xFFFFFFFF
_HTB_HANDLE = 0x10000  # 1:
_DROP_CLASS = 0x10001  # 1:1, every packet sent there is dropped
_DROP_LEAF = 0x20000  # 2:, pfifo limit 0 under 1:1
_ETH_P_IP = 0x0800
_SOURCE_OFFSET = 12  # the IPv4 source address, in bytes from the start of the header


def apply(ends: Mapping[str, tuple[int, str]], dropped: Mapping[str, Iterable[str]]) -> None:
    """Make each box's host end (``ends[name]``: its index and name) drop the IPv4 packets
    that come from the addresses in ``dropped[name]``; none: the end is left untouched."""
    with netns.host() as ipr:
        for name, (index, interface) in ends.items():
            addresses = sorted(set(dropped.get(name, ())), key=ipaddress.IPv4Address)
            try:
                _clear(ipr, index)
                if addresses:
                    _cut(ipr, index, addresses)
            except Exception as exc:
                if netns.netlink_errno(exc) == errno.ENODEV:
                    raise NetworkError(f"node {name} has stopped: its network cannot be cut") from None
                try:  # no half-made tree: what is cut is then nothing, not some of it
                    _clear(ipr, index)
                except Exception:
                    pass
                raise NetworkError(
                    f"cannot cut the network of node {name} (tc on {interface}): {_explain(exc)}"
                ) from None


def _cut(ipr: Any, index: int, addresses: list[str]) -> None:
    ipr.tc("add", "htb", index, handle=_HTB_HANDLE, default=0)
    # The class's rate never matters: nothing leaves its leaf.
    ipr.tc("add-class", "htb", index, handle=_DROP_CLASS, parent=_HTB_HANDLE, rate="1gbit")
    ipr.tc("add", "pfifo", index, handle=_DROP_LEAF, parent=_DROP_CLASS, limit=0)
    for address in addresses:
        # The key as u32 compares it: the address's bytes in network order, read as a host
        # integer (pyroute2 packs the value in host order).
        value = int.from_bytes(socket.inet_aton(address), "big")
        ipr.tc(
            "add-filter",
            "u32",
            index,
            parent=_HTB_HANDLE,
            prio=1,
            protocol=_ETH_P_IP,
            target=_DROP_CLASS,
            keys=[f"0x{value:08x}/0xffffffff+{_SOURCE_OFFSET}"],
        )


def _clear(ipr: Any, index: int) -> None:
    try:
        ipr.tc("del", index=index, parent=_TC_H_ROOT)
    except Exception as exc:
        if netns.netlink_errno(exc) not in (errno.ENOENT, errno.EINVAL):
            raise


def _explain(exc: BaseException) -> str:
    code = netns.netlink_errno(exc)
    if code in (errno.ENOENT, errno.EOPNOTSUPP):
        return (
            f"{netns.describe(exc)}: this kernel lacks the htb qdisc or the u32 classifier "
            "(CONFIG_NET_SCH_HTB, CONFIG_NET_CLS_U32; `modprobe sch_htb cls_u32`)"
        )
    return netns.describe(exc)
