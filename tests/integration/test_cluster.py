"""Clusters: named nodes on a private network, and layer-3 cuts between them, with real traffic."""

from __future__ import annotations

import errno
import ipaddress
import json
import random
import subprocess
import time
from typing import Any

import pytest

from pytest_nsbox import Box, Cluster, ConfigError, NetworkError
from pytest_nsbox.network import bridge, faults, pool
from pytest_nsbox.plugin import DEFAULTS

pytestmark = pytest.mark.requires("boxes")

UDP_PORT = 7100
TCP_PORT = 7101

# A UDP echo server and a TCP server in one process: each datagram's sender is appended to
# /tmp/udp.log (so a datagram that arrived is known even if its reply is cut), then echoed.
SERVER = f"""
import socket, threading
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", {UDP_PORT}))
tcp = socket.create_server(("0.0.0.0", {TCP_PORT}), backlog=64)
def accept():
    while True:
        conn, _ = tcp.accept()
        conn.sendall(socket.gethostname().encode())
        conn.close()
threading.Thread(target=accept, daemon=True).start()
while True:
    data, peer = udp.recvfrom(2048)
    with open("/tmp/udp.log", "a") as log:
        log.write(data.decode() + " " + peer[0] + "\\n")
    udp.sendto(socket.gethostname().encode(), peer)
"""

# Probes each target name by UDP, TCP and ICMP (raw echo request) at once; prints JSON of the
# names that answered on each. Silence for argv[1] seconds counts as cut.
PROBE = """
import json, os, select, socket, struct, sys, time
wait, names = float(sys.argv[1]), sys.argv[2:]
address = {name: socket.gethostbyname(name) for name in names}
by_address = {a: n for n, a in address.items()}
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
tcp = {}
for name in names:
    udp.sendto(("probe " + socket.gethostname()).encode(), (address[name], UDP_PORT))
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"nsbox-probe!"
    icmp.sendto(header[:2] + struct.pack("!H", checksum(header)) + header[4:], (address[name], 0))
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.setblocking(False)
    conn.connect_ex((address[name], TCP_PORT))
    tcp[conn] = name
seen = {"udp": set(), "tcp": set(), "icmp": set()}
deadline = time.monotonic() + wait
while time.monotonic() < deadline:
    writing = [c for c, n in tcp.items() if n not in seen["tcp"]]
    ready, written, _ = select.select([udp, icmp], writing, [], max(0.0, deadline - time.monotonic()))
    for sock in ready:
        data, peer = sock.recvfrom(2048)
        if sock is udp:
            seen["udp"].add(by_address.get(peer[0], peer[0]))
        elif data[20] == 0 and struct.unpack("!H", data[24:26])[0] == ident and peer[0] in by_address:
            seen["icmp"].add(by_address[peer[0]])
    for conn in written:
        if conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            seen["tcp"].add(tcp[conn])
print(json.dumps({kind: sorted(names) for kind, names in seen.items()}))
""".replace("UDP_PORT", str(UDP_PORT)).replace("TCP_PORT", str(TCP_PORT))


def _serve_all(cluster: Cluster) -> None:
    for node in cluster:
        node.spawn(["python3", "-c", SERVER])
    for node in cluster:
        node.wait_for_port(TCP_PORT, timeout=15)
        node.wait_for_port(UDP_PORT, protocol="udp", timeout=15)


def _probe(node: Box, targets: list[str], wait: float = 1.0) -> dict[str, list[str]]:
    result = node.run(["python3", "-c", PROBE, str(wait), *targets], timeout=30)
    assert result.returncode == 0, result
    probed: dict[str, list[str]] = json.loads(result.stdout)
    return probed


def _reach(cluster: Cluster, wait: float = 1.0) -> dict[str, set[str]]:
    """Who reaches whom, each way, by UDP, TCP and ICMP all three (asserted to agree)."""
    matrix = {}
    for name in cluster.names:
        others = [other for other in cluster.names if other != name]
        probed = _probe(cluster[name], others, wait)
        assert probed["udp"] == probed["tcp"] == probed["icmp"], f"{name}: the protocols disagree: {probed}"
        matrix[name] = set(probed["udp"])
    return matrix


def _all_but_self(cluster: Cluster) -> dict[str, set[str]]:
    return {name: set(cluster.names) - {name} for name in cluster.names}


def _udp_log(node: Box) -> str:
    return node.read_text("/tmp/udp.log") if node.exists("/tmp/udp.log") else ""


@pytest.fixture
def subnet(request: pytest.FixtureRequest) -> str:
    defaults = request.config.stash.get(DEFAULTS, {})
    return str(pool.parse_subnet(defaults.get("subnet") or pool.DEFAULT_SUBNET))


@pytest.fixture
def trio(subnet: str) -> Any:
    with Cluster(["db1", "db2", "db3"], subnet=subnet) as cluster:
        _serve_all(cluster)
        yield cluster


