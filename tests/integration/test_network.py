"""Box networking end to end: pairs and their link, the shared bridge, the address pool,
teardown and crash recovery, published ports, subnet clashes and NAT.

Traffic is made by small Python programs run inside the boxes (their root is the host's /),
so every measurement (connect times, transfer times) is taken where the packets are.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cleanup import rmdir_when_empty

from pytest_nsbox import Box, BoxProcess, ConfigError, Link, NetPair, NetworkError, cgroups, live_boxes, state
from pytest_nsbox import box as box_module
from pytest_nsbox.network import bridge, hosts, nat, netns, pool, reclaim
from pytest_nsbox.network.shaping import Shape
from pytest_nsbox.plugin import DEFAULTS

pytestmark = pytest.mark.requires("boxes")

PORT = 7000
BULK_BYTES = 250_000

# A threaded TCP server: reads the client's request once, then answers with, by mode, the
# request itself (echo), its hostname (name), the client's address (peer) or N bytes (a number).
SERVER = """
import socket, sys, threading
port, mode, bind = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def serve(conn, peer):
    with conn:
        request = conn.recv(4096)
        if mode == "echo":
            conn.sendall(request)
        elif mode == "name":
            conn.sendall(socket.gethostname().encode())
        elif mode == "peer":
            conn.sendall(peer[0].encode())
        else:
            conn.sendall(b"x" * int(mode))

server = socket.create_server((bind, port), backlog=128)
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# Connects to each HOST:PORT argument in turn (each with the timeout in argv[1]), sends
# "ping", reads to the end; one JSON line per attempt: ok, reply, bytes, connect_ms, total_ms.
CLIENT = """
import json, socket, sys, time
timeout = float(sys.argv[1])
for target in sys.argv[2:]:
    host, _, port = target.rpartition(":")
    record = {"target": target, "ok": False}
    began = time.perf_counter()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            record["connect_ms"] = (time.perf_counter() - began) * 1000
            conn.sendall(b"ping")
            conn.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        data = b"".join(chunks)
        record.update(ok=True, reply=data[:64].decode(errors="replace"), bytes=len(data))
    except OSError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["total_ms"] = (time.perf_counter() - began) * 1000
    print(json.dumps(record), flush=True)
"""


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def subnet(request: pytest.FixtureRequest) -> ipaddress.IPv4Network:
    """The pool subnet of this session (--nsbox-subnet, or the default)."""
    defaults = request.config.stash.get(DEFAULTS, {})
    return pool.parse_subnet(defaults.get("subnet") or pool.DEFAULT_SUBNET)


def _serve(box: Box, mode: str, port: int = PORT, bind: str = "0.0.0.0") -> BoxProcess:
    process = box.spawn(["python3", "-c", SERVER, str(port), mode, bind])
    box.wait_for_port(port, timeout=15)
    return process


def _spawn_client(box: Box, targets: list[str], timeout: float = 2.0) -> BoxProcess:
    return box.spawn(["python3", "-c", CLIENT, str(timeout), *targets])


def _records(process: BoxProcess, count: int) -> list[dict[str, Any]]:
    result = process.result()
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == count, result
    return [json.loads(line) for line in lines]


def _connect(box: Box, targets: list[str], timeout: float = 2.0) -> list[dict[str, Any]]:
    process = _spawn_client(box, targets, timeout)
    try:
        process.wait(len(targets) * (timeout + 5) + 20)
    finally:
        process.kill()
    return _records(process, len(targets))


def _reaches(box: Box, target: str, timeout: float = 2.0) -> dict[str, Any]:
    return _connect(box, [target], timeout)[0]


def _eventually_reaches(box: Box, target: str, within: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        record = _reaches(box, target, timeout=1.0)
        if record["ok"] or time.monotonic() > deadline:
            return record
        time.sleep(0.1)


def _median_connect_ms(box: Box, target: str, count: int = 5) -> float:
    records = _connect(box, [target] * count, timeout=5.0)
    assert all(r["ok"] for r in records), records
    return statistics.median(r["connect_ms"] for r in records)


def _shape_or_skip(link: Link, **shape: Any) -> None:
    """``link.set(**shape)``, skipping the test on a kernel without netem."""
    try:
        link.set(**shape)
    except NetworkError as exc:
        if "no netem" in str(exc) and not os.environ.get("NSBOX_IN_UML_GUEST"):
            # The test guest (tests/vm) loads sch_netem: there these tests must run, not skip.
            pytest.skip(f"this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), needed for {shape}")
        raise


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _interface_gone(name: str) -> Callable[[], bool]:
    return lambda: not os.path.exists(f"/sys/class/net/{name}")


def _qdisc_kinds(index: int) -> list[str]:
    with netns.host() as ipr:
        return [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index)]


