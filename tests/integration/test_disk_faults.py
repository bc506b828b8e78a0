"""Disk faults (device-mapper under a box's disk): EIO, added latency, a flaky disk, healing,
a power cut that keeps what was synced and loses what was not, and no device left behind.

Every test does real I/O in the box. Where the kernel has no device-mapper they skip, naming
what is missing; in the test guest (tests/vm, which loads dm-mod, dm-flakey and dm-delay) a
missing device-mapper fails them instead: there they must run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cleanup import box_dm_devices, eventually, rmdir_when_empty

from pytest_nsbox import Box, BoxError, ConfigError, HostUnsupportedError, devmapper, loop, reaper, state

pytestmark = pytest.mark.requires("boxes")

MISSING = devmapper.unavailable()
# A direct 4 KiB read of a fresh part of the file (the page cache cannot answer it).
READ_4K = "dd if=/data/f of=/dev/null bs=4k count=1 skip={block} iflag=direct 2>&1"
WRITE_SYNC = "echo {text} >> /data/log && sync /data/log"


@pytest.fixture
def needs_devmapper() -> None:
    if MISSING is None:
        return
    if os.environ.get("NSBOX_IN_UML_GUEST"):
        pytest.fail(f"the test guest must have device-mapper: {MISSING}")
    pytest.skip(MISSING)


def _disk_box() -> Box:
    box = Box(disks={"/data": "16M"}).start()
    box.run("dd if=/dev/urandom of=/data/f bs=1M count=4 2>&1 && sync", check=True)
    return box


def test_fail_gives_eio_to_writes_and_reads_until_heal(needs_devmapper: None) -> None:
    with _disk_box() as box:
        disk = box.disk("/data")
        assert disk.dm_name is not None and disk.dm_name.startswith(devmapper.PREFIX)
        assert disk.fail() is disk
        write = box.run(WRITE_SYNC.format(text="lost"))
        assert write.returncode != 0 and "Input/output error" in write.stderr, write
        read = box.run(READ_4K.format(block=7))
        assert read.returncode != 0 and "Input/output error" in read.stdout, read
        disk.heal()
        box.run(READ_4K.format(block=9), check=True)


def test_slow_adds_its_delay_to_a_direct_read(needs_devmapper: None) -> None:
    with _disk_box() as box:
        disk = box.disk("/data")
        disk.slow(200)
        began = time.monotonic()
        box.run(READ_4K.format(block=11), check=True)
        assert time.monotonic() - began >= 0.15  # lower bound only
        disk.heal()
        box.run(READ_4K.format(block=13), check=True)


def test_flaky_fails_in_its_down_window_and_works_in_its_up_window(needs_devmapper: None) -> None:
    with _disk_box() as box:
        disk = box.disk("/data")
        disk.flaky(1, 1)  # up for a second from now, then down for one, and again
        outcomes: set[bool] = set()
        deadline = time.monotonic() + 20
        block = 16
        while outcomes != {True, False} and time.monotonic() < deadline:
            block += 1
            result = box.run(READ_4K.format(block=block))
            if result.returncode != 0:
                assert "Input/output error" in result.stdout, result
            outcomes.add(result.returncode == 0)
            time.sleep(0.1)
        assert outcomes == {True, False}, "reads did not both fail and succeed within 20 s"
        disk.heal()
        for offset in range(3):  # healed: no down window any more
            box.run(READ_4K.format(block=200 + offset), check=True)
            time.sleep(0.5)


def test_a_power_cut_keeps_synced_records_and_loses_the_rest(needs_devmapper: None) -> None:
    with Box(disks={"/data": "16M"}) as box:
        disk = box.disk("/data")
        box.run(WRITE_SYNC.format(text="A"), check=True)
        box.run("echo B >> /data/log && echo C > /data/unsynced", check=True)  # in the page cache only
        survivor = box.spawn("sleep 1000")
        assert box.read_text("/data/log") == "A\nB\n"
        assert disk.power_cut() is disk
        assert survivor.wait(timeout=5) != 0  # killed with the box
        assert box.read_text("/data/log") == "A\n"
        assert not box.exists("/data/unsynced")
        box.run(WRITE_SYNC.format(text="D"), check=True)  # the disk works after it
        assert box.read_text("/data/log") == "A\nD\n"
        assert box.disk("/data") is disk and disk.device is not None


def test_fault_arguments_are_checked_at_once() -> None:
    with Box(disks={"/data": "16M"}) as box:
        disk = box.disk("/data")
        with pytest.raises(ConfigError, match="slow\\(\\): ms: expected 0 to"):
            disk.slow(-1)
        with pytest.raises(ConfigError, match="whole number of milliseconds"):
            disk.slow(0.5)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="flaky\\(\\): down_s: expected 1 to"):
            disk.flaky(1, 0)


def test_without_devmapper_faults_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel has device-mapper, the box is made as on a kernel without it (its
    control device and module looked for where they are not): the disk works on its loop
    device, and each fault names what is missing."""
    if MISSING is None:
        monkeypatch.setattr(devmapper, "CONTROL", "/nonexistent/mapper/control")
        monkeypatch.setattr(devmapper, "MODULE_DIR", "/nonexistent/dm_mod")
    with Box(disks={"/data": "16M"}) as box:
        disk = box.disk("/data")
        assert disk.dm_name is None and disk.device == disk.loop_device
        for fault in (disk.fail, disk.heal, disk.power_cut, lambda: disk.slow(10)):
            with pytest.raises(
                HostUnsupportedError, match=r"no device-mapper.*modprobe dm-mod dm-flakey dm-delay"
            ):
                fault()
        box.run("echo still > /data/works", check=True)


