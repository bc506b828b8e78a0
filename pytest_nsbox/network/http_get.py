"""One HTTP GET from inside a box's network namespace, for ``Box.wait_for_http``.

Why from the host: a box may have no network the host reaches (``network="none"``), and its
image may have neither curl nor Python. A socket made in the box's network namespace
(``netns.socket_inside``) reaches the box's own loopback whatever thread then uses it, so
``http.client`` runs here, in the test's process, and the box needs nothing.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
from collections.abc import Callable

from . import netns

BODY_LIMIT = 1 << 20  # a wait wants to know the server answers, not to download a file


class _BoxConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose socket lives in the network namespace of process ``pid``;
    ``host`` (the URL's) goes in the Host header, ``address`` is what it connects to."""

    def __init__(self, pid: int, address: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._pid = pid
        self._address = address

    def connect(self) -> None:
        family = socket.AF_INET6 if ":" in self._address else socket.AF_INET
        sock = netns.socket_inside(self._pid, family)
        try:
            sock.settimeout(self.timeout)
            sock.connect((self._address, self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def get_inside(pid: int, address: str, host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """GET ``path`` from ``address:port`` as the box of init ``pid`` sees it: the status and
    (up to ``BODY_LIMIT`` bytes of) the body. Raises ``OSError`` (refused, reset, timed out)
    or ``http.client.HTTPException`` (not HTTP) when no answer came."""
    connection = _BoxConnection(pid, address, host, port, timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read(BODY_LIMIT)
    finally:
        connection.close()


def address_of(host: str, read_hosts: Callable[[], bytes]) -> str | None:
    """The address of a URL's host as the box sees it: an address as it is, ``localhost``, or
    a name of the box's own ``/etc/hosts`` (``read_hosts`` reads it, only if needed); None if
    none of these. Why not the resolver: this process would ask the host's, not the box's."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host == "localhost":
        return "127.0.0.1"
    try:
        hosts = read_hosts().decode("utf-8", "replace")
    except OSError:
        return None
    for line in hosts.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) > 1 and host in fields[1:]:
            return fields[0]
    return None