def _lookup(box: Box, name: str) -> list[str]:
    """The addresses ``name`` has in the box's hosts file, through the C library. (``-s files``:
    a bridged box without nat cannot reach the host's nameserver, and a miss would wait for it.)"""
    result = box.run(["getent", "-s", "files", "hosts", name], timeout=30)
    return [line.split()[0] for line in result.stdout.splitlines()]


def _host_fetch(address: str, port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection((address, port), timeout=5) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def _host_veth(
    name: str, address: str, prefixlen: int, *, peer: str, peer_pid: int | None = None
) -> Iterator[int]:
    """A veth ``name`` on the host with ``address``, its peer in ``peer_pid``'s namespace (or
    the host's); both up. Deleted afterwards (which deletes the peer too)."""
    with netns.host() as ipr:
        peer_spec: dict[str, Any] = {"ifname": peer}
        if peer_pid is not None:
            peer_spec["net_ns_pid"] = peer_pid
        ipr.link("add", ifname=name, kind="veth", peer=peer_spec)
    try:
        with netns.host() as ipr:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
            if peer_pid is None:
                ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], state="up")
        yield index
    finally:
        with netns.host() as ipr, contextlib.suppress(Exception):
            ipr.link("del", ifname=name)


# ---------------------------------------------------------------------------- the pair


def test_pair_boxes_reach_each_other_by_name_and_address(netpair: NetPair) -> None:
    a, b = netpair.a, netpair.b
    assert a.ip and b.ip and a.ip != b.ip
    assert a.network is not None and b.network is not None
    assert a.network.bridge == b.network.bridge and a.network.bridge.startswith(bridge.PRIVATE_PREFIX)
    assert a.network.gateway is None  # a pair's bridge has no address on the host
    assert a.run(["getent", "hosts", "b"], check=True).stdout.split()[0] == b.ip
    assert b.run(["getent", "hosts", "a"], check=True).stdout.split()[0] == a.ip
    assert a.run(["getent", "hosts", "a"], check=True).stdout.split()[0] == a.ip
    assert a.run(["hostname"]).stdout == "a\n" and b.run(["hostname"]).stdout == "b\n"
    _serve(b, "echo")
    by_name, by_address = _connect(a, [f"b:{PORT}", f"{b.ip}:{PORT}"])
    assert by_name["ok"] and by_name["reply"] == "ping", by_name
    assert by_address["ok"] and by_address["reply"] == "ping", by_address


def test_link_down_cuts_the_pair_and_up_restores_it(netpair: NetPair) -> None:
    _serve(netpair.a, "echo")
    _serve(netpair.b, "echo")
    assert _reaches(netpair.a, f"b:{PORT}")["ok"] and _reaches(netpair.b, f"a:{PORT}")["ok"]
    netpair.link.down()
    assert not netpair.link.is_up
    cut = _reaches(netpair.a, f"b:{PORT}", timeout=2.0)
    assert not cut["ok"], f"a reached b over a link that is down: {cut}"
    assert not _reaches(netpair.b, f"a:{PORT}", timeout=2.0)["ok"], "the cut is in both directions"
    for box in (netpair.a, netpair.b):
        carrier = box.run(["cat", "/sys/class/net/eth0/carrier"]).stdout.strip()
        assert carrier == "0", "each box should see its carrier drop"
    netpair.link.up()
    assert netpair.link.is_up
    for box in (netpair.a, netpair.b):
        neighbours = box.run(["ip", "-4", "neigh", "show", "dev", "eth0"]).stdout
        assert "INCOMPLETE" not in neighbours and "FAILED" not in neighbours, neighbours
    # At the first try: the neighbours the boxes failed to resolve while the link was down
    # are forgotten, not left to answer "No route to host" until the kernel probes again.
    restored = _reaches(netpair.a, f"b:{PORT}", timeout=2.0)
    assert restored["ok"] and restored["reply"] == "ping", restored
    assert _reaches(netpair.b, f"a:{PORT}", timeout=2.0)["ok"]