def test_no_dm_device_is_left_after_stop(needs_devmapper: None) -> None:
    box = Box(disks={"/a": "16M", "/b": "16M"}).start()
    names = [box.disk(path).dm_name for path in ("/a", "/b")]
    assert set(names) <= set(box_dm_devices())
    box.disk("/a").fail()  # a faulty one goes too
    box.stop()
    assert eventually(lambda: not set(names) & set(box_dm_devices()), 10), box_dm_devices()
    assert box.disk("/a").dm_name is None


def test_no_dm_device_is_left_after_the_owner_is_killed(tmp_path: Path, needs_devmapper: None) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            from pytest_nsbox import Box
            box = Box(disks={"/data": "16M"}).start()
            box.run("echo x > /data/f && sync", check=True)
            box.disk("/data").slow(1)
            print(box.disk("/data").dm_name, box.disk("/data").loop_device, *box.cgroup.dirs, flush=True)
            time.sleep(1000)
            """
        )
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    cgroup_dirs: list[str] = []
    try:
        assert owner.stdout is not None
        name, device, *cgroup_dirs = owner.stdout.readline().split()
        assert name in box_dm_devices()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    try:
        reaper.sweep()  # what `nsbox gc` and each session's start run (gc would end kept boxes too)
        assert eventually(lambda: name not in box_dm_devices(), 15), "the dm device outlived its owner"
        number = int(device[len("/dev/loop") :])
        assert eventually(lambda: loop.backing_file(number) is None, 15), "the loop device outlived its owner"
    finally:
        for directory in cgroup_dirs:  # a SIGKILLed owner cannot remove its box's cgroup
            rmdir_when_empty(directory)


def test_gc_removes_a_dead_owners_device_and_keeps_a_live_ones(needs_devmapper: None) -> None:
    """A device no box holds and not marked for removal (as after a kill at the wrong moment):
    the sweep of ``nsbox gc`` removes it when its owner is dead, not while its owner lives."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_name = devmapper.device_name("test-dead", state.Owner(dead.pid, 1))
    live_name = devmapper.device_name("test-live")
    for name in (dead_name, live_name):
        devmapper.create(name, 8, "error", "")
    try:
        removed = reaper.sweep()  # what `nsbox gc` and each session's start run
        assert any(dead_name in line for line in removed), removed
        assert dead_name not in box_dm_devices()
        assert live_name in box_dm_devices()
    finally:
        for name in (dead_name, live_name):
            devmapper.remove(name)
    assert not {dead_name, live_name} & set(box_dm_devices())


def test_a_power_cut_that_cannot_cut_every_disk_leaves_the_box_running(
    needs_devmapper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second disk's table cannot be swapped (device-mapper refuses): no power cut, the
    first disk is whole again and the box is not left frozen."""
    with Box(disks={"/a": "16M", "/b": "16M"}) as box:
        pid = box.pid
        second = box.disk("/b")

        def refused() -> None:
            raise BoxError("device-mapper refused the table (injected)")

        monkeypatch.setattr(second, "cut", refused)
        with pytest.raises(BoxError, match="injected"):
            box.disk("/a").power_cut()
        monkeypatch.undo()
        assert box.pid == pid and not box.cgroup.is_frozen()
        result = box.run("echo ok > /a/f && sync /a/f && cat /a/f", timeout=20)
        assert result.stdout == "ok\n", result.stderr
