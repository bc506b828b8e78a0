"""The veth a waiting box is made with when it will be bridged: only such boxes have one, it
is really theirs (``eth0`` inside, the host end down and on no bridge until the claim), and
nothing of it outlives the box helper, a claim that fails, or the box it was made for."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest

from pytest_nsbox import Box, Cluster, NetworkError, rtnl, state, zygote
from pytest_nsbox.network import netns, pool

pytestmark = pytest.mark.requires("boxes")


def _waiting_veths(kind: bool) -> dict[int, list[object]]:
    """init pid -> veth ([host name, index] or None) of the waiting boxes of the roots with
    (``kind``) or without a veth."""
    helper = zygote.current()
    assert helper is not None
    helper.waiting_boxes()  # files the announcements that arrived
    return {
        warm.pid: warm.veth
        for key, boxes in helper._waiting.items()
        if json.loads(key).get("veth") is kind
        for warm in boxes
    }


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.02)


def _link_gone(name: str, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/sys/class/net/{name}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_bridged_box_leaves_a_waiting_box_with_its_veth_made_and_unplugged() -> None:
    with Box(network="bridge") as box:
        # (operstate follows the carrier through the kernel's link watch: up to a second late)
        state = "?"
        for _ in range(50):
            state = box.run(["cat", "/sys/class/net/eth0/operstate"]).stdout.strip()
            if state == "up":
                break
            time.sleep(0.1)
        assert state == "up"
    _wait_for(lambda: _waiting_veths(True), "a bridged box waits")
    pid, veth = next(iter(_waiting_veths(True).items()))
    assert veth is not None
    name = str(veth[0])
    assert name.startswith("nsbv")
    with open(f"/sys/class/net/{name}/ifindex") as handle:
        assert int(handle.read()) == int(veth[1])  # type: ignore[call-overload]
    with open(f"/sys/class/net/{name}/flags") as handle:
        assert int(handle.read(), 16) & 1 == 0  # down
    assert not os.path.exists(f"/sys/class/net/{name}/master")  # on no bridge
    # Its peer is the waiting box's eth0, in the waiting box's own network namespace.
    with open(f"/sys/class/net/{name}/iflink") as handle:
        peer_index = int(handle.read())
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    # (Asked by netlink in its namespace: its /sys may still be the host's, root not built yet.)
    with netns.inside(pid) as ipr:
        assert ipr.link_lookup(ifname="eth0") == [peer_index]


def test_plain_boxes_wait_without_a_veth() -> None:
    with Box():
        pass
    _wait_for(lambda: _waiting_veths(False), "a plain box waits")
    assert all(veth is None for veth in _waiting_veths(False).values())


def test_the_waiting_boxes_veths_go_with_the_box_helper() -> None:
    with Cluster(3):
        pass
    _wait_for(lambda: len(_waiting_veths(True)) >= 3, "three bridged boxes wait after a 3-node cluster")
    names = [str(veth[0]) for veth in _waiting_veths(True).values() if veth is not None]
    assert names and all(os.path.exists(f"/sys/class/net/{name}") for name in names)
    zygote.shutdown()  # never claimed: they exit with it, and their namespaces take the veths
    left = [name for name in names if not _link_gone(name)]
    assert not left, f"veths of waiting boxes outlived the box helper: {left}"


def test_a_claim_whose_network_fails_leaves_no_lease_and_no_veth(monkeypatch: pytest.MonkeyPatch) -> None:
    with Box(network="bridge"):
        pass  # a bridged box waits now, its veth made
    _wait_for(lambda: _waiting_veths(True), "a bridged box waits")
    claimed: list[str] = []
    real_enslave = rtnl.Socket.set_link

    def refuse(
        self: rtnl.Socket, index: int, up: bool = False, master: int | None = None, **kw: object
    ) -> None:
        if master is not None:
            claimed.append(str(index))
            raise OSError(19, "No such device")
        real_enslave(self, index, up=up, master=master, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rtnl.Socket, "set_link", refuse)
    box = Box(network="bridge", subnet="10.219.0.0/16")
    veths = {str(veth[0]) for veth in _waiting_veths(True).values() if veth is not None}
    with pytest.raises(NetworkError, match="cannot put nsbv"):
        box.start()
    assert claimed
    assert not box.running and box.network is None  # lease() gave the address back itself
    document = json.loads((state.STATE_DIR / f"{pool.DOCUMENT}.json").read_text() or "{}")
    assert not document.get("pools", {}).get("10.219.0.0/16", {}).get("leases")
    monkeypatch.undo()
    # The box dropped unused exits, and its veth goes with it (the one made in its place stays).
    gone = veths - {str(veth[0]) for veth in _waiting_veths(True).values() if veth is not None}
    assert gone and all(_link_gone(name) for name in gone)


def test_a_cluster_asks_for_as_many_waiting_boxes_as_it_has_nodes() -> None:
    with Cluster(4) as cluster:
        for node in cluster:
            assert node.run(["cat", "/sys/class/net/eth0/operstate"]).stdout.strip() == "up"
        lines = cluster["n1"].read_text("/etc/hosts")
        assert all(f"{node.ip}\t{node.hostname}" in lines for node in cluster)
    _wait_for(lambda: len(_waiting_veths(True)) >= 4, "four bridged boxes wait after a 4-node cluster")


def test_a_restarted_bridged_box_keeps_address_and_mac_on_a_new_veth() -> None:
    with Box(network="bridge") as box:
        address, before = box.ip, box.read_text("/sys/class/net/eth0/address")
        assert box.network is not None
        interface = box.network.host_interface
        box.restart()
        assert box.ip == address and box.read_text("/sys/class/net/eth0/address") == before
        assert box.network.host_interface != interface
        with open(f"/sys/class/net/{box.network.host_interface}/ifindex") as handle:
            assert int(handle.read()) == box.network.host_index


def test_rtnl_errors_are_the_kernels_errno() -> None:
    with rtnl.Socket() as nl, pytest.raises(OSError) as raised:
        nl.set_link(2**31 - 1, up=True)
    assert raised.value.errno == 19  # ENODEV