def test_delay_adds_to_the_round_trip_and_clear_removes_it(netpair: NetPair) -> None:
    _serve(netpair.b, "echo")
    target = f"b:{PORT}"
    baseline = _median_connect_ms(netpair.a, target)
    _shape_or_skip(netpair.link, delay_ms=150)
    assert netpair.link.shape.delay_ms == 150
    delayed = _median_connect_ms(netpair.a, target)
    assert 100 <= delayed - baseline <= 400, f"baseline {baseline:.1f} ms, with delay {delayed:.1f} ms"
    netpair.link.clear()
    assert netpair.link.shape == Shape()
    cleared = _median_connect_ms(netpair.a, target)
    assert cleared < baseline + 50, f"baseline {baseline:.1f} ms, after clear() {cleared:.1f} ms"


def test_total_loss_fails_connects_and_clear_restores_them(netpair: NetPair) -> None:
    _serve(netpair.b, "echo")
    assert _reaches(netpair.a, f"b:{PORT}")["ok"]
    _shape_or_skip(netpair.link, loss_pct=100)
    lost = _reaches(netpair.a, f"b:{PORT}", timeout=2.0)
    assert not lost["ok"], f"a connected through a link that loses every packet: {lost}"
    netpair.link.clear()
    restored = _eventually_reaches(netpair.a, f"b:{PORT}")
    assert restored["ok"] and restored["reply"] == "ping", restored


def test_rate_caps_throughput_and_clear_lifts_the_cap(netpair: NetPair) -> None:
    _serve(netpair.b, str(BULK_BYTES))
    target = f"b:{PORT}"

    def transfer() -> float:
        record = _connect(netpair.a, [target], timeout=10.0)[0]
        assert record["ok"] and record["bytes"] == BULK_BYTES, record
        return float(record["total_ms"]) / 1000

    free = transfer()
    netpair.link.set(rate="1mbit")
    assert netpair.link.shape.rate_bits == 1_000_000
    capped = transfer()
    mbit_per_s = BULK_BYTES * 8 / capped / 1e6
    # 250 KB at 1 mbit/s is 2 s; anything under 2 mbit/s (1 s) shows the cap acting.
    assert mbit_per_s < 2.0, f"{BULK_BYTES} bytes in {capped:.2f} s under a 1mbit cap"
    assert capped > 3 * free, f"capped {capped:.2f} s vs uncapped {free:.2f} s"
    netpair.link.clear()
    assert netpair.link.shape == Shape()
    lifted = transfer()
    assert lifted < capped / 3, f"after clear() {lifted:.2f} s, capped {capped:.2f} s"


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ({"loss_pct": 101}, "at most 100"),
        ({"delay_ms": -1}, "delay_ms"),
        ({"rate": "fast"}, "rate"),
        ({"jitter_ms": 10}, "give delay_ms as well"),
    ],
    ids=["loss-101", "negative-delay", "rate-word", "jitter-alone"],
)
def test_bad_shapes_raise_config_error_and_leave_the_link_as_it_was(
    netpair: NetPair, shape: dict[str, Any], message: str
) -> None:
    netpair.link.set(rate="1mbit")
    ends = [end.index for end in netpair.link.ends]
    assert len(ends) == 2 and all("tbf" in _qdisc_kinds(index) for index in ends)
    with pytest.raises(ConfigError, match=message):
        netpair.link.set(**shape)
    # Refused before touching the kernel: the cap set before is still there, and recorded.
    assert all("tbf" in _qdisc_kinds(index) for index in ends)
    assert netpair.link.shape.rate_bits == 1_000_000
    netpair.link.clear()
    assert not any("tbf" in _qdisc_kinds(index) for index in ends)


def test_a_failed_set_leaves_the_link_as_it_says_it_is(netpair: NetPair) -> None:
    netpair.link.set(rate="1mbit")
    try:
        netpair.link.set(delay_ms=100)
    except NetworkError as exc:
        assert "no netem" in str(exc)
    else:
        pytest.skip("this kernel has netem: set(delay_ms=...) cannot fail here")
    capped = ["tbf" in _qdisc_kinds(end.index) for end in netpair.link.ends]
    assert netpair.link.shape.rate_bits == 1_000_000
    assert capped == [True, True], f"link.shape says 1mbit both ways; the kernel caps {capped}"


