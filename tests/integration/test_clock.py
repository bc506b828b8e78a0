"""clock=: a box in a time namespace of its own, its monotonic and boottime clocks offset.

Each test compares what a box reads with what the host reads at (about) the same moment, with
a generous tolerance: the two readings are a command's start-up apart, never days. The wall
clock is the host's in every box. A box with offsets is made for them, so the tests also check
that the boxes made after it, plain ones from the waiting pool, still read the host's clocks.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from pytest_nsbox import Box, probe, zygote
from pytest_nsbox.errors import ArgumentTypeError, ConfigError, HostUnsupportedError

pytestmark = pytest.mark.requires("boxes")
# A kernel built without CONFIG_TIME_NS has none; user-mode Linux (the cgroup v2 test guest)
# cannot have them at all, so there these tests skip and the refusal below is the real one.
needs_time_namespace = pytest.mark.skipif(
    not probe.has_time_namespace(), reason="this kernel has no time namespaces (CONFIG_TIME_NS)"
)

DAY = 86400
OFFSET = 400 * DAY
SLACK = 60.0  # seconds: a box's start and a command's run, many times over
READ_CLOCKS = (
    "python3 -c 'import time; print(time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME), time.time())'"
)


def box_clocks(box: Box) -> tuple[float, float, float]:
    """The box's (monotonic, boottime, wall clock) minus the host's, read around the command."""
    before = (time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME), time.time())
    monotonic, boottime, wall = (float(word) for word in box.run(READ_CLOCKS, check=True).stdout.split())
    after = (time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME), time.time())
    # The host's reading halfway: the command read its clocks somewhere in between.
    host = [(start + end) / 2 for start, end in zip(before, after, strict=True)]
    return monotonic - host[0], boottime - host[1], wall - host[2]


def box_uptime(box: Box) -> float:
    return float(box.run("cat /proc/uptime", check=True).stdout.split()[0])


def host_uptime() -> float:
    with open("/proc/uptime") as handle:
        return float(handle.read().split()[0])


def same_time_namespace(pid: int) -> bool:
    return os.stat(f"/proc/{pid}/ns/time").st_ino == os.stat("/proc/self/ns/time").st_ino


@needs_time_namespace
def test_uptime_in_a_box_says_400_days() -> None:
    with Box(clock={"monotonic": "+400d", "boottime": "+400d"}) as box:
        assert box_uptime(box) >= OFFSET
        days = re.search(r"up (\d+) days", box.run("uptime", check=True).stdout)
        assert days is not None and int(days.group(1)) >= 400
        assert box.pid is not None and not same_time_namespace(box.pid)


@needs_time_namespace
def test_a_plain_box_reads_the_hosts_uptime_and_shares_its_time_namespace() -> None:
    with Box(clock={"boottime": "+400d"}):
        pass  # a box with offsets first: the next ones must not inherit its namespace
    with Box() as box:
        assert abs(box_uptime(box) - host_uptime()) < SLACK
        assert box.pid is not None and same_time_namespace(box.pid)
    helper = zygote.current()
    assert helper is not None
    # The helper is back in the host's time namespace, for itself and for its next children.
    assert same_time_namespace(helper.pid)
    children = os.stat(f"/proc/{helper.pid}/ns/time_for_children").st_ino
    assert children == os.stat("/proc/self/ns/time").st_ino


@needs_time_namespace
def test_monotonic_and_boottime_jump_by_their_offsets_and_the_wall_clock_does_not() -> None:
    with Box(clock={"monotonic": "+400d", "boottime": "+2h"}) as box:
        monotonic, boottime, wall = box_clocks(box)
    assert abs(monotonic - OFFSET) < SLACK
    assert abs(boottime - 7200) < SLACK
    assert abs(wall) < 5  # CLOCK_REALTIME has no offset in a time namespace
    with Box() as plain:
        monotonic, boottime, wall = box_clocks(plain)
    assert abs(monotonic) < SLACK and abs(boottime) < SLACK and abs(wall) < 5


@needs_time_namespace
def test_date_in_a_box_is_the_hosts() -> None:
    with Box(clock={"monotonic": "+400d", "boottime": "+400d"}) as box:
        inside = int(box.run("date +%s", check=True).stdout)
    assert abs(inside - time.time()) < 5


@needs_time_namespace
def test_a_negative_offset_within_the_uptime_turns_the_clocks_back() -> None:
    back = int(min(time.monotonic(), host_uptime()) / 2)
    if back < 2:
        pytest.skip("the host has been up for less than 4 seconds")
    with Box(clock={"monotonic": f"-{back}s", "boottime": -back}) as box:
        monotonic, boottime, _ = box_clocks(box)
    assert abs(monotonic + back) < min(SLACK, back)
    assert abs(boottime + back) < min(SLACK, back)


@needs_time_namespace
@pytest.mark.parametrize("clock", ["monotonic", "boottime"])
def test_a_negative_offset_beyond_the_uptime_is_a_clear_error_and_leaves_nothing(clock: str) -> None:
    back = int(max(time.monotonic(), host_uptime())) + 10 * DAY
    box = Box(clock={clock: f"-{back}s"})
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        box.start()
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert f"box {box.id}: clock: the kernel refuses a {clock} offset of -{back} seconds" in message
    assert f"below zero; the host's {clock} clock (its uptime) reads" in message
    assert "give a negative offset of less than" in message
    assert box.pid is None and not box.running
    # The helper made nothing for it, and makes the next box as before.
    with Box() as plain:
        assert abs(box_uptime(plain) - host_uptime()) < SLACK


def test_bad_values_are_refused_at_once() -> None:
    with pytest.raises(ConfigError, match=r"Box\(\): clock: unknown clock 'realtime'"):
        Box(clock={"realtime": "+1d"})
    with pytest.raises(ConfigError, match=r"expected an offset like '\+400d'"):
        Box(clock={"monotonic": "a year"})
    with pytest.raises(ArgumentTypeError, match=r"expected a dict like"):
        Box(clock="+400d")  # type: ignore[arg-type]


@needs_time_namespace
def test_restart_keeps_the_offsets() -> None:
    with Box(clock={"monotonic": "+400d", "boottime": "+400d"}) as box:
        first = box.pid
        box.restart()
        assert box.pid != first
        assert box_uptime(box) >= OFFSET
        monotonic, _, _ = box_clocks(box)
        assert abs(monotonic - OFFSET) < SLACK


@needs_time_namespace
def test_a_bridged_box_with_offsets_has_its_network() -> None:
    with Box(network="bridge", clock={"boottime": "+400d"}) as box:
        assert box_uptime(box) >= OFFSET
        assert box.ip is not None
        assert box.run("cat /sys/class/net/eth0/operstate", check=True).stdout.strip() == "up"


@pytest.mark.skipif(probe.has_time_namespace(), reason="this kernel has time namespaces")
def test_this_kernel_without_time_namespaces_refuses_a_clock_box_and_still_makes_plain_ones() -> None:
    box = Box(clock={"monotonic": "+400d"})
    with pytest.raises(HostUnsupportedError, match=r"clock= needs time namespaces"):
        box.start()
    assert box.pid is None and not box.running
    with Box() as plain:
        assert plain.run("true").returncode == 0


def test_a_kernel_without_time_namespaces_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "has_time_namespace", lambda: False)  # as a kernel without them says
    box = Box(clock={"boottime": "+1d"})
    with pytest.raises(
        HostUnsupportedError, match=r"clock= needs time namespaces \(Linux 5.6, CONFIG_TIME_NS\)"
    ):
        box.start()
    assert box.pid is None
    assert not probe._check_time_namespace().ok
