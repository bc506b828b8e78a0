"""The sweeper (`nsbox gc`, and a session's first box): what killed runs left goes, what is not ours stays."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cleanup import rmdir_when_empty

from pytest_nsbox.cli import main as nsbox_cli
from pytest_nsbox.network import bridge, netns, pool, reclaim

pytestmark = pytest.mark.requires("boxes")


def _exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _add_bridge(name: str, alias: str | None) -> None:
    with netns.host() as ipr:
        ipr.link("add", ifname=name, kind="bridge")
        if alias is not None:
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], ifalias=alias)


def _delete_if_there(name: str) -> None:
    with netns.host() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])


def test_gc_deletes_our_orphaned_bridges_and_leaves_foreign_ones(capsys: pytest.CaptureFixture[str]) -> None:
    foreign = "nsbp" + os.urandom(4).hex()[:8]
    orphan = ""
    try:
        _add_bridge(foreign, "somebody else's")  # our prefix, but not our mark
        # Other pytest-nsbox processes on this host (xdist workers, sessions that tests start)
        # sweep too, and may take the orphan first: then make another one.
        for _attempt in range(5):
            orphan = "nsbp" + os.urandom(4).hex()[:8]
            _add_bridge(orphan, f"{bridge.MARK} private 10.213.0.0/16")  # ours, in no state: lost
            assert nsbox_cli(["gc", "--dry-run"]) == 0
            out = capsys.readouterr().out
            if _exists(orphan):
                break
        assert f"would remove: bridge {orphan} (nobody uses it)" in out
        assert foreign not in out
        assert nsbox_cli(["gc"]) == 0
        assert not _exists(orphan)
        assert _exists(foreign), "a bridge without our mark was deleted"
        assert foreign not in capsys.readouterr().out
    finally:
        if orphan:
            _delete_if_there(orphan)
        _delete_if_there(foreign)


def test_a_killed_owners_lease_and_shared_bridge_are_reclaimed(tmp_path: Path) -> None:
    subnet = ipaddress.IPv4Network("10.215.0.0/16")  # its own pool: no other box shares the bridge
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from pytest_nsbox import Box
            box = Box(network="bridge", subnet="{subnet}").start()
            print(box.ip, box.network.host_interface, *box.cgroup.dirs, flush=True)
            time.sleep(1000)
            """
        )
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        address, interface, *cgroup_dirs = owner.stdout.readline().split()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    try:
        shared = bridge.shared_name(subnet)
        reclaim.sweep()  # (another pytest-nsbox process on this host may sweep first: same result)
        assert not _exists(shared)
        with pool.locked(subnet) as entry:
            assert address not in entry.entry["leases"]
            assert not entry.entry["users"]
        deadline = time.monotonic() + 10
        while _exists(interface) and time.monotonic() < deadline:
            time.sleep(0.05)  # the veth goes with the dead box's network namespace
        assert not _exists(interface)
    finally:
        for directory in cgroup_dirs:  # a SIGKILLed owner cannot remove its box's cgroup
            rmdir_when_empty(directory)


def test_a_host_interface_name_that_exists_is_not_taken_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """The box helper draws the host end's name of a waiting box's veth: a name that exists
    is drawn again, and the interface that has it is left alone."""
    from pytest_nsbox import Box, zygote_process

    fixed = bytes(6)
    squatter = zygote_process.VETH_PREFIX + fixed.hex()[:11]
    draws = iter([fixed])
    real_urandom = os.urandom
    monkeypatch.setattr(zygote_process.os, "urandom", lambda n: next(draws, None) or real_urandom(n))
    with netns.host() as ipr:
        ipr.link("add", ifname=squatter, kind="bridge")  # any kind will do; this kernel has no dummy
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare --net did not take effect"
            time.sleep(0.01)
        name, index = zygote_process._make_veth(holder.pid)
        assert name != squatter and name.startswith(zygote_process.VETH_PREFIX)
        assert _exists(name) and index > 0
        assert _exists(squatter), "the other interface was touched"
        with Box(network="bridge") as box:  # and boxes still come up with theirs
            assert box.run(["cat", "/sys/class/net/eth0/operstate"]).stdout.strip() == "up"
    finally:
        holder.kill()
        holder.wait()
        _delete_if_there(squatter)


def test_gc_removes_an_empty_box_cgroup_left_by_a_killed_helper() -> None:
    from pytest_nsbox import cgroups, reaper

    backend = cgroups.driver()
    if backend is None:
        pytest.skip("this host has no usable cgroups")
    from pytest_nsbox.zygote_process import Plan

    def make() -> list[Path]:  # as the box helper makes a box's cgroup
        return [
            Path(p)
            for p in Plan(backend.helper_plan()).make_cgroup(cgroups.NAME_PREFIX + "gc" + os.urandom(3).hex())
        ]

    fresh = make()
    stale = make()
    try:
        old = time.time() - reaper.EMPTY_CGROUP_AGE - 60
        for directory in stale:
            os.utime(directory, (old, old))  # as if its helper had died a while ago
        assert nsbox_cli(["gc"]) == 0
        assert not any(d.exists() for d in stale)  # by us, or by another process's sweep
        assert all(d.exists() for d in fresh), "a cgroup made a moment ago was taken"
    finally:
        backend.remove(fresh)
        backend.remove(stale)


def _listed(output: str) -> tuple[list[str], str]:
    """What ``nsbox gc`` printed it removes (or would), without the verb; and its last line."""
    lines = output.strip().splitlines()
    items = [line.split(": ", 1)[1] for line in lines if line.startswith(("would remove: ", "removed: "))]
    return items, lines[-1]


def test_gc_dry_run_lists_what_gc_removes_a_kept_box_its_lease_and_its_bridge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ending a kept box frees its lease, and then its bridge: the dry run counts them too."""
    subnet = ipaddress.IPv4Network("10.217.0.0/16")  # its own pool: no other box shares the bridge
    script = tmp_path / "keeper.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from pytest_nsbox import Box
            box = Box(hostname="gc-dry", network="bridge", subnet="{subnet}").start()
            box.keep("test_gc.py::the_keeper")
            print(box.id, box.ip, box.pid, flush=True)
            """
        )
    )
    keeper = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert keeper.returncode == 0, keeper.stderr
    box_id, address, pid = keeper.stdout.split()
    shared = bridge.shared_name(subnet)
    ours = (box_id, address, shared)
    try:
        assert _exists(shared)
        assert nsbox_cli(["gc", "--dry-run"]) == 0
        would, would_summary = _listed(capsys.readouterr().out)
        assert _exists(shared) and os.path.exists(f"/proc/{pid}"), "the dry run removed something"
    finally:
        assert nsbox_cli(["gc"]) == 0
        removed, removed_summary = _listed(capsys.readouterr().out)
    assert [item for item in would if any(name in item for name in ours)] == [
        f"kept box {box_id} (gc-dry, init pid {pid}, from test_gc.py::the_keeper)",
        f"IP lease {address} of box {box_id} (held by pid {pid})",
        f"bridge {shared} (nobody uses it)",
    ]
    # Other runs on this host may leave (or take) leftovers of their own meanwhile: compare ours.
    assert [item for item in removed if any(name in item for name in ours)] == [
        item for item in would if any(name in item for name in ours)
    ]
    assert would_summary == f"{len(would)} leftovers would be removed"
    assert removed_summary == f"removed {len(removed)} leftovers"
    assert not _exists(shared)