def test_two_pairs_never_see_each_other(subnet: ipaddress.IPv4Network) -> None:
    with NetPair(subnet=str(subnet)) as first, NetPair(subnet=str(subnet)) as second:
        assert first.a.network is not None and second.a.network is not None
        assert first.a.network.bridge != second.a.network.bridge
        assert len({first.a.ip, first.b.ip, second.a.ip, second.b.ip}) == 4
        _serve(first.b, "name")
        _serve(second.b, "name")
        own, other = _connect(first.a, [f"b:{PORT}", f"{second.b.ip}:{PORT}"], timeout=2.0)
        assert own["ok"] and own["reply"] == "b", own
        assert not other["ok"], f"pair 1 reached pair 2: {other}"
        own, other = _connect(second.a, [f"{second.b.ip}:{PORT}", f"{first.b.ip}:{PORT}"], timeout=2.0)
        assert own["ok"] and not other["ok"], (own, other)
        # Each pair's boxes list only their own partner.
        assert first.a.run(["getent", "hosts", "b"]).stdout.split()[0] == first.b.ip
        assert second.a.run(["getent", "hosts", "b"]).stdout.split()[0] == second.b.ip


# ---------------------------------------------------------------------------- shared bridge


def test_nine_bridged_boxes_all_reach_each_other_and_the_host_reaches_them(
    nsbox_factory: Callable[..., Box],
) -> None:
    names = [f"n{i}" for i in range(9)]
    boxes = [nsbox_factory(network="bridge", hostname=name) for name in names]
    addresses = [box.ip for box in boxes]
    assert all(addresses) and len(set(addresses)) == 9, addresses
    network = boxes[0].network
    assert network is not None
    used = network.subnet
    assert all(box.network is not None and box.network.subnet == used for box in boxes)
    reserved = {used.network_address, used.network_address + 1, used.broadcast_address}
    for address in addresses:
        assert address is not None
        assert ipaddress.IPv4Address(address) in used
        assert ipaddress.IPv4Address(address) not in reserved
    assert all(box.network is not None and box.network.bridge == network.bridge for box in boxes)
    assert os.path.exists(f"/sys/class/net/{network.bridge}")
    for box in boxes:
        _serve(box, "name")
    clients = {
        name: _spawn_client(box, [f"{peer}:{PORT}" for peer in names if peer != name], timeout=5.0)
        for name, box in zip(names, boxes, strict=True)
    }
    for name, client in clients.items():
        client.wait(60)
        records = _records(client, 8)
        assert all(r["ok"] for r in records), (name, records)
        # Each name led to the box of that name.
        assert [r["reply"] for r in records] == [peer for peer in names if peer != name]
    # The host (this pytest process) reaches a box at its address, through the bridge.
    assert _host_fetch(str(boxes[4].ip), PORT) == b"n4"
    assert _host_fetch(str(boxes[8].ip), PORT) == b"n8"


def test_a_bridged_box_link_cuts_it_off_from_the_host(nsbox_factory: Callable[..., Box]) -> None:
    box = nsbox_factory(network="bridge", hostname="cut")
    assert box.ip is not None
    _serve(box, "name")
    assert _host_fetch(box.ip, PORT) == b"cut"
    box.link.down()
    with pytest.raises(OSError):  # a timeout, or no route to the host once ARP gives up
        socket.create_connection((box.ip, PORT), timeout=2).close()
    box.link.up()
    assert _wait_until(lambda: _host_answers(box.ip or "", PORT), 10.0)
    assert _host_fetch(box.ip, PORT) == b"cut"
    loopback_only = nsbox_factory()
    with pytest.raises(NetworkError, match="no network link"):
        _ = loopback_only.link


def _host_answers(address: str, port: int) -> bool:
    try:
        return _host_fetch(address, port) != b""
    except OSError:
        return False


