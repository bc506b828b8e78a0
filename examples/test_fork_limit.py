"""A pre-forking server under a pids limit must degrade, not crash.

apps/prefork_server.py forks eight workers. In a box capped at 6 processes (its init, the
master and four workers) four of those forks fail with EAGAIN, as they would in a container
with a pids limit or under `ulimit -u`: the server must say so, keep serving with the workers
it got, and still answer. The test talks to it from the host through a published port, so the
client takes no process from the box.
"""

import http.client
from pathlib import Path

import pytest

APP = Path(__file__).parent / "apps" / "prefork_server.py"
pytestmark = pytest.mark.needs_programs("python3")


@pytest.mark.nsbox(limits={"pids": 6}, publish={0: 8080})
def test_prefork_server_serves_with_the_workers_it_could_fork(nsbox):
    nsbox.copy_in(APP, "/opt/app/prefork_server.py")
    server = nsbox.spawn(["python3", "/opt/app/prefork_server.py", "--port", "8080", "--workers", "8"])

    started = server.wait_for_output(r"serving on port 8080 with (\d+) of 8 workers|Traceback", timeout=30)
    assert started[0] != "Traceback", f"the server crashed at the fork limit:\n{server.stderr}"
    assert started[1] == "4"  # 6 processes: the box's init, the master, four workers
    assert "fork failed (Resource temporarily unavailable): degraded" in server.stderr

    answered_by = set()
    for _ in range(20):
        connection = http.client.HTTPConnection("127.0.0.1", nsbox.host_port(8080), timeout=10)
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200
        answered_by.add(response.read())
        connection.close()
    assert 1 <= len(answered_by) <= 4  # only the workers that exist answer
    assert server.poll() is None, "the server exited"
    assert nsbox.cgroup.stats().pids_peak == 6
