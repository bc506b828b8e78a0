"""``Box.pause()``/``resume()``/``paused()`` and ``Box.restart()``: a box frozen where it stands,
and a box whose power is cut and comes back on the same disk, name and address.

The boxes' root is the host's /, so the small Python programs below run inside them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import psutil
import pytest

from pytest_nsbox import Box, BoxError, BoxProcess, RootlessError

pytestmark = pytest.mark.requires("boxes")

PORT = 7100

# Writes 1, 2, 3, ... to /tmp/counter every 10 ms (whole: written aside, then renamed).
COUNTER = """
import os, time
i = 0
while True:
    i += 1
    with open("/tmp/counter.new", "w") as f:
        f.write(str(i))
    os.replace("/tmp/counter.new", "/tmp/counter")
    time.sleep(0.01)
"""

# Answers every connection with the box's hostname.
SERVER = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(socket.gethostname().encode())
"""

# One connection attempt to argv[1]:argv[2] within argv[3] seconds; prints what happened.
CLIENT = """
import json, socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as conn:
        print(json.dumps({"ok": True, "reply": conn.recv(100).decode()}))
except OSError as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
"""


def _counter(box: Box) -> int:
    return int(box.read_text("/tmp/counter"))


def _start_counter(box: Box) -> BoxProcess:
    process = box.spawn(["python3", "-c", COUNTER])
    box.wait_for_file("/tmp/counter", timeout=15)
    return process


def _serve(box: Box) -> BoxProcess:
    process = box.spawn(["python3", "-c", SERVER, str(PORT)])
    box.wait_for_port(PORT, timeout=15)
    return process


def _connect(client: Box, address: str, timeout: float) -> dict[str, object]:
    result = client.run(["python3", "-c", CLIENT, address, str(PORT), str(timeout)], timeout=timeout + 20)
    assert result.returncode == 0, result
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


# ------------------------------------------------------------------------------- pause


def test_pause_stops_a_counter_and_resume_continues_it_from_the_same_value() -> None:
    with Box() as box:
        process = _start_counter(box)
        assert not box.is_paused
        box.pause()
        assert box.is_paused
        stopped_at = _counter(box)
        time.sleep(0.3)
        assert _counter(box) == stopped_at, "the counter went on while the box was paused"
        box.resume()
        assert not box.is_paused
        deadline = time.monotonic() + 10
        while (value := _counter(box)) == stopped_at and time.monotonic() < deadline:
            time.sleep(0.001)
        # The same process goes on counting: not restarted from 1, no value skipped.
        assert value == stopped_at + 1
        assert process.poll() is None


def test_a_paused_box_does_not_answer_and_answers_again_after_resume(
    nsbox_factory: Callable[..., Box],
) -> None:
    server = nsbox_factory(network="bridge", hostname="server")
    client = nsbox_factory(network="bridge", hostname="client")
    _serve(server)
    assert _connect(client, "server", 5.0) == {"ok": True, "reply": "server"}
    with server.paused():
        assert server.ip is not None  # it keeps its address
        answer = _connect(client, "server", 1.0)
        assert answer["ok"] is False and "timed out" in str(answer["error"]), answer
    assert _connect(client, "server", 5.0) == {"ok": True, "reply": "server"}


def test_run_on_a_paused_box_fails_at_once_and_file_helpers_keep_working() -> None:
    with Box() as box:
        box.write_text("/tmp/note", "before")
        box.pause()
        began = time.monotonic()
        with pytest.raises(BoxError, match=r"is paused: .*resume\(\) it first"):
            box.run(["true"], timeout=30)
        with pytest.raises(BoxError, match="is paused"):
            box.spawn(["sleep", "1"])
        with pytest.raises(BoxError, match="is paused"):
            box.wait_for_file("/tmp/never", timeout=30)
        assert time.monotonic() - began < 5
        assert box.read_text("/tmp/note") == "before"
        box.write_text("/tmp/note", "while paused")
        box.pause()  # a second pause changes nothing
        box.resume()
        assert box.run(["cat", "/tmp/note"]).stdout == "while paused"
        box.resume()  # nor does resuming a running box


def test_paused_block_resumes_on_exit_and_on_an_error() -> None:
    with Box() as box:
        with box.paused():
            assert box.is_paused and box.cgroup.is_frozen()
        assert not box.is_paused and not box.cgroup.is_frozen()
        with pytest.raises(RuntimeError, match="inside"), box.paused():
            raise RuntimeError("inside")
        assert not box.is_paused and not box.cgroup.is_frozen()
        assert box.run(["true"]).returncode == 0


