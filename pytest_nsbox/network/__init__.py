"""Box networking: bridges, veths, the host-wide address pool, link faults, published ports.

Everything here talks netlink through pyroute2 (imported on first use); only NAT runs a
program, `nft` (see nat.py for why).
"""

from __future__ import annotations

import time

from ..state import STATE_DIR
from . import bridge, nat, pool, reclaim
from .attach import Attachment, box_mac, finish, inside, lease, move, rejoin, unplug
from .pool import DEFAULT_SUBNET, parse_subnet
from .publish import Forwarder
from .shaping import Link

__all__ = [
    "DEFAULT_SUBNET",
    "Attachment",
    "Forwarder",
    "Link",
    "box_mac",
    "bridge",
    "finish",
    "inside",
    "lease",
    "move",
    "nat",
    "parse_subnet",
    "pool",
    "reclaim",
    "rejoin",
    "shutdown",
    "unplug",
]


def shutdown() -> None:
    """This process is done with networking: leave the shared bridges (the last user deletes
    each) and delete the private bridges it kept for reuse."""
    if not bridge.used():
        return
    bridge.delete_spares()
    bridge.leave_shared()
    _settle()


def _settle(timeout: float = 3.0) -> None:
    """Wait (briefly) for the kernel to destroy our stopped boxes' veths, then sweep, so that
    the pool's state does not outlive the last process with addresses still cooling down."""
    if not (STATE_DIR / f"{pool.DOCUMENT}.json").exists():
        return
    with pool.locked_all() as pools:
        cooling = [name for entry in pools for name in entry.cooling_interfaces()]
    deadline = time.monotonic() + timeout
    while any(pool.interface_exists(name) for name in cooling) and time.monotonic() < deadline:
        time.sleep(0.02)
    reclaim.sweep()
