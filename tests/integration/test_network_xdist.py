"""Bridged boxes from two pytest-xdist workers at once: no clash, and nothing left afterwards."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time

import pytest

from pytest_nsbox import state
from pytest_nsbox.network import bridge, pool

pytestmark = pytest.mark.requires("boxes")

pytest.importorskip("xdist")

_SUITE = """
import pathlib
import pytest

def record(*boxes):
    with open(pathlib.Path(__file__).with_name("leases.txt"), "a") as handle:
        for box in boxes:
            handle.write(f"LEASE {box.ip} {box.network.host_interface}\\n")

@pytest.mark.parametrize("n", range(20))
@pytest.mark.nsbox(network="bridge")
def test_bridged(nsbox, n):
    record(nsbox)
    # The kernel's linkwatch settles operstate a moment after the carrier (it may read
    # "unknown" first, under load): the link must come up, not be up at this very instant.
    nsbox.wait_until("test $(cat /sys/class/net/eth0/operstate) = up", timeout=10)

@pytest.mark.parametrize("n", range(20))
def test_pair(netpair, n):
    record(netpair.a, netpair.b)
    with open(pathlib.Path(__file__).with_name("leases.txt"), "a") as handle:
        handle.write(f"BRIDGE {netpair.bridge}\\n")
    assert netpair.a.run(["getent", "hosts", "b"]).stdout.split()[0] == netpair.b.ip
"""


def test_two_workers_share_the_pool_without_collisions(pytester: pytest.Pytester) -> None:
    # A pool of its own: the outer run's boxes are not counted.
    subnet = ipaddress.IPv4Network("10.214.0.0/16")
    pytester.makepyfile(test_forty=_SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "xdist", f"--nsbox-subnet={subnet}")
    assert result.ret == 0, result.stdout.str()[-3000:]
    result.assert_outcomes(passed=40)
    leases = re.findall(r"^LEASE (\S+) (\S+)$", (pytester.path / "leases.txt").read_text(), re.MULTILINE)
    assert len(leases) == 60
    addresses = [address for address, _ in leases]
    interfaces = [interface for _, interface in leases]
    assert len(set(interfaces)) == 60, "an interface name was used twice"
    assert all(ipaddress.IPv4Address(address) in subnet for address in addresses)
    # Addresses go round-robin and cool down: none is handed out twice in one run.
    assert len(set(addresses)) == 60, "an address was handed out twice"
    # Afterwards: no lease, no user of the shared bridge, no private bridge, no interface.
    document = _document()
    assert str(subnet) not in document.get("pools", {}), document
    # Only the run's own interfaces are looked at: other processes on this host (the outer
    # suite's other xdist workers) make and remove theirs meanwhile.
    bridges = re.findall(r"^BRIDGE (\S+)$", (pytester.path / "leases.txt").read_text(), re.MULTILINE)
    assert len(bridges) == 20 and len(set(bridges)) <= 2, "each worker reuses its pair bridge"
    made = set(interfaces) | set(bridges) | {bridge.shared_name(subnet)}
    deadline = time.monotonic() + 15
    while (left := {name for name in made if os.path.exists(f"/sys/class/net/{name}")}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)  # a stopped box's veth goes when the kernel destroys its namespace
    assert left == set()


def _document() -> dict[str, object]:
    try:
        return dict(json.loads((state.STATE_DIR / f"{pool.DOCUMENT}.json").read_text()))
    except FileNotFoundError:
        return {}