def test_stop_of_a_paused_box_kills_everything() -> None:
    box = Box().start()
    sleeper = box.spawn(["sleep", "300"])
    pids = [process.pid for process in box.processes()]
    box.pause()
    began = time.monotonic()
    box.stop()
    assert time.monotonic() - began < 5
    assert not box.is_paused
    assert sleeper.poll() is not None
    assert not [pid for pid in pids[1:] if psutil.pid_exists(pid)]
    with pytest.raises(BoxError, match="stopped"):
        box.pause()


def test_a_snapshot_of_a_paused_box_leaves_it_paused() -> None:
    with Box() as box:
        _start_counter(box)
        box.pause()
        stopped_at = _counter(box)
        image = box.snapshot()
        assert box.is_paused and box.cgroup.is_frozen()
        time.sleep(0.1)
        assert _counter(box) == stopped_at
        box.resume()
    with Box(image=image) as copy:
        assert int(copy.read_text("/tmp/counter")) == stopped_at


def test_pausing_a_box_not_started_says_so() -> None:
    with pytest.raises(BoxError, match="start it first"):
        Box().pause()


def test_a_host_without_cgroups_names_the_doctor_freezer_line() -> None:
    from pytest_nsbox import cgroups

    with Box() as box:
        real, box.cgroup = box.cgroup, cgroups.Cgroup("none", None, [])  # as on a host without
        try:
            if os.geteuid() != 0:  # rootless: what is missing is a delegated cgroup v2 subtree
                with pytest.raises(RootlessError, match="pausing needs a cgroup freezer"):
                    box.pause()
            else:
                with pytest.raises(BoxError, match=r"`freezer` line of `nsbox doctor`"):
                    box.pause()
            assert not box.is_paused
        finally:
            box.cgroup = real


# ----------------------------------------------------------------------------- restart


def test_restart_kills_processes_and_keeps_root_name_and_limits() -> None:
    with Box(hostname="node", limits={"pids": 50}, tmpfs={"/scratch": "1M"}, env={"ROLE": "db"}) as box:
        box_id, old_pid = box.id, box.pid
        sleeper = box.spawn(["sleep", "300"])
        box.write_text("/var/data.txt", "kept")
        box.write_text("/scratch/ram.txt", "lost")
        host_pids = [process.pid for process in box.processes()]
        assert len(host_pids) == 2
        assert box.restart() is box
        assert not psutil.pid_exists(host_pids[1])  # the old init may linger as a zombie a moment
        assert sleeper.poll() == -9
        assert box.id == box_id and box.pid != old_pid
        assert [process.pid for process in box.processes()] == [box.pid]
        assert box.read_text("/var/data.txt") == "kept"
        assert not box.exists("/scratch/ram.txt") and box.exists("/scratch")
        assert box.run(["hostname"]).stdout == "node\n"
        assert box.run(["sh", "-c", "echo $ROLE"]).stdout == "db\n"
        if box.cgroup.driver is not None:
            assert _pids_max(box) == 50
        # Changes after a restart are kept by the next one.
        box.write_text("/var/second.txt", "too")
        box.restart()
        assert box.read_text("/var/data.txt") == "kept"
        assert box.read_text("/var/second.txt") == "too"
        assert box.run(["cat", "/var/second.txt"]).stdout == "too"
        assert box.root is not None and box.root.merged == f"/proc/{box.pid}/root"
    with pytest.raises(BoxError, match="stopped"):
        box.restart()


def _pids_max(box: Box) -> int:
    for procs in box.cgroup.procs_files():
        path = os.path.join(os.path.dirname(procs), "pids.max")
        if os.path.exists(path):
            with open(path) as handle:
                return int(handle.read())
    raise AssertionError(f"no pids.max next to {box.cgroup.procs_files()}")


def test_a_restarted_bridged_box_keeps_its_address_and_is_reached_there(
    nsbox_factory: Callable[..., Box],
) -> None:
    server = nsbox_factory(network="bridge", hostname="server")
    client = nsbox_factory(network="bridge", hostname="client")
    _serve(server)
    address = server.ip
    assert address is not None
    assert _connect(client, address, 5.0) == {"ok": True, "reply": "server"}
    server.restart()
    assert server.ip == address
    # Nothing listens until the service is started again: a refusal, not a timeout.
    answer = _connect(client, address, 5.0)
    assert answer["ok"] is False and "refused" in str(answer["error"]), answer
    _serve(server)
    assert _connect(client, address, 5.0) == {"ok": True, "reply": "server"}
    assert _connect(client, "server", 5.0) == {"ok": True, "reply": "server"}
    server.restart()
    assert server.ip == address
    _serve(server)
    assert _connect(client, "server", 5.0) == {"ok": True, "reply": "server"}


def test_a_paused_box_can_be_restarted() -> None:
    with Box() as box:
        _start_counter(box)
        box.pause()
        box.restart()
        assert not box.is_paused
        assert [process.pid for process in box.processes()] == [box.pid]
        assert box.run(["true"]).returncode == 0
