"""A process with more than 1,024 descriptors open still drives boxes.

``select`` cannot watch a descriptor numbered 1024 or more (``FD_SETSIZE``), and CI containers
often allow a million open files: every wait of the host side must hold up past that line.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
from collections.abc import Iterator

import pytest

from pytest_nsbox import Box, teardown

pytestmark = pytest.mark.requires("boxes")

OPENED = 1100
SERVER = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', 7100)); s.listen()\n"
    "print('serving', flush=True)\n"
    "c, _ = s.accept(); c.sendall(c.recv(64).upper()); c.close()\n"
)


@pytest.fixture
def many_fds() -> Iterator[list[int]]:
    """``OPENED`` more descriptors (the soft limit raised to the hard one if need be), so that
    every descriptor made from here on is numbered above 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = OPENED + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
    fds: list[int] = []
    # Descriptors that earlier boxes leave to a background close would free numbers below
    # 1024 while this test runs, for the box's descriptors to take: let them go first.
    teardown.wait_closed()
    try:
        fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(OPENED)]
        assert max(fds) >= 1024
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_box_runs_spawns_and_stops_above_fd_1024(many_fds: list[int]) -> None:
    box = Box(network="bridge", hostname="manyfds", publish={0: 7100}).start()
    try:
        assert box._pidfd is not None and box._link is not None and box._files is not None
        # A number freed meanwhile (a waiting box's announcement closed) may go to one of them.
        assert max(box._pidfd, box._link.sock.fileno(), box._files.root_fd) >= 1024
        result = box.run(["hostname"], check=True)
        assert result.stdout == "manyfds\n"
        server = box.spawn([sys.executable, "-c", SERVER])
        box.wait_for_output("serving", timeout=30)
        box.wait_for_port(7100, timeout=30)
        with socket.create_connection(("127.0.0.1", box.host_port(7100)), timeout=10) as client:
            client.sendall(b"ping")
            assert client.recv(64) == b"PING"
        assert server.wait(timeout=30) == 0
        assert box.run("exit 3").returncode == 3
    finally:
        box.stop()
    assert not box.running
