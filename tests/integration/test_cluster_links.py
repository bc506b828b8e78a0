"""Shapes between two nodes of a cluster (``link(a, b).set/clear``), and faults that survive a
node's restart, measured with real traffic."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_nsbox import Box, Cluster, ConfigError, NetworkError
from pytest_nsbox.network import netns, pool
from pytest_nsbox.plugin import DEFAULTS

pytestmark = pytest.mark.requires("boxes")

TCP_PORT = 7200
UDP_PORT = 7201
PAYLOAD = 250_000  # bytes: 2 s at 1mbit, a few milliseconds unshaped

# Every connection is closed in order (the client reads the server's answer to its EOF), and
# the cluster stops only once they all have (``_settle``): a closing socket whose peer node
# has stopped is retried by the kernel for minutes, and holds its node's network namespace,
# and so the node's veth on the host, that long. A shaped link (1mbit) delays the last ACKs.

# A TCP sink (reads to EOF, answers with the count) and a UDP logger (each datagram's text and
# sender appended to /tmp/udp.log, so one that arrived is known even if no reply gets back).
SERVER = f"""
import socket, threading
def serve(conn):
    total = 0
    while data := conn.recv(65536):
        total += len(data)
    conn.sendall(str(total).encode())
    conn.close()
def accept(tcp):
    while True:
        threading.Thread(target=serve, args=(tcp.accept()[0],), daemon=True).start()
tcp = socket.create_server(("0.0.0.0", {TCP_PORT}), backlog=64)
threading.Thread(target=accept, args=(tcp,), daemon=True).start()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", {UDP_PORT}))
while True:
    data, peer = udp.recvfrom(2048)
    with open("/tmp/udp.log", "a") as log:
        log.write(data.decode() + " " + peer[0] + "\\n")
"""

# Sends argv[2] bytes to node argv[1] and waits for its count: prints the seconds it took.
SEND = f"""
import socket, sys, time
began = time.monotonic()
conn = socket.create_connection((sys.argv[1], {TCP_PORT}), timeout=30)
conn.sendall(b"x" * int(sys.argv[2]))
conn.shutdown(socket.SHUT_WR)
assert conn.recv(64) == sys.argv[2].encode()
elapsed = time.monotonic() - began
assert conn.recv(64) == b""
print(elapsed)
"""

# The median of 5 TCP connects (one round trip each) to node argv[1], in milliseconds, or
# "cut" if one gets no answer within argv[2] seconds.
RTT = f"""
import socket, statistics, sys, time
times = []
for _ in range(5):
    began = time.monotonic()
    try:
        conn = socket.create_connection((sys.argv[1], {TCP_PORT}), timeout=float(sys.argv[2]))
    except OSError:
        print("cut")
        raise SystemExit
    times.append((time.monotonic() - began) * 1000)
    conn.settimeout(30)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(64):
        pass
    conn.close()
print(statistics.median(times))
"""

# Sends a datagram "from <hostname>" to node argv[1] and tries a TCP connect (argv[2] s):
# prints whether the connect was answered.
REACH = f"""
import json, socket, sys
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.sendto(("from " + socket.gethostname()).encode(), (sys.argv[1], {UDP_PORT}))
try:
    conn = socket.create_connection((sys.argv[1], {TCP_PORT}), timeout=float(sys.argv[2]))
except OSError:
    print(json.dumps(False))
    raise SystemExit
conn.settimeout(30)
conn.shutdown(socket.SHUT_WR)
while conn.recv(64):
    pass
