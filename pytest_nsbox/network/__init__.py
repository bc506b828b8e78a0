"""Box networking: bridges, veths, the host-wide address pool, link faults, published ports.

Everything here talks netlink through pyroute2 (imported on first use); nothing shells out.
"""

from __future__ import annotations

from . import bridge, nat, pool
from .attach import Attachment, plug
from .pool import DEFAULT_SUBNET, parse_subnet
from .publish import Forwarder
from .shaping import Link

__all__ = [
    "DEFAULT_SUBNET",
    "Attachment",
    "Forwarder",
    "Link",
    "bridge",
    "nat",
    "parse_subnet",
    "plug",
    "pool",
    "shutdown",
]


def shutdown() -> None:
    """This process is done with networking: leave the shared bridges (the last user deletes
    each) and delete the private bridges it kept for reuse."""
    from . import bridge

    bridge.delete_spares()
    bridge.leave_shared()
