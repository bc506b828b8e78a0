"""What dead processes left of networking, found and removed: leases, NAT entries, bridges.

The network-wide reclaimer: it reads the state every part of networking keeps (the address
pools, the NAT document) and the host's interfaces, so it sits above those parts rather than
inside one of them. Run at the first box of a session and by ``nsbox gc``.
"""

from __future__ import annotations

from . import bridge, nat, netns, pool
from .names import BRIDGE_PREFIXES, shared_name


def sweep(dry_run: bool = False) -> list[str]:
    """Remove what dead processes left: their leases, their private bridges, shared bridges
    nobody uses, and bridges of ours that no state mentions (the state was lost). Returns
    what it removed (or, with ``dry_run``, would remove), one line each."""
    removed = nat.sweep(dry_run)  # the NAT state of dead owners goes too
    with pool.locked_all(readonly=dry_run) as pools, netns.host() as ipr:
        in_use: set[str] = set()
        for entry in pools:
            removed += [
                f"IP lease {address} of box {box} (held by pid {pid})"
                for address, box, pid in entry.reclaimed
            ]
            for name in entry.dead_private:
                if bridge.lookup(ipr, name) is not None:
                    removed.append(f"bridge {name} (a pair's, its owner is dead)")
            if not dry_run:
                bridge.delete_dead(entry, ipr)
            in_use |= set(entry.entry["private"])
            if not entry.unused:
                in_use.add(shared_name(entry.subnet))
        in_use |= bridge.held_here()
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            candidate = name.startswith(BRIDGE_PREFIXES) and name not in in_use
            if candidate and bridge.ours(ipr, link["index"]):
                if not dry_run:
                    bridge.delete(ipr, name)
                removed.append(f"bridge {name} (nobody uses it)")
    return removed