def test_stopped_box_gives_back_its_lease_name_and_interface(
    nsbox_factory: Callable[..., Box], subnet: ipaddress.IPv4Network
) -> None:
    keeper = nsbox_factory(network="bridge", hostname="keeper", subnet=str(subnet))
    leaving = Box(network="bridge", hostname="leaving", subnet=str(subnet)).start()
    try:
        assert leaving.network is not None and leaving.ip is not None
        address, interface = leaving.ip, leaving.network.host_interface
        assert os.path.exists(f"/sys/class/net/{interface}")
        with pool.locked(subnet) as entry:
            lease = entry.entry["leases"].get(address)
        assert lease is not None and lease["box"] == leaving.id and lease["interface"] == interface, lease
        assert _lookup(keeper, "leaving") == [address]
        assert keeper.network is not None and keeper.network.bridge == leaving.network.bridge
    finally:
        leaving.stop()
    assert leaving.network.released
    with pool.locked(subnet) as entry:
        assert address not in entry.entry["leases"], entry.entry
    hosts = keeper.read_text("/etc/hosts")
    assert "leaving" not in hosts and address not in hosts, hosts
    assert "keeper" in hosts
    assert _lookup(keeper, "leaving") == []
    assert _lookup(keeper, "keeper") == [keeper.ip]
    assert _wait_until(_interface_gone(interface), 5.0), f"{interface} outlived its box by 5 s"
    # Once the old interface is gone, the address stops cooling down: it may be leased again.
    with pool.locked(subnet) as entry:
        assert address not in entry.entry["leases"] and address not in entry.entry["cooling"], entry.entry


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        (box_module, "_open_mount_namespace"),  # before the kill
        (cgroups, "release"),  # after the kill, before the network
        (hosts, "leave"),  # inside the address's release
    ],
    ids=["before-kill", "after-kill", "in-release"],
)
def test_a_stop_cut_short_is_finished_by_the_next(
    monkeypatch: pytest.MonkeyPatch, subnet: ipaddress.IPv4Network, owner: Any, name: str
) -> None:
    """Ctrl-C in the middle of stop(): the next stop() kills what is left, gives back the lease."""
    real = getattr(owner, name)
    calls = []

    def interrupted_once(*arguments: Any) -> Any:
        calls.append(arguments)
        if len(calls) == 1:
            raise KeyboardInterrupt("in the middle of stop()")
        return real(*arguments)

    box = Box(network="bridge", hostname="cut", subnet=str(subnet)).start()
    address, init_pid = box.ip, box.pid
    assert address is not None and init_pid is not None
    monkeypatch.setattr(owner, name, interrupted_once)
    try:
        with pytest.raises(KeyboardInterrupt):
            box.stop()
        assert box._state == "stopping" and not box.running
        box.stop()
    finally:
        monkeypatch.undo()
        box.stop()
    assert calls, f"{name} was never reached"
    assert box._state == "stopped"
    assert _wait_until(lambda: not psutil.pid_exists(init_pid) or _zombie(init_pid), 10)
    with pool.locked(subnet) as entry:
        assert address not in entry.entry["leases"], entry.entry
    assert box.network is not None and box.network.released
    box.stop()  # and a third time changes nothing


