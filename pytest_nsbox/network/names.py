"""The names and marks by which pytest-nsbox knows its network objects on a shared host.

In a module of their own because every part of networking needs them (making bridges and
veths, the NAT rules that match on them, the reclaimer that finds what dead processes left)
and none of those parts should import another just to spell a prefix.
"""

from __future__ import annotations

import hashlib
import ipaddress

MARK = "pytest-nsbox"  # the alias (IFLA_IFALIAS) of every bridge of ours: another's is left alone
SHARED_PREFIX = "nsbb"  # nsbb<8 hex>: the shared bridge of one subnet
PRIVATE_PREFIX = "nsbp"  # nsbp<11 hex>: the bridge of one box pair
VETH_PREFIX = "nsbv"  # nsbv<11 hex>: 15 characters, the most an interface name may have
BRIDGE_PREFIXES = (SHARED_PREFIX, PRIVATE_PREFIX)


def shared_name(subnet: ipaddress.IPv4Network) -> str:
    """The shared bridge of ``subnet``: the same name in every process that uses the subnet."""
    return SHARED_PREFIX + hashlib.sha256(str(subnet).encode()).hexdigest()[:8]