conn.close()
print(json.dumps(True))
"""


@pytest.fixture
def subnet(request: pytest.FixtureRequest) -> str:
    defaults = request.config.stash.get(DEFAULTS, {})
    return str(pool.parse_subnet(defaults.get("subnet") or pool.DEFAULT_SUBNET))


@pytest.fixture
def trio(subnet: str) -> Iterator[Cluster]:
    with Cluster(3, subnet=subnet) as cluster:
        for node in cluster:
            _serve(node)
        yield cluster
        _settle(cluster)


def _settle(cluster: Cluster, timeout: float = 10.0) -> None:
    """Wait until no node has a TCP connection still open or closing (listening and
    TIME_WAIT sockets are fine: they need no peer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for node in cluster:
            if node.running and not node.is_paused:
                table = node.run(["cat", "/proc/net/tcp", "/proc/net/tcp6"], timeout=10).stdout
                states = {line.split()[3] for line in table.splitlines() if ":" in line.split()[0]}
                busy |= bool(states - {"06", "0A"})  # TIME_WAIT, LISTEN
        if not busy:
            return
        time.sleep(0.1)


def _serve(node: Box) -> None:
    node.spawn(["python3", "-c", SERVER])
    node.wait_for_port(TCP_PORT, timeout=15)
    node.wait_for_port(UDP_PORT, protocol="udp", timeout=15)


def _send_seconds(node: Box, target: str, size: int = PAYLOAD) -> float:
    result = node.run(["python3", "-c", SEND, target, str(size)], timeout=60)
    assert result.returncode == 0, result
    return float(result.stdout)


def _rtt_ms(node: Box, target: str, timeout: float = 5.0) -> float | None:
    result = node.run(["python3", "-c", RTT, target, str(timeout)], timeout=60)
    assert result.returncode == 0, result
    return None if result.stdout.strip() == "cut" else float(result.stdout)


def _reaches(node: Box, target: str, wait: float = 1.0) -> bool:
    result = node.run(["python3", "-c", REACH, target, str(wait)], timeout=30)
    assert result.returncode == 0, result
    reached: bool = json.loads(result.stdout)
    return reached


def _udp_log(node: Box) -> str:
    return node.read_text("/tmp/udp.log") if node.exists("/tmp/udp.log") else ""


def _set_or_skip(cluster: Cluster, a: str, b: str, **shape: Any) -> None:
    """``cluster.link(a, b).set(**shape)``; on a kernel without netem the test skips, but not
    in the test guest (tests/vm), which has sch_netem: there it must run."""
    try:
        cluster.link(a, b).set(**shape)
    except NetworkError as exc:
        if "sch_netem" in str(exc) and not os.environ.get("NSBOX_IN_UML_GUEST"):
            pytest.skip(f"this kernel has no netem qdisc (sch_netem), needed for {shape}")
        raise


def _htb_rates(node: Box) -> list[int]:
    """The rates (bytes/s) of the HTB classes on the node's eth0 (none: no tree)."""
    assert node.pid is not None
    with netns.inside(node.pid) as ipr:
        index = ipr.link_lookup(ifname="eth0")[0]
        rates = []
        for found in ipr.get_classes(index):
            if found.get_attr("TCA_KIND") == "htb":
                parameters = found.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_PARMS")
                rates.append(int(parameters["rate"]))
        return rates


def test_a_rate_slows_down_that_pair_only_both_ways_until_cleared(trio: Cluster) -> None:
    n1, n2, _n3 = trio
    unshaped = _send_seconds(n1, "n2")
    link = trio.link("n1", "n2").set(rate="1mbit")
    assert link.shape.rate_bits == 1_000_000 and "rate 1mbit" in repr(link)
    to_n2, from_n2, to_n3, n2_to_n3 = (
        _send_seconds(n1, "n2"),
        _send_seconds(n2, "n1"),
        _send_seconds(n1, "n3"),
        _send_seconds(n2, "n3"),
    )
    # 250 kB at 1 mbit/s is 2 s; unshaped, a few milliseconds. Generous margins either way.
    assert to_n2 > 1.0 and from_n2 > 1.0, f"n1 <-> n2 is not capped: {to_n2:.3f}s, {from_n2:.3f}s"
    assert to_n2 > 5 * to_n3 and to_n2 > 5 * n2_to_n3, (to_n2, to_n3, n2_to_n3)
    assert "link n1 <-> n2 set rate 1mbit" in [text for _, text in trio.timeline]
    assert "shaped now: n1 <-> n2 rate 1mbit" in trio.describe()
    assert link.clear() is link and link.shape.rate_bits is None
    again = _send_seconds(n1, "n2")
    assert again < to_n2 / 5, f"still slow after clear(): {again:.3f}s (capped {to_n2:.3f}s)"
    assert _htb_rates(n1) == [] and _htb_rates(n2) == [], "clear() left classes behind"
    assert unshaped < to_n2 / 5
    assert "shaped now: nothing" in trio.describe()
    assert [text for _, text in trio.timeline][-1] == "link n1 <-> n2 clear"


def test_a_delay_grows_that_pairs_round_trip_only(trio: Cluster) -> None:
    n1, n2, _n3 = trio
    _set_or_skip(trio, "n1", "n2", delay_ms=200)
    shaped, back = _rtt_ms(n1, "n2"), _rtt_ms(n2, "n1")
    other, other_of_n2 = _rtt_ms(n1, "n3"), _rtt_ms(n2, "n3")
    assert shaped is not None and back is not None and other is not None and other_of_n2 is not None
    assert shaped >= 150 and back >= 150, f"the round trip n1 <-> n2 grew to {shaped:.1f}/{back:.1f} ms only"
    assert shaped < 1000, f"{shaped:.1f} ms: the delay is counted twice or worse"
    assert other < 100 and other_of_n2 < 100, f"other pairs slowed down: {other:.1f}, {other_of_n2:.1f} ms"
    assert "shaped now: n1 <-> n2 delay 200 ms" in trio.describe()
    trio.link("n1", "n2").clear()
    cleared = _rtt_ms(n1, "n2")
    assert cleared is not None and cleared < 100, cleared


def test_full_loss_cuts_that_pair_only(trio: Cluster) -> None:
    n1, n2, n3 = trio
    _set_or_skip(trio, "n2", "n1", loss_pct=100)
    assert trio.link("n1", "n2").shape.loss_pct == 100  # one pair, named either way
    assert not _reaches(n1, "n2") and not _reaches(n2, "n1")
    assert _reaches(n1, "n3") and _reaches(n2, "n3") and _reaches(n3, "n1")
    assert "from n1" not in _udp_log(n2) and "from n2" not in _udp_log(n1)
    trio.link("n1", "n2").clear()
    assert _reaches(n1, "n2") and _reaches(n2, "n1")


def test_without_netem_set_names_sch_netem_and_leaves_the_rate_in_force(trio: Cluster) -> None:
    n1, n2, _n3 = trio
    link = trio.link("n1", "n2").set(rate="1mbit")
    try:
        link.set(rate="2mbit", delay_ms=100)
    except NetworkError as exc:
        assert "sch_netem" in str(exc) and "node n1" in str(exc), exc
    else:
        pytest.skip("this kernel has netem: set(delay_ms=...) cannot fail here")
    assert link.shape.rate_bits == 1_000_000 and link.shape.delay_ms == 0
    assert _htb_rates(n1) == [125_000] and _htb_rates(n2) == [125_000], "the trees changed"
    assert _send_seconds(n1, "n2") > 1.0, "the 1mbit cap is gone"
    assert [text for _, text in trio.timeline][-1] == "link n1 <-> n2 set rate 1mbit"


def test_a_set_that_fails_on_the_second_node_puts_the_first_back(trio: Cluster) -> None:
    n1, n2, _n3 = trio
    link = trio.link("n1", "n2").set(rate="1mbit")
    n2.stop()
    with pytest.raises(NetworkError, match="node n2 has stopped"):
        link.set(rate="2mbit")  # n1's tree is rebuilt first, then n2's fails
    assert link.shape.rate_bits == 1_000_000
    assert _htb_rates(n1) == [125_000], "n1 kept the shape that failed on n2"


def test_bad_input_is_refused_at_once(trio: Cluster) -> None:
    link = trio.link("n1", "n2")
    with pytest.raises(ConfigError, match=r"delay_ms=.*>= 0, got -1"):
        link.set(delay_ms=-1)
    with pytest.raises(ConfigError, match="rate like '1mbit'"):
        link.set(rate="fast")
    with pytest.raises(ConfigError, match="jitter varies a delay"):
        link.set(jitter_ms=5)
    with pytest.raises(ConfigError, match="two different nodes"):
        trio.link("n1", "n1")
    with pytest.raises(ConfigError, match="no node 'n9'"):
        trio.link("n1", "n9")
    assert [text for _, text in trio.timeline][1:] == [], "a refused call reached the timeline"
    assert _htb_rates(trio["n1"]) == []


def test_set_on_a_cluster_not_started_says_so(subnet: str) -> None:
    with pytest.raises(NetworkError, match="not running; start it first"):
        Cluster(2, subnet=subnet).link("n1", "n2").set(rate="1mbit")


def test_a_partition_survives_a_restart_and_heal_still_ends_it(trio: Cluster) -> None:
    n1, n2, _n3 = trio
    trio.partition(["n1"], ["n2", "n3"])
    n1.restart()
    _serve(n1)  # a power cut killed its server
    # n1's own rules (dropping what comes from n2 and n3) are back in its new namespace:
    # n2's datagram and connect reach no process of n1's.
    assert not _reaches(n2, "n1") and not _reaches(n1, "n2")
    assert "from n2" not in _udp_log(n1), "a datagram of n2 crossed the partition into the restarted n1"
    assert _reaches(n2, "n3")
    assert [text for _, text in trio.timeline][-1] == "restart n1 (cuts put back)"
    trio.heal()
    assert _reaches(n1, "n2") and _reaches(n2, "n1") and _reaches(n1, "n3")


def test_a_one_way_block_into_a_restarted_node_stays(trio: Cluster) -> None:
    n1, n2, _n3 = trio
    trio.block("n2", "n1")  # n1 drops what n2 sends: a rule of n1's alone
    n1.restart()
    _serve(n1)
    assert not _reaches(n2, "n1"), "n2 reached the restarted n1 through a one-way cut"
    assert "from n2" not in _udp_log(n1)
    assert _reaches(trio["n3"], "n1")
    trio.heal()
    assert _reaches(n2, "n1")


def test_a_rate_survives_a_restart(trio: Cluster) -> None:
    n1, _n2, _n3 = trio
    trio.link("n1", "n2").set(rate="1mbit")
    n1.restart()
    _serve(n1)
    assert _htb_rates(n1) == [125_000], "the restarted n1 has no tree"
    capped, other = _send_seconds(n1, "n2"), _send_seconds(n1, "n3")
    assert capped > 1.0 and capped > 5 * other, f"n1 -> n2 after the restart: {capped:.3f}s, n3 {other:.3f}s"
    assert [text for _, text in trio.timeline][-1] == "restart n1 (shapes put back)"
    trio.link("n1", "n2").clear()
    assert _send_seconds(n1, "n2") < capped / 5