def test_lease_of_a_killed_owner_is_reclaimed(
    tmp_path: Path, nsbox_factory: Callable[..., Box], subnet: ipaddress.IPv4Network
) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from pytest_nsbox import Box
            box = Box(network="bridge", hostname="orphan", subnet=sys.argv[1]).start()
            print(box.ip, box.network.host_interface, box.pid, *box.cgroup.dirs, flush=True)
            time.sleep(1000)
            """
        )
    )
    owner = subprocess.Popen([sys.executable, str(script), str(subnet)], stdout=subprocess.PIPE, text=True)
    cgroup_dirs: list[str] = []
    try:
        assert owner.stdout is not None
        address, interface, init_pid, *cgroup_dirs = owner.stdout.readline().split()
        with pool.locked(subnet) as entry:
            lease = entry.entry["leases"].get(address)
            users = list(entry.entry["users"])
        assert lease is not None and lease["owner"][0] == owner.pid, (owner.pid, lease)
        assert lease["interface"] == interface
        assert any(user[0] == owner.pid for user in users)
        assert os.path.exists(f"/sys/class/net/{interface}")
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    try:
        assert _wait_until(lambda: not psutil.pid_exists(int(init_pid)) or _zombie(int(init_pid)), 10)
        assert _wait_until(_interface_gone(interface), 10), f"{interface} outlived its killed owner"
        # The next one to take the lock frees what the dead process held.
        with pool.locked(subnet) as entry:
            assert address not in entry.entry["leases"], entry.entry
            assert address not in entry.entry["cooling"], entry.entry
            assert not any(user[0] == owner.pid for user in entry.entry["users"]), entry.entry
        # And allocation carries on: a new bridged box starts on the same bridge and is reached.
        fresh = nsbox_factory(network="bridge", hostname="fresh", subnet=str(subnet))
        assert fresh.ip is not None and ipaddress.IPv4Address(fresh.ip) in subnet
        _serve(fresh, "name")
        assert _host_fetch(fresh.ip, PORT) == b"fresh"
    finally:
        for directory in cgroup_dirs:  # a SIGKILLed owner cannot remove its box's cgroup
            rmdir_when_empty(directory)


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------------------- published ports


def test_published_port_reaches_the_box_loopback_until_it_stops() -> None:
    box = Box(publish={0: 8000}).start()
    try:
        assert box.ip is None  # network="none": loopback only, yet published
        _serve(box, "echo", port=8000, bind="127.0.0.1")
        port = box.host_port(8000)
        assert port > 0
        assert _host_fetch("127.0.0.1", port, b"hello box") == b"hello box"
        assert _host_fetch("127.0.0.1", port, b"again") == b"again"
        with pytest.raises(NetworkError, match="port 9 is not published"):
            box.host_port(9)
    finally:
        box.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_publishing_a_busy_host_port_says_which_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        box = Box(publish={taken: 8000})
        with pytest.raises(NetworkError, match=rf"127\.0\.0\.1:{taken}\b.*(in use|pick another)"):
            box.start()
    assert not box.running and box not in live_boxes()


# ---------------------------------------------------------------------------- subnet clash


def test_a_subnet_overlapping_a_host_route_is_refused() -> None:
    clash = ipaddress.IPv4Network("10.77.0.0/16")
    name = "nsbtc" + os.urandom(3).hex()
    # This kernel may lack the dummy driver: a veth pair (both ends up) makes the route as well.
    with _host_veth(name, "10.77.0.1", 24, peer=name + "p"):
        with netns.host() as ipr:
            routes = [r.get_attr("RTA_DST") for r in ipr.route("dump", family=2, table=254)]
        assert "10.77.0.0" in routes, routes
        box = Box(network="bridge", subnet=str(clash))
        with pytest.raises(NetworkError) as raised:
            box.start()
        message = str(raised.value)
        assert "overlaps" in message and "10.77.0.0/24" in message and name in message, message
        assert "--nsbox-subnet" in message, message
        assert not box.running
        assert not os.path.exists(f"/sys/class/net/{bridge.shared_name(clash)}")
        with pool.locked(clash) as entry:
            assert not entry.entry["leases"] and not entry.entry["users"], entry.entry


# ---------------------------------------------------------------------------- NAT


def _nft_nat_missing() -> str | None:
    """Why nat=True cannot work here, or None: the nft program, and a kernel whose nf_tables
    has the ip family (Debian's user-mode-linux kernel has only the bridge family)."""
    if shutil.which("nft") is None:
        return "nat=True needs the nft program (nftables)"
    if os.geteuid() != 0:
        return "rootless: nat=True needs root (its rules live in the host's network namespace)"
    probe = subprocess.run(
        ["unshare", "--net", "nft", "add", "table", "ip", "nsbox_probe"], capture_output=True, text=True
    )
    if probe.returncode != 0:  # (the table, if made, went with the throwaway namespace)
        return f"this kernel's nf_tables has no ip family (CONFIG_NF_TABLES_IPV4): {probe.stderr.strip()}"
    return None


needs_nft_nat = pytest.mark.skipif(_nft_nat_missing() is not None, reason=str(_nft_nat_missing()))


@needs_nft_nat
def test_nat_lets_a_box_out_behind_the_host_address(
    nsbox_factory: Callable[..., Box], subnet: ipaddress.IPv4Network
) -> None:
    outside = nsbox_factory(hostname="outside")  # network="none": we wire it up by hand
    name = "nsbtout" + os.urandom(2).hex()
    with open("/proc/sys/net/ipv4/ip_forward") as handle:
        forwarding_before = handle.read().strip()
    with _host_veth(name, "198.51.100.1", 24, peer="ext0", peer_pid=outside.pid):
        assert outside.pid is not None
        with netns.inside(outside.pid) as ipr:
            index = ipr.link_lookup(ifname="ext0")[0]
            ipr.addr("add", index=index, address="198.51.100.2", prefixlen=24)
            ipr.link("set", index=index, state="up")
        _serve(outside, "peer")
        assert _host_fetch("198.51.100.2", PORT) == b"198.51.100.1"  # the wiring works
        with (
            Box(network="bridge", nat=True, hostname="natted", subnet=str(subnet)) as natted,
            Box(network="bridge", hostname="confined", subnet=str(subnet)) as confined,
        ):
            seen = _eventually_reaches(natted, f"198.51.100.2:{PORT}")
            assert seen["ok"], seen
            assert seen["reply"] == "198.51.100.1", f"the outside saw {seen['reply']}, not the host"
            blocked = _reaches(confined, f"198.51.100.2:{PORT}", timeout=2.0)
            assert not blocked["ok"], f"a box without nat got out: {blocked}"
        # The last NAT box out removes the table and restores forwarding (unless a concurrent
        # run on this host has NAT boxes of its own).
        with state.locked_document(nat.DOCUMENT) as document:
            others = dict(document.get("boxes", {}))
        if others:
            return
        with open("/proc/sys/net/ipv4/ip_forward") as handle:
            assert handle.read().strip() == forwarding_before
        nft = subprocess.run(["nft", "list", "table", "ip", "pytest_nsbox"], capture_output=True, check=False)
        assert nft.returncode != 0, nft.stdout


@needs_nft_nat
def test_nat_state_of_a_killed_owner_is_reclaimed_by_the_sweeper(
    tmp_path: Path, subnet: ipaddress.IPv4Network
) -> None:
    with open("/proc/sys/net/ipv4/ip_forward") as handle:
        forwarding_before = handle.read().strip()
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from pytest_nsbox import Box\n"
        "box = Box(network='bridge', nat=True, subnet=sys.argv[1]).start()\n"
        "print(box.ip, *box.cgroup.dirs, flush=True)\n"
        "time.sleep(1000)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script), str(subnet)], stdout=subprocess.PIPE, text=True)
    cgroup_dirs: list[str] = []
    try:
        assert owner.stdout is not None
        _address, *cgroup_dirs = owner.stdout.readline().split()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    try:
        reclaim.sweep()
        with state.locked_document(nat.DOCUMENT) as document:
            others = {a: o for a, o in document.get("boxes", {}).items() if state.Owner.from_json(o).alive()}
        if others:
            pytest.skip(f"another run on this host has NAT boxes: {others}")
        with open("/proc/sys/net/ipv4/ip_forward") as handle:
            assert handle.read().strip() == forwarding_before, "ip_forward was left on"
        nft = subprocess.run(["nft", "list", "table", "ip", nat.TABLE], capture_output=True, check=False)
        assert nft.returncode != 0, f"the nft table outlived its last box: {nft.stdout!r}"
    finally:
        # Whatever the sweeper did, leave the host as it was: a NAT box's stop reclaims the rest.
        Box(network="bridge", nat=True, subnet=str(subnet)).start().stop()
        for directory in cgroup_dirs:
            rmdir_when_empty(directory)


def test_a_bridged_box_without_nat_fails_name_lookups_at_once(nsbox_factory: Callable[..., Box]) -> None:
    """Its default route ends at the host, so a name server out there would make lookups hang;
    it has none listed, so a name missing from /etc/hosts fails instead (well within 10 s)."""
    box = nsbox_factory(network="bridge")
    assert "nameserver" not in box.read_text("/etc/resolv.conf")
    missing = box.run(["getent", "hosts", "no-such-host.example"], timeout=10)
    assert missing.returncode == 2
    assert box.run(["getent", "hosts", box.hostname], timeout=10).stdout.split()[0] == box.ip


@needs_nft_nat
def test_a_nat_setup_that_fails_half_way_leaves_the_host_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_nsbox.network import nat

    with open("/proc/sys/net/ipv4/ip_forward") as handle:
        forwarding_before = handle.read().strip()
    real_nft = nat._nft

    def failing_nft(script: str, what: str, check: bool = True) -> None:
        if script.startswith("add element"):
            raise NetworkError(f"{what}: nft failed: injected")
        real_nft(script, what, check)

    monkeypatch.setattr(nat, "_nft", failing_nft)
    with pytest.raises(NetworkError, match="injected"):
        Box(network="bridge", nat=True).start()
    with open("/proc/sys/net/ipv4/ip_forward") as handle:
        assert handle.read().strip() == forwarding_before
    table = subprocess.run(["nft", "list", "table", "ip", nat.TABLE], capture_output=True, check=False)
    assert table.returncode != 0, "the half-made table was left behind"
    assert not (state.STATE_DIR / f"{nat.DOCUMENT}.json").exists()
