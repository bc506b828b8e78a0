"""A client on a slow network: added latency, and a bandwidth cap.

`netpair.link.set(delay_ms=...)` adds round-trip time between the pair's boxes with the
kernel's netem qdisc, and `set(rate=...)` caps the bandwidth with tbf. Over a link with 100 ms
of round trip, apps/order_client.py's `--bulk` mode must send many orders in one request, not
one request per order (50 requests would take 10 s there; on a LAN it makes no difference).
Over a 1 mbit/s link a large upload takes its time and must still get through.

Delay needs the `sch_netem` kernel module; on a kernel without it the latency test skips and
says so (`nsbox doctor` shows it too). The bandwidth cap works everywhere.
"""

from pathlib import Path

import pytest

from pytest_nsbox import NetworkError, probe

APPS = Path(__file__).parent / "apps"
pytestmark = pytest.mark.needs_programs("python3")
NETEM = next(check for check in probe.capabilities() if check.name == "netem")


@pytest.fixture
def service(netpair):
    """The order service on box b; box a has the client."""
    netpair.b.copy_in(APPS / "order_service.py", "/opt/app/order_service.py")
    netpair.a.copy_in(APPS / "order_client.py", "/opt/app/order_client.py")
    netpair.b.spawn(["python3", "/opt/app/order_service.py", "--port", "8000", "--ledger", "/var/lib/ledger"])
    netpair.b.wait_for_port(8000)
    return netpair


def send(pair, *options):
    """Run the client in box a; return its seconds (it prints "N orders sent in S s")."""
    result = pair.a.run(["python3", "/opt/app/order_client.py", "http://b:8000", *options], timeout=120)
    assert result.returncode == 0, f"the client failed:\n{result.stdout}{result.stderr}"
    return float(result.stdout.split()[-2])


@pytest.mark.skipif(not NETEM.ok, reason=f"needs the kernel's sch_netem qdisc to add delay: {NETEM.detail}")
def test_a_bulk_upload_is_not_slowed_down_by_latency(service):
    try:
        service.link.set(delay_ms=100)
    except NetworkError as exc:  # the probe could not tell, and the kernel said no
        pytest.skip(f"needs the kernel's sch_netem qdisc to add delay: {exc}")

    one_order = send(service, "--orders", "1", "--timeout", "5")
    assert one_order >= 0.18  # connect and request: two round trips of 100 ms

    bulk = send(service, "--orders", "50", "--bulk", "--timeout", "5")
    assert bulk < 4 * one_order, f"50 orders took {bulk:.1f} s: one request per order?"
    assert service.b.read_text("/var/lib/ledger").split() == [str(order) for order in range(1, 51)]


def test_a_large_upload_over_a_1mbit_link_takes_its_time_and_gets_through(service):
    orders = ["--orders", "20000", "--bulk", "--timeout", "10"]  # about 130 kB of JSON
    fast = send(service, *orders)

    service.link.set(rate="1mbit")
    slow = send(service, *orders)

    assert fast < 0.5 and slow >= 0.8, (fast, slow)  # a second at 1 mbit/s, less a burst's head start
    assert len(service.b.read_text("/var/lib/ledger").split()) == 20000
