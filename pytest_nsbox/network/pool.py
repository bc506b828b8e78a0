"""The address pool every pytest-nsbox process on this host draws from.

One state document (``network.json`` under ``state.STATE_DIR``, behind its file lock) holds,
per subnet: the leases (address -> owner, box, host-side interface), the addresses cooling
down, the processes using the shared bridge, and the private bridges of box pairs.

Why addresses cool down: a stopped box's network namespace is destroyed asynchronously, and
until the kernel gets to it, its veth still hangs on the bridge and still answers ARP for the
old address. An address is handed out again only once that interface is gone; and addresses
go round-robin, so with a /16 one is rarely needed again for a long while anyway.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator
from typing import Any

from .. import rootless, state
from ..errors import ConfigError, NetworkError

DOCUMENT = "network"
DEFAULT_SUBNET = "10.213.0.0/16"
_PRIVATE_BLOCKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")  # RFC 1918
_SMALLEST_PREFIX = 29  # network, gateway, broadcast and at least five boxes


def parse_subnet(value: object, what: str = "subnet") -> ipaddress.IPv4Network:
    """A pool subnet such as ``10.213.0.0/16``; errors say what a valid one looks like."""
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected an IPv4 subnet like {DEFAULT_SUBNET}, got {value!r}")
    try:
        network = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(f"{what}: {value!r} is not an IPv4 subnet like {DEFAULT_SUBNET} ({exc})") from None
    if network.prefixlen > _SMALLEST_PREFIX or network.prefixlen < 8:
        raise ConfigError(f"{what}: {value} must be between a /8 and a /{_SMALLEST_PREFIX}")
    if not any(network.subnet_of(ipaddress.IPv4Network(block)) for block in _PRIVATE_BLOCKS):
        raise ConfigError(
            f"{what}: {value} is not a private range; boxes would shadow real hosts. "
            "Use one from 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
        )
    return network


def interface_exists(name: str) -> bool:
    if rootless.active():
        return name in rootless.session_interfaces()
    return os.path.exists(f"/sys/class/net/{name}")


class Pool:
    """One subnet's part of the state document, while its lock is held."""

    def __init__(self, subnet: ipaddress.IPv4Network, entry: dict[str, Any]) -> None:
        self.subnet = subnet
        self.entry = entry
        entry.setdefault("leases", {})
        entry.setdefault("cooling", {})
        entry.setdefault("users", [])
        entry.setdefault("private", {})
        entry.setdefault("next", 2)
        self.dead_private: list[str] = []  # private bridges of dead owners, to delete
        self.reclaimed: list[tuple[str, str, int]] = []  # (address, box, pid) of dead owners' leases

    @property
    def gateway(self) -> str:
        """The bridge's own address: the first of the subnet."""
        return str(self.subnet.network_address + 1)

    # ---------------------------------------------------------------- leases

    def take(self, owner: state.Owner, box: str, shared: bool = True) -> str:
        """Lease the next free address to ``box`` of ``owner`` (on the shared bridge, or on a
        pair's private one)."""
        leases, cooling = self.entry["leases"], self.entry["cooling"]
        size = self.subnet.num_addresses
        first = int(self.subnet.network_address)
        offset = int(self.entry["next"])
        for _ in range(size):
            if not 2 <= offset < size - 1:  # not the network, the gateway or the broadcast
                offset = 2
            address = str(ipaddress.IPv4Address(first + offset))
            offset += 1
            if address in leases or address in cooling:
                continue
            leases[address] = {"owner": owner.to_json(), "box": box, "interface": "", "shared": shared}
            self.entry["next"] = offset
            return address
        raise NetworkError(
            f"the address pool {self.subnet} is exhausted: {len(leases)} boxes hold addresses and "
            f"{len(cooling)} wait for their old interfaces to go. Stop some boxes, or give a larger "
            "subnet with --nsbox-subnet (ini nsbox_subnet)"
        )

    def note_interface(self, address: str, interface: str) -> None:
        lease = self.entry["leases"].get(address)
        if lease is not None:
            lease["interface"] = interface

    def give_back(self, address: str) -> None:
        lease = self.entry["leases"].pop(address, None)
        if lease is not None and lease.get("interface") and interface_exists(lease["interface"]):
            self.entry["cooling"][address] = lease["interface"]

    def leases_of(self, owner: state.Owner) -> list[str]:
        return [
            a for a, lease in self.entry["leases"].items() if state.Owner.from_json(lease["owner"]) == owner
        ]

    # ---------------------------------------------------------------- bridge users

    def add_user(self, owner: state.Owner) -> None:
        if owner.to_json() not in self.entry["users"]:
            self.entry["users"].append(owner.to_json())

    def remove_user(self, owner: state.Owner) -> None:
        self.entry["users"] = [u for u in self.entry["users"] if u != owner.to_json()]

    @property
    def unused(self) -> bool:
        """No process uses the shared bridge and no box holds an address on it (boxes of
        pairs, on their private bridges, do not count)."""
        on_shared = [lease for lease in self.entry["leases"].values() if lease.get("shared", True)]
        return not self.entry["users"] and not on_shared

    def cooling_interfaces(self) -> list[str]:
        return list(self.entry["cooling"].values())

    # ---------------------------------------------------------------- private bridges

    def add_private(self, name: str, owner: state.Owner) -> None:
        self.entry["private"][name] = owner.to_json()

    def remove_private(self, name: str) -> None:
        self.entry["private"].pop(name, None)

    # ---------------------------------------------------------------- reclaiming

    def reclaim(self) -> list[str]:
        """Free what dead processes left; returns their private bridges, for deletion."""
        for address, lease in list(self.entry["leases"].items()):
            owner = state.Owner.from_json(lease["owner"])
            if not owner.alive():
                self.give_back(address)
                self.reclaimed.append((address, str(lease.get("box") or "?"), owner.pid))
        for address, interface in list(self.entry["cooling"].items()):
            if not interface_exists(interface):
                del self.entry["cooling"][address]
        self.entry["users"] = [u for u in self.entry["users"] if state.Owner.from_json(u).alive()]
        dead = [
            name for name, owner in self.entry["private"].items() if not state.Owner.from_json(owner).alive()
        ]
        for name in dead:
            del self.entry["private"][name]
        return dead


@contextlib.contextmanager
def locked(subnet: ipaddress.IPv4Network) -> Iterator[Pool]:
    """The subnet's pool under the host-wide lock; what dead owners held is reclaimed first."""
    with state.locked_document(DOCUMENT) as document:
        pools = document.setdefault("pools", {})
        pool = Pool(subnet, pools.setdefault(str(subnet), {}))
        pool.dead_private = pool.reclaim()
        yield pool
        if not any(pool.entry[key] for key in ("leases", "cooling", "users", "private")):
            del pools[str(subnet)]  # nothing left: no state file entry either
        if not pools:
            document.clear()


@contextlib.contextmanager
def locked_all(readonly: bool = False) -> Iterator[list[Pool]]:
    """Every subnet's pool under the lock (for the sweeper), dead owners reclaimed (in
    memory only, with ``readonly``)."""
    with state.locked_document(DOCUMENT, readonly) as document:
        pools = document.setdefault("pools", {})
        found = []
        for subnet, entry in pools.items():
            found.append(Pool(ipaddress.IPv4Network(subnet), entry))
            found[-1].dead_private = found[-1].reclaim()
        yield found
        for item in found:
            if not any(item.entry[key] for key in ("leases", "cooling", "users", "private")):
                del pools[str(item.subnet)]
        if not pools:
            document.clear()