def test_nodes_have_names_order_and_a_private_network(subnet: str) -> None:
    with Cluster(3, subnet=subnet) as cluster:
        assert cluster.names == ("n1", "n2", "n3") and len(cluster) == 3
        assert [box.hostname for box in cluster] == ["n1", "n2", "n3"]
        assert cluster["n2"] is list(cluster)[1] and "n3" in cluster and "n4" not in cluster
        with pytest.raises(ConfigError, match=r"no node 'n4'.*n1, n2, n3"):
            cluster["n4"]
        assert cluster.bridge is not None and cluster.bridge.startswith(bridge.PRIVATE_PREFIX)
        assert {box.network.bridge for box in cluster if box.network} == {cluster.bridge}
        assert all(box.network and box.network.gateway is None for box in cluster), "no host address"
        assert cluster["n1"].run(["hostname"]).stdout == "n1\n"


def test_nodes_resolve_each_other_by_name_and_talk_tcp_udp_icmp(trio: Cluster) -> None:
    for node in trio:
        for other in trio:
            found = node.run(["getent", "-s", "files", "hosts", other.hostname], check=True).stdout
            assert found.split()[0] == other.ip, (node.hostname, found)
    assert _reach(trio) == _all_but_self(trio)


def test_two_clusters_never_see_each_other(subnet: str) -> None:
    with Cluster(["a1", "a2"], subnet=subnet) as first, Cluster(["a1", "a2"], subnet=subnet) as second:
        assert first.bridge != second.bridge
        _serve_all(first)
        _serve_all(second)
        assert first["a1"].run(["getent", "hosts", "a2"]).stdout.split()[0] == first["a2"].ip
        assert second["a1"].run(["getent", "hosts", "a2"]).stdout.split()[0] == second["a2"].ip
        assert _reach(first) == _all_but_self(first)
        stranger = second["a2"].ip
        assert stranger is not None
        connect = f"import socket; socket.create_connection(('{stranger}', {TCP_PORT}), timeout=1)"
        crossed = first["a1"].run(["python3", "-c", connect])
        assert crossed.returncode != 0, "a node of one cluster reached a node of the other"


def test_partition_cuts_every_protocol_between_groups_and_heal_restores_them(trio: Cluster) -> None:
    groups = trio.partition(["db1"], ["db2", "db3"])
    assert groups == [["db1"], ["db2", "db3"]]
    assert _reach(trio) == {"db1": set(), "db2": {"db3"}, "db3": {"db2"}}
    assert "db1" not in _udp_log(trio["db2"]), "a datagram crossed the partition"
    trio.heal()
    assert trio.cuts == []
    assert _reach(trio) == _all_but_self(trio)


def test_block_cuts_one_direction_only(trio: Cluster) -> None:
    trio.block("db1", "db2")
    assert trio.cuts == [("db1", "db2")]
    db1, db2 = trio["db1"], trio["db2"]
    # db2 -> db1: the datagram arrives (db1's server logs it), db1's reply is dropped.
    seen_from_db2 = _probe(db2, ["db1"])
    assert f"probe db2 {db2.ip}" in _udp_log(db1), "db2's datagram should reach db1"
    assert seen_from_db2 == {"udp": [], "tcp": [], "icmp": []}, "db1's replies to db2 should be cut"
    # db1 -> db2: nothing arrives at all.
    assert _probe(db1, ["db2", "db3"]) == {"udp": ["db3"], "tcp": ["db3"], "icmp": ["db3"]}
    assert "db1" not in _udp_log(db2), "db1's datagram crossed a cut"
    # Other pairs are untouched, and heal ends the cut.
    assert _probe(trio["db3"], ["db1", "db2"])["udp"] == ["db1", "db2"]
    trio.heal()
    assert _reach(trio) == _all_but_self(trio)


def test_a_node_in_no_group_is_isolated_and_link_down_cuts_one_pair(subnet: str) -> None:
    with Cluster(3, subnet=subnet) as cluster:
        _serve_all(cluster)
        cluster.partition(["n1", "n2"])
        assert _reach(cluster) == {"n1": {"n2"}, "n2": {"n1"}, "n3": set()}
        cluster.heal()
        link = cluster.link("n1", "n3").down()
        assert not link.is_up
        assert _reach(cluster) == {"n1": {"n2"}, "n2": {"n1", "n3"}, "n3": {"n2"}}
        link.up()
        assert _reach(cluster) == _all_but_self(cluster)


