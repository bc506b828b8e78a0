"""Netlink sockets in the host's network namespace or in a box's, through pyroute2.

Why not ``IPRoute(netns=...)``: it forks a helper per socket (about 16 ms here). A netlink
socket belongs to the namespace it was created in, whatever thread uses it later, so we enter
the box's namespace with ``setns`` on this thread alone, open the socket, and come back: about
1 ms. pyroute2 itself is imported on first use (a third of a second), so boxes without a
network never pay for it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import interrupts, rootless, state, syscalls, zygote
from ..errors import NetworkError

if TYPE_CHECKING:
    from pyroute2 import IPRoute


@contextlib.contextmanager
def host() -> Iterator[IPRoute]:
    """An ``IPRoute`` of the host's namespace, closed afterwards. Rootless: of the session's
    own namespace instead, where its bridges live (see ``zygote_process._open_socket``)."""
    from pyroute2 import IPRoute

    if rootless.active():
        with _through_helper(0) as ipr:
            yield ipr
        return
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


@contextlib.contextmanager
def inside(pid: int, start: int | None = None) -> Iterator[IPRoute]:
    """An ``IPRoute`` of the network namespace of process ``pid`` (a box's init); with
    ``start``, only if ``pid`` is still that process (not a later one that reuses its pid)."""
    from pyroute2 import IPRoute

    if rootless.active():
        if start is not None and state.process_start(pid) != start:
            raise NetworkError(f"process {pid} is gone: its box has stopped")
        with _through_helper(pid) as ipr:
            yield ipr
        return
    ipr = _in_namespace_of(pid, IPRoute, start)
    try:
        yield ipr
    finally:
        ipr.close()


def socket_inside(pid: int, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in ``pid``'s network namespace (to reach a box's own loopback)."""
    if rootless.active():
        return zygote.get().socket_in(pid, family, kind)
    return _in_namespace_of(pid, lambda: socket.socket(family, kind))


@contextlib.contextmanager
def _through_helper(pid: int) -> Iterator[IPRoute]:
    """Rootless: an ``IPRoute`` over a netlink socket the box helper opened in the namespace
    of ``pid`` (0: the session's). The kernel checks a netlink request against the rights of
    whoever opened the socket: the helper's, root over every namespace of the session."""
    from pyroute2 import IPRoute

    sock = zygote.get().socket_in(pid, socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    try:
        ipr = IPRoute(fileno=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the descriptor is pyroute2's now: its close() closes it
    try:
        yield ipr
    finally:
        ipr.close()


def host_socket() -> socket.socket | None:
    """A route-netlink socket of the host's namespace for ``rtnl.Socket``: None (it opens its
    own), or rootless, one the box helper opened in the session's namespace."""
    if rootless.active():
        return zygote.get().socket_in(0, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    return None


def interface_index(name: str) -> int | None:
    """The index of interface ``name`` of the host's namespace (rootless: the session's), or None."""
    if rootless.active():
        with host() as ipr:
            found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _in_namespace_of(pid: int, make: Any, start: int | None = None) -> Any:
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetworkError(f"process {pid} is gone: its box has stopped") from None
    if start is not None and state.process_start(pid) != start:
        os.close(target)  # opened the namespace of whoever has that pid now: not ours
        raise NetworkError(f"process {pid} is gone: its box has stopped")
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Signals held from before the way in until after the way back: a KeyboardInterrupt
        # in between would leave this thread (pytest's own) in the box's namespace for good.
        with interrupts.held():
            try:
                syscalls.setns(target, syscalls.CLONE_NEWNET)
                return make()
            finally:
                # Whatever happened above: joining the namespace we are already in is harmless.
                syscalls.setns(own, syscalls.CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(target)


def netlink_errno(exc: BaseException) -> int | None:
    """The errno of a pyroute2 ``NetlinkError`` (None for anything else)."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def describe(exc: BaseException) -> str:
    code = netlink_errno(exc)
    if code:
        return f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"
    return str(exc)
