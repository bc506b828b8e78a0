"""Networked boxes: a client and its server on a network of their own, a cut and a slow link,
and servers in boxes that the test itself talks to.

`netpair` gives two boxes, `a` and `b`, alone on a private bridge; each reaches the other by
hostname. `netpair.link` cuts the link (`down()`/`up()`) or caps its bandwidth
(`set(rate="1mbit")`). A box with `network="bridge"` has an address the host reaches
(`nsbox.ip`); `publish` forwards a port on the host's loopback to a port of a box, bridged or
not. The servers are Python's own http.server, run from the box's (here: the host's) Python.
"""

import http.client
import re
import sys

import pytest

CLIENT = "import urllib.request as u; print(u.urlopen('http://b:8000/hello.txt').read().decode())"
SERVER = [sys.executable, "-u", "-m", "http.server", "8000", "--directory", "/srv/www"]

# Fetch a URL from inside a box: print the body's size and the seconds it took, or the reason it failed
# (on stderr, exit status 1).
FETCH = r"""
import sys, time, urllib.request
started = time.monotonic()
try:
    body = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read()
except OSError as exc:  # URLError and socket timeouts alike
    sys.exit(f"fetch failed: {exc}")
print(len(body), round(time.monotonic() - started, 3))
"""


def serve(box, files):
    """Start http.server on port 8000 of ``box``, serving ``files`` ({name: text}); wait until it listens."""
    for name, text in files.items():
        box.write_text(f"/srv/www/{name}", text)
    server = box.spawn(SERVER)
    box.wait_for_port(8000, timeout=30)
    return server


def fetch(box, url, timeout=10.0):
    """``FETCH`` run in ``box``: its RunResult (stdout "<bytes> <seconds>")."""
    return box.run([sys.executable, "-c", FETCH, url, str(timeout)], timeout=timeout + 30)


def test_client_reaches_its_server_by_hostname(netpair):
    server = serve(netpair.b, {"hello.txt": "hello from b\n"})

    result = netpair.a.run([sys.executable, "-c", CLIENT], check=True)  # "b": the other box, by name

    assert result.stdout == "hello from b\n\n"
    # The server saw the request come from a's address on the pair's network.
    server.wait_for_output(re.escape(netpair.a.ip) + r' .*"GET /hello.txt HTTP/1.1" 200', timeout=10)


def test_a_cut_link_times_the_client_out_and_it_recovers(netpair):
    serve(netpair.b, {"status": "ok\n"})

    netpair.link.down()  # like pulling the cable: addresses and routes stay, packets go nowhere
    cut = fetch(netpair.a, "http://b:8000/status", timeout=1.5)
    assert cut.returncode == 1 and "timed out" in cut.stderr, cut.stderr

    netpair.link.up()
    restored = fetch(netpair.a, "http://b:8000/status")
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.split()[0] == "3"  # len("ok\n")


def test_a_download_over_a_1mbit_link_takes_its_time(netpair):
    serve(netpair.b, {"blob": "x" * 125_000})  # one megabit

    netpair.link.set(rate="1mbit")
    size, seconds = fetch(netpair.a, "http://b:8000/blob", timeout=30).stdout.split()
    assert size == "125000" and float(seconds) >= 0.8  # 1 s at 1 mbit/s, less a burst's head start

    netpair.link.clear()
    size, seconds = fetch(netpair.a, "http://b:8000/blob").stdout.split()
    assert size == "125000" and float(seconds) < 0.5


@pytest.mark.nsbox(network="bridge", hostname="api")
def test_the_host_reaches_a_bridged_box_by_its_address(nsbox):
    serve(nsbox, {"health": "healthy\n"})

    connection = http.client.HTTPConnection(nsbox.ip, 8000, timeout=10)  # from the test process itself
    connection.request("GET", "/health")
    response = connection.getresponse()

    assert response.status == 200 and response.read() == b"healthy\n"
    assert nsbox.run(["hostname", "-i"]).stdout.split() == [nsbox.ip]


def test_a_published_port_reaches_a_server_on_the_box_loopback(nsbox_factory):
    box = nsbox_factory(publish={0: 8000})  # 0: any free port on the host's 127.0.0.1; no bridge needed
    box.write_text("/srv/www/index.html", "<h1>it works</h1>\n")
    box.spawn([*SERVER, "--bind", "127.0.0.1"])  # only the box's own loopback
    box.wait_for_port(8000, timeout=30)

    connection = http.client.HTTPConnection("127.0.0.1", box.host_port(8000), timeout=10)
    connection.request("GET", "/")
    response = connection.getresponse()

    assert response.status == 200 and response.read() == b"<h1>it works</h1>\n"
