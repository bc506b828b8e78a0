"""A client must ride out a network partition: retry, back off, and deliver every order once.

`netpair` gives two boxes, `a` (the client) and `b` (the service), alone on a network of their
own; `netpair.link.down()` cuts it in the middle of the run, like a pulled cable: packets go
nowhere and requests time out. apps/order_client.py must retry with backoff until the link is
back (`link.up()`), and apps/order_service.py must record every order exactly once, even the
one whose reply was lost in the cut.
"""

from pathlib import Path

import pytest

APPS = Path(__file__).parent / "apps"
pytestmark = pytest.mark.needs_programs("python3")


def test_the_client_retries_through_a_partition_and_no_order_is_lost(netpair):
    service, client = netpair.b, netpair.a
    service.copy_in(APPS / "order_service.py", "/opt/app/order_service.py")
    client.copy_in(APPS / "order_client.py", "/opt/app/order_client.py")
    service.spawn(["python3", "/opt/app/order_service.py", "--port", "8000", "--ledger", "/var/lib/ledger"])
    service.wait_for_port(8000)

    run = client.spawn(
        ["python3", "/opt/app/order_client.py", "http://b:8000", "--orders", "20", "--interval", "0.05"]
    )
    run.wait_for_output(r"order 5 sent", timeout=30)
    netpair.link.down()
    run.wait_for_output(r"attempt 3 failed|giving up", timeout=30)  # it keeps trying, backing off
    netpair.link.up()

    run.wait(timeout=60)
    result = run.result()
    assert result.returncode == 0, f"the client gave up during the partition:\n{result.stdout}{result.stderr}"
    assert "retrying in 0.1 s" in result.stdout and "retrying in 0.4 s" in result.stdout  # backoff
    assert "20 orders sent" in result.stdout
    ledger = service.read_text("/var/lib/ledger").split()
    assert ledger == [str(order) for order in range(1, 21)], "orders lost or recorded twice"
