"""What software does at its resource limits: a pids cap, a memory cap, a CPU quota."""

import pytest

PREFORK_SERVER = r"""
import os, sys, time
workers = []
for i in range(8):
    try:
        pid = os.fork()
    except BlockingIOError:                      # EAGAIN: the pids cap says no
        print(f"could start only {len(workers)} of 8 workers; serving with those", flush=True)
        break
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    workers.append(pid)
for pid in workers:
    os.waitpid(pid, 0)
print("served", flush=True)
"""


@pytest.mark.nsbox(limits={"pids": 4})
def test_a_prefork_server_degrades_instead_of_crashing(nsbox):
    result = nsbox.run(["python3", "-c", PREFORK_SERVER], timeout=60)

    assert result.returncode == 0, result.stderr
    assert "could start only 2 of 8 workers" in result.stdout  # init + server + 2 workers = 4
    assert result.stdout.endswith("served\n")
    assert nsbox.cgroup.stats().pids_peak == 4


@pytest.mark.nsbox(limits={"memory": "64M"})
def test_a_leaking_worker_is_oom_killed_and_reported(nsbox):
    leak = "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))"
    result = nsbox.run(["python3", "-c", leak], timeout=120)

    assert result.oom_killed
    assert result.returncode == -9
    assert nsbox.cgroup.stats().oom_kills == 1
    assert nsbox.run("echo the box lives on").returncode == 0


def test_a_cpu_starved_loop_is_throttled(nsbox, cgroup_limit):
    cgroup_limit(cpus=0.25)
    nsbox.run(["timeout", "1", "sh", "-c", "while :; do :; done"], timeout=60)

    stats = nsbox.cgroup.stats()
    assert stats.cpu_usec < 600_000  # a quarter of a CPU for one second, not a whole one
    assert stats.throttled_usec > 0
