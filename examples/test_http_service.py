"""apps/order_service.py in a box, and its clients: the test itself, over a bridged network
(`network="bridge"` gives the box an address the host reaches, `nsbox.ip`) or through a
published port (`publish={host_port: box_port}` forwards the host's 127.0.0.1 to the box; no
bridge needed), and apps/order_client.py in a second box made with `nsbox_factory`, which
finds the service by its hostname.
"""

import http.client
import json
import os
from pathlib import Path

import pytest

APPS = Path(__file__).parent / "apps"
pytestmark = pytest.mark.needs_programs("python3")


def start_service(box):
    box.copy_in(APPS / "order_service.py", "/opt/app/order_service.py")
    service = box.spawn(
        ["python3", "/opt/app/order_service.py", "--port", "8000", "--ledger", "/var/lib/ledger"]
    )
    box.wait_for_port(8000)
    return service


def request(host, port, method, path, body=None):
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="rootless: a rootless session's bridge lives in a network namespace of its own, which this "
    "test process is not in; the published port of the next test reaches the service",
)
@pytest.mark.nsbox(network="bridge", hostname="orders")
def test_the_service_records_each_order_once(nsbox):
    start_service(nsbox)

    assert request(nsbox.ip, 8000, "POST", "/orders/7") == (201, {"recorded": [7]})
    retry = request(nsbox.ip, 8000, "POST", "/orders/7")
    assert retry == (200, {"recorded": []}), "a retried order was recorded twice"
    assert request(nsbox.ip, 8000, "POST", "/orders", body="[7, 8, 9]") == (201, {"recorded": [8, 9]})

    assert request(nsbox.ip, 8000, "GET", "/orders") == (200, [7, 8, 9])
    assert nsbox.read_text("/var/lib/ledger") == "7\n8\n9\n"


@pytest.mark.nsbox(publish={0: 8000})  # 0: any free port on the host's 127.0.0.1
def test_a_published_port_reaches_the_service_without_a_bridge(nsbox):
    start_service(nsbox)

    port = nsbox.host_port(8000)
    assert request("127.0.0.1", port, "POST", "/orders/1") == (201, {"recorded": [1]})
    assert request("127.0.0.1", port, "GET", "/nowhere") == (404, {"error": "not found"})


def test_a_client_on_another_machine_finds_the_service_by_name(nsbox_factory):
    service = nsbox_factory(hostname="orders", network="bridge")
    client = nsbox_factory(hostname="shop", network="bridge")
    start_service(service)
    client.copy_in(APPS / "order_client.py", "/opt/app/order_client.py")

    sent = client.run(
        ["python3", "/opt/app/order_client.py", "http://orders:8000", "--orders", "3"], timeout=60
    )

    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.splitlines()[:3] == ["order 1 sent", "order 2 sent", "order 3 sent"]
    assert service.read_text("/var/lib/ledger") == "1\n2\n3\n"
