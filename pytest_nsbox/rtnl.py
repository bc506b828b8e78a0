"""The few route-netlink requests a box's network needs, in the standard library alone.

Why not pyroute2 here: this module is loaded by the box helper (which makes a waiting box's
veth) and by the box's init (which configures its ``eth0`` when it is claimed), and what
they load is copied into every box at fork (see zygote_process). Each request is one
message on a netlink socket of the caller's network namespace, acknowledged by the kernel;
an error comes back as the ``OSError`` of the errno the kernel gave.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFF_UP = 0x1
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_NET_NS_PID = 19
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RTN_UNICAST = 1

_HEADER = struct.Struct("=LHHLL")  # nlmsghdr: length, type, flags, sequence, port
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst/src len, tos, table, protocol, scope, type, flags


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


class Socket:
    """A route-netlink socket of the network namespace it was opened in (whatever the thread
    does later); ``with Socket() as nl: nl.request(...)``."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        """``sock``: a route-netlink socket opened elsewhere (by a rootless session's box
        helper, in the session's namespace), taken over; else one of our namespace."""
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self.sock = sock
        self.sock.bind((0, 0))
        self.sequence = 0

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes) -> None:
        """Send one request and wait for its acknowledgement; OSError(errno) if refused."""
        self.sequence += 1
        flags |= NLM_F_REQUEST | NLM_F_ACK
        header = _HEADER.pack(_HEADER.size + len(body), kind, flags, self.sequence, 0)
        self.sock.send(header + body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, message_type, _flags, sequence, _port = _HEADER.unpack_from(data, offset)
                if message_type == NLMSG_ERROR and sequence == self.sequence:
                    (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return
                offset += max((length + 3) & ~3, _HEADER.size)

    def new_veth(self, name: str, peer: str, peer_pid: int) -> None:
        """A veth pair: ``name`` here, down and on no bridge; ``peer`` in the network namespace
        of process ``peer_pid``. EEXIST if ``name`` is taken."""
        peer_info = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(peer))
        peer_info += _attr(IFLA_NET_NS_PID, struct.pack("=I", peer_pid))
        linkinfo = _attr(IFLA_INFO_KIND, b"veth\0") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_info))
        body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name)) + _attr(IFLA_LINKINFO, linkinfo)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def set_link(
        self, index: int, up: bool = False, master: int | None = None, mac: str | None = None
    ) -> None:
        """Set the link's master (a bridge's index), hardware address, and bring it up."""
        flags = IFF_UP if up else 0
        body = _IFINFO.pack(0, 0, index, flags, IFF_UP if up else 0)
        if master is not None:
            body += _attr(IFLA_MASTER, struct.pack("=I", master))
        if mac is not None:
            body += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        self.request(RTM_NEWLINK, 0, body)

    def add_address(self, index: int, address: str, prefixlen: int) -> None:
        packed = socket.inet_aton(address)
        body = _IFADDR.pack(socket.AF_INET, prefixlen, 0, 0, index)
        body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def add_default_route(self, gateway: str) -> None:
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNICAST, 0)
        body += _attr(RTA_GATEWAY, socket.inet_aton(gateway))
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)


def make_veth(name: str, peer: str, peer_pid: int) -> int:
    """``Socket.new_veth`` on a socket of its own; returns the index of ``name``."""
    with Socket() as nl:
        nl.new_veth(name, peer, peer_pid)
    return socket.if_nametoindex(name)


def configure(
    interface: str, address: str, prefixlen: int, gateway: str | None, mac: str | None = None
) -> int:
    """Give ``interface`` of this network namespace its hardware address (if given), its
    address, the up state and a default route through ``gateway`` (if any); returns its
    index. What a box's init does with its prebuilt ``eth0`` once it is claimed."""
    index = socket.if_nametoindex(interface)
    with Socket() as nl:
        if mac is not None:
            nl.set_link(index, mac=mac)
        nl.add_address(index, address, prefixlen)
        nl.set_link(index, up=True)
        if gateway is not None:
            nl.add_default_route(gateway)
    return index
