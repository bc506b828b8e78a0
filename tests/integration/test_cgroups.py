"""Resource caps on cgroup v1 or v2 (whichever this host has): limits, stats, OOM, teardown."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from pytest_nsbox import Box, CgroupError, ConfigError, report
from pytest_nsbox.cgroups import driver, unavailable

pytestmark = pytest.mark.requires("boxes")

needs_cgroups = pytest.mark.skipif(driver() is None, reason=unavailable())


@needs_cgroups
def test_pids_limit_makes_fork_fail_with_eagain(nsbox: Box, cgroup_limit) -> None:
    cgroup_limit(pids=3)
    result = nsbox.run(["bash", "-c", "for i in 1 2 3 4 5; do sleep 5 & done; wait"], timeout=120)
    assert "Resource temporarily unavailable" in result.stderr
    assert 0 < nsbox.cgroup.stats().pids_peak <= 3


@needs_cgroups
@pytest.mark.nsbox(limits={"pids": 50})
def test_a_fork_bomb_is_capped_and_stop_is_prompt(nsbox: Box) -> None:
    nsbox.spawn(["bash", "-c", ":(){ :|:& };:"])
    deadline = time.monotonic() + 30
    while nsbox.cgroup.stats().pids_current < 45 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert nsbox.cgroup.stats().pids_peak <= 50
    assert subprocess.run(["true"], timeout=30).returncode == 0  # the host can still fork
    started = time.monotonic()
    nsbox.stop()
    assert time.monotonic() - started < 10, "stop() must not hang on a fork bomb (generous bound)"
    assert not any(path.exists() for path in nsbox.cgroup.dirs) or _eventually_gone(nsbox)


def _eventually_gone(box: Box) -> bool:
    from pytest_nsbox.cgroups import flush_pending

    flush_pending(wait=5)
    return not any(path.exists() for path in box.cgroup.dirs)


@needs_cgroups
@pytest.mark.nsbox(limits={"memory": "48M"})
def test_memory_cap_oom_kills_and_says_so(nsbox: Box) -> None:
    hog = "import time; chunks = [bytearray(1 << 20) for _ in range(300)]; time.sleep(1); print('survived')"
    result = nsbox.run(["python3", "-c", hog], timeout=120)
    assert result.returncode == -9 and result.signal == 9
    assert result.oom_killed is True
    stats = nsbox.cgroup.stats()
    assert stats.oom_kills >= 1
    assert 24 << 20 <= stats.memory_peak <= 52 << 20, stats


@needs_cgroups
@pytest.mark.nsbox(limits={"memory": "48M"})
def test_a_spawned_process_says_it_was_oom_killed_and_the_report_too(nsbox: Box) -> None:
    hog = nsbox.spawn(["python3", "-c", "chunks = [bytearray(1 << 20) for _ in range(300)]"])
    sleeper = nsbox.spawn(["sleep", "100"])
    result = hog.result()
    assert (result.returncode, result.oom_killed) == (-9, True)
    assert nsbox.cgroup.stats().oom_kills == 1
    assert sleeper.kill() and sleeper.result().oom_killed is False  # killed after the OOM, not by it
    commands = report.describe(nsbox)
    assert "-> OOM-killed after" in commands, commands
    assert "killed by SIGKILL" in commands  # the sleeper, which was killed by hand


@needs_cgroups
def test_a_process_that_fits_is_not_oom_killed(nsbox_factory) -> None:
    box = nsbox_factory(limits={"memory": "64M"})
    result = box.run(["python3", "-c", "x = bytearray(8 << 20); print(len(x))"], timeout=60)
    assert result.returncode == 0 and result.oom_killed is False
    killed = box.run("kill -9 $$")
    assert killed.signal == 9 and killed.oom_killed is False  # SIGKILL alone is not an OOM


@needs_cgroups
@pytest.mark.nsbox(limits={"memory": "64M"})  # and no swap: nothing the holder has can be reclaimed
def test_a_memory_cap_below_what_the_box_holds_is_refused_with_its_usage(nsbox: Box) -> None:
    holder = nsbox.spawn(
        [
            "python3",
            "-c",
            "x = bytearray(24 << 20); print('holding', flush=True); import time; time.sleep(300)",
        ]
    )
    holder.wait_for_output("holding", timeout=30)
    with pytest.raises(CgroupError) as refused:
        nsbox.cgroup.set(memory="1M")
    message = str(refused.value)
    assert message.startswith("limit 'memory': cannot lower to 1.0 MiB: the box uses "), message
    used = float(message.split("the box uses ", 1)[1].split(" MiB", 1)[0])
    assert 24 <= used <= 64, message
    assert "free memory in the box first" in message
    # Nothing changed: the holder lives, and the old cap still holds (swap still off with it).
    assert holder.poll() is None and nsbox.cgroup.stats().oom_kills == 0
    for directory in nsbox.cgroup.dirs:  # v1: the swap cap, lifted for the attempt, is back
        memsw = directory / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            assert int(memsw.read_text()) == 64 << 20
    assert nsbox.run(["python3", "-c", "x = bytearray(100 << 20)"], timeout=60).oom_killed
    assert holder.poll() is None
    nsbox.cgroup.set(memory="48M")  # above what it holds: fine


@needs_cgroups
@pytest.mark.nsbox(limits={"cpus": 0.2})
def test_cpu_quota_throttles(nsbox: Box) -> None:
    before = nsbox.cgroup.stats()
    nsbox.run(["timeout", "2", "sh", "-c", "while :; do :; done"], timeout=60)
    after = nsbox.cgroup.stats()
    used = (after.cpu_usec - before.cpu_usec) / 1e6
    assert 0.2 <= used <= 0.8, f"2 s at 0.2 CPU should use about 0.4 s of CPU, used {used:.2f} s"
    assert after.throttled_usec > before.throttled_usec


@needs_cgroups
def test_the_box_sees_its_own_cgroup_as_root(nsbox: Box) -> None:
    lines = nsbox.run("cat /proc/self/cgroup").stdout.splitlines()
    assert lines and all(line.endswith(":/") for line in lines), lines


@needs_cgroups
def test_every_box_has_its_own_cgroup_removed_at_stop(nsbox_factory) -> None:
    first, second = nsbox_factory(), nsbox_factory()
    assert first.cgroup.dirs and set(first.cgroup.dirs).isdisjoint(second.cgroup.dirs)
    assert {d.name for d in first.cgroup.dirs} == {first.cgroup.name} and first.cgroup.name.startswith("nsb-")
    first.run("sleep 0.1 & sleep 0.1 & wait")
    assert first.cgroup.stats().pids_peak >= 3
    assert second.cgroup.stats().pids_current == 1  # only its init
    first.stop()
    assert _eventually_gone(first)


@needs_cgroups
def test_limits_change_while_running_and_for_another_box(nsbox: Box, nsbox_factory, cgroup_limit) -> None:
    other = nsbox_factory()
    cgroup_limit(box=other, pids=2)
    assert "Resource temporarily unavailable" in other.run(["bash", "-c", "sleep 1 & sleep 1 & wait"]).stderr
    assert nsbox.run(["bash", "-c", "sleep 0.1 & sleep 0.1 & wait"]).stderr == ""
    other.cgroup.set(pids=None)  # lifted
    assert other.run(["bash", "-c", "sleep 0.1 & sleep 0.1 & wait"]).stderr == ""


@needs_cgroups
def test_cpuset_pins_the_box(nsbox: Box, cgroup_limit) -> None:
    try:
        cgroup_limit(cpuset="0")
    except CgroupError as exc:
        pytest.skip(f"no cpuset controller here: {exc}")
    assert nsbox.run("grep Cpus_allowed_list /proc/self/status").stdout.split()[-1] == "0"


@needs_cgroups
def test_io_weight_is_applied_where_the_kernel_has_a_weight(nsbox: Box) -> None:
    try:
        nsbox.cgroup.set(io_weight=500)
    except CgroupError as exc:
        assert "io_weight" in str(exc)  # said clearly where the host has no weight knob
        return
    weights = [p for d in nsbox.cgroup.dirs for p in d.iterdir() if p.name.endswith("weight")]
    assert weights and any("500" in p.read_text() for p in weights)


def test_bad_limits_are_refused_before_the_box_starts() -> None:
    with pytest.raises(ConfigError, match=r"limits: pids=-1: expected a whole number of processes"):
        Box(limits={"pids": -1})
    with pytest.raises(ConfigError, match="unknown limit 'ram'"):
        Box(limits={"ram": "1G"})


def test_bad_limits_at_run_time_name_the_limit(nsbox: Box) -> None:
    with pytest.raises(ConfigError, match=r"memory='a lot'"):
        nsbox.cgroup.set(memory="a lot")


@needs_cgroups
def test_limits_do_not_touch_the_host(nsbox: Box, cgroup_limit) -> None:
    cgroup_limit(pids=5, memory="32M", cpus=0.5)
    own = open("/proc/self/cgroup").read()
    assert "nsb-" not in own
    assert os.getpid() not in [p.pid for p in nsbox.processes()]


@needs_cgroups
# 16M: below about 12M, the OOM killer may weigh the init's resident pages (most of them
# shared with the helper) above a small command's, and the box dies with it (see README).
@pytest.mark.nsbox(limits={"memory": "16M"})
def test_a_tiny_memory_cap_kills_the_command_not_the_box(nsbox: Box) -> None:
    result = nsbox.run(["sh", "-c", "x=$(head -c 40000000 /dev/zero | tr '\\0' a); echo ${#x}"], timeout=60)
    assert result.returncode != 0
    assert nsbox.run("echo alive").stdout == "alive\n"  # init was not the OOM killer's choice


@needs_cgroups
@pytest.mark.nsbox(limits={"memory": "32M"})
def test_oom_through_a_shell_is_still_reported(nsbox: Box) -> None:
    result = nsbox.run("python3 -c 'x = bytearray(200 << 20)'; exit $?", timeout=60)
    assert result.returncode == 137 and result.oom_killed is True


def test_sigterm_to_init_from_inside_is_ignored(nsbox: Box) -> None:
    assert nsbox.run("kill -TERM 1; sleep 0.2; echo alive").stdout == "alive\n"
    assert nsbox.run("echo still").stdout == "still\n"


@needs_cgroups
def test_limits_cannot_be_set_once_the_box_stopped(nsbox_factory) -> None:
    box = nsbox_factory()
    box.stop()
    with pytest.raises(CgroupError, match="stopped box"):
        box.cgroup.set(cpus=0.5)
    assert _eventually_gone(box)


def test_a_box_cgroup_made_in_a_parent_remade_without_controllers_gets_them() -> None:
    """Another process removed the shared v2 parent with its last box and a third remade it,
    not yet delegating: the helper enables the controllers before it makes a box cgroup there
    (before, such a box had no pids.max, and its limit write failed)."""
    from pytest_nsbox.cgroups import v2
    from pytest_nsbox.zygote_process import Plan

    cgroup = driver()
    if cgroup is None or cgroup.version != "v2":
        pytest.skip("cgroup v2 only: v1 hierarchies have no subtree_control")
    cgroup._prepare()  # our nest delegates, as it does once a box was made
    nest = cgroup.nest
    if "pids" not in (nest / "cgroup.subtree_control").read_text().split():
        pytest.skip(f"{nest} does not delegate pids here")
    parent = nest / f"nsbox-test-parent-{os.getpid()}"
    parent.mkdir()
    try:
        assert "pids" not in (parent / "cgroup.subtree_control").read_text().split()
        plan = Plan({"make": [str(parent)], "remove": [str(parent)], "delegate": ["pids"]})
        made = plan.make_cgroup("nsb-racetest")
        assert made == [str(parent / "nsb-racetest")]
        assert (parent / "nsb-racetest" / "pids.max").exists()
        v2.write(parent / "nsb-racetest" / "pids.max", "7", "pids")
        assert (parent / "nsb-racetest" / "pids.max").read_text().strip() == "7"
        assert plan.remove_cgroup("nsb-racetest")
    finally:
        if (parent / "nsb-racetest").exists():
            (parent / "nsb-racetest").rmdir()
        parent.rmdir()


@needs_cgroups
def test_limits_hold_in_a_box_of_a_new_helper_after_the_old_one_took_the_parent_along() -> None:
    """A helper removes the shared parent cgroup as it ends (when no box is left in it); the
    next helper's boxes must still get every controller (before, on v2, they got none, and a
    pids limit failed to be written)."""
    from pytest_nsbox import zygote

    with Box():
        pass
    zygote.shutdown()
    with Box(limits={"pids": 20}) as box:
        assert box.cgroup.dirs
        assert box.cgroup.dirs[0].joinpath("pids.max").read_text().strip() == "20"
        result = box.run("for i in $(seq 30); do sleep 5 & done; wait", timeout=60)
        assert result.returncode != 0 or "fork" in result.stderr.lower()
        assert box.cgroup.stats().pids_peak <= 20