def test_ring_and_random_halves(subnet: str) -> None:
    with Cluster(5, subnet=subnet) as cluster:
        _serve_all(cluster)
        cluster.ring()
        assert _reach(cluster, wait=0.5) == {
            "n1": {"n2", "n5"},
            "n2": {"n1", "n3"},
            "n3": {"n2", "n4"},
            "n4": {"n3", "n5"},
            "n5": {"n4", "n1"},
        }
        majority, minority = cluster.partition_random_halves(random.Random(7))
        assert len(majority) == 3 and len(minority) == 2
        assert set(majority) | set(minority) == set(cluster.names)
        reach = _reach(cluster, wait=0.5)
        for group in (majority, minority):
            for name in group:
                assert reach[name] == set(group) - {name}, (name, reach)


def test_the_timeline_lists_the_faults_in_order(subnet: str) -> None:
    with Cluster(["x", "y"], subnet=subnet) as cluster:
        cluster.partition(["x"], ["y"])
        cluster.block("y", "x")
        cluster.heal()
        texts = [text for _, text in cluster.timeline]
        assert texts[1:] == ["partition [x] | [y]", "block y -> x", "heal"]
        assert texts[0].startswith("started x ")
        times = [seconds for seconds, _ in cluster.timeline]
        assert times == sorted(times)
        described = cluster.describe()
        assert "+0." in described and "partition [x] | [y]" in described and "cut now: nothing" in described


def test_a_failed_start_leaves_no_node_running(subnet: str) -> None:
    cluster = Cluster(["ok1", "ok2", "bad"], subnet=subnet)
    cluster._respec("bad", cluster.specs["bad"].merged("test", image="/nonexistent/image/dir"))
    with pytest.raises(Exception, match="nonexistent"):
        cluster.start()
    assert not any(box.running for box in cluster)


def test_bad_groups_are_refused_before_any_rule_changes(trio: Cluster) -> None:
    trio.block("db1", "db3")
    with pytest.raises(ConfigError, match="'db2' is in group 1 and group 2"):
        trio.partition(["db1", "db2"], ["db2", "db3"])
    with pytest.raises(ConfigError, match="no node 'db9'"):
        trio.partition(["db9"])
    assert trio.cuts == [("db1", "db3")]
    assert [text for _, text in trio.timeline][-1] == "block db1 -> db3"


def test_a_kernel_without_htb_gets_an_error_naming_it_and_no_half_cut(
    trio: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    real = faults._cut

    def no_htb(ipr: Any, index: int, addresses: list[str]) -> None:
        real(ipr, index, addresses[:1])  # part of the tree is made, then the kernel refuses
        raise NetlinkError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(faults, "_cut", no_htb)
    with pytest.raises(NetworkError, match=r"CONFIG_NET_SCH_HTB.*modprobe sch_htb"):
        trio.partition(["db1"], ["db2", "db3"])
    monkeypatch.undo()
    for name, node in trio.nodes.items():
        assert node.network is not None
        assert _tc_filters(node.network.host_interface) == "", name


def _tc_filters(interface: str) -> str:
    """What iproute2's tc shows of the filters on a host interface (empty: none)."""
    shown = subprocess.run(
        ["tc", "filter", "show", "dev", interface], capture_output=True, text=True, check=True
    )
    return shown.stdout.strip()


def test_the_cuts_are_on_the_receivers_host_end_and_go_with_the_node(subnet: str) -> None:
    cluster = Cluster(["a", "b", "c"], subnet=subnet).start()
    try:
        cluster.block("a", "b")
        ends = {}
        for name, node in cluster.nodes.items():
            assert node.network is not None
            ends[name] = node.network.host_interface
        a_address = ipaddress.IPv4Address(cluster["a"].ip or "0.0.0.0")
        # b drops what comes from a: iproute2 shows the u32 match on a's address at offset 12
        assert f"match {int(a_address):08x}/ffffffff at 12" in _tc_filters(ends["b"])
        assert _tc_filters(ends["a"]) == "" and _tc_filters(ends["c"]) == ""
        # nothing of it inside the nodes: root in a box cannot lift it
        inside = cluster["b"].run("cat /proc/net/dev")
        assert "eth0" in inside.stdout
        cluster.heal()
        assert _tc_filters(ends["b"]) == ""
        cluster.block("c", "b")
    finally:
        cluster.stop()
    # the veths go with the nodes' namespaces (the kernel frees those a moment later), the
    # cuts with them
    deadline = time.monotonic() + 20
    while True:
        links = subprocess.run(
            ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
        left = [interface for interface in ends.values() if f" {interface}@" in links]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == []


def test_a_nodes_own_link_is_refused_naming_the_clusters(trio: Cluster) -> None:
    """A node's veth carries the cluster's cuts: its own box.link.set() would replace them
    while the cluster still reported them in force."""
    trio.block("db2", "db1")
    with pytest.raises(NetworkError, match=r"node db1 of a cluster.*cluster\.link\('db1', other\)"):
        trio["db1"].link.set(delay_ms=50)
    assert trio.cuts == [("db2", "db1")]
    assert "match" in _tc_filters(trio["db1"].network.host_interface)  # type: ignore[union-attr]
