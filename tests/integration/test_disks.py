"""Disks (``disks=``): a real filesystem on a loop device in the box, and I/O caps on it.

Every test does real I/O on a real filesystem: the full disk, the inode shortage, ``df``,
``fsync`` across a restart, a read-only switch, the block device's counters and a bandwidth
cap, and that no loop device outlives its box (after a stop, and after its owner's SIGKILL).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cleanup import box_loop_devices, eventually, rmdir_when_empty

from pytest_nsbox import Box, ConfigError, Disk, loop
from pytest_nsbox.spec import mkfs_program

pytestmark = pytest.mark.requires("boxes")


def test_df_shows_the_size_and_a_full_disk_gives_enospc() -> None:
    with Box(disks={"/data": "16M"}) as box:
        disk = box.disk("/data")
        assert isinstance(disk, Disk) and disk.fs == "ext4" and disk.size == 16 << 20
        assert disk.loop_device is not None and disk.loop_device.startswith("/dev/loop")
        if disk.dm_name is None:  # no device-mapper here: the filesystem is on the loop device
            assert disk.device == disk.loop_device
        else:
            assert disk.device is not None and disk.device.startswith("/dev/dm-")
        mounts = box.run("cat /proc/mounts", check=True).stdout
        line = next(line for line in mounts.splitlines() if line.split()[1] == "/data")
        assert line.split()[0] == disk.device and line.split()[2] == "ext4"
        assert {"nodev", "nosuid"} <= set(line.split()[3].split(","))
        blocks = int(box.run("df -k --output=size /data | tail -1", check=True).stdout)
        assert 12 * 1024 <= blocks <= 16 * 1024  # the filesystem's own metadata takes some
        full = box.run("dd if=/dev/zero of=/data/big bs=1M count=64 2>&1; sync")
        assert "No space left on device" in full.stdout
        written = int(box.run("stat -c %s /data/big", check=True).stdout)
        assert 8 << 20 < written < 16 << 20


def test_running_out_of_inodes_gives_enospc_with_space_left() -> None:
    with Box(disks={"/data": {"size": "16M", "fs": "ext4", "inodes": 64}}) as box:
        result = box.run("i=0; while touch /data/f$i 2>/dev/null; do i=$((i+1)); done; echo $i; df -i /data")
        made = int(result.stdout.split()[0])
        assert 40 < made <= 64, result.stdout  # the root, lost+found and reserved inodes count
        error = box.run("touch /data/one-more")
        assert "No space left on device" in error.stderr
        assert int(box.run("df -k --output=avail /data | tail -1").stdout) > 1024  # blocks were left


def test_fsynced_data_survives_a_restart() -> None:
    with Box(disks={"/data": "16M"}) as box:
        device = box.disk("/data").device
        box.run("echo precious > /data/record && sync /data/record", check=True)
        box.restart()
        assert box.read_text("/data/record") == "precious\n"
        assert box.disk("/data").device == device  # the same loop device, kept over the cut
        assert "/data" in box.run("cat /proc/mounts", check=True).stdout


def test_a_new_box_given_the_disk_sees_its_contents() -> None:
    with Box(disks={"/data": "16M"}) as first:
        first.run("echo kept > /data/file && sync /data/file", check=True)
        disk = first.disk("/data")
        with pytest.raises(ConfigError, match="held by box"):
            Box(disks={"/data": disk}).start()
    assert disk.device is None
    with Box(disks={"/var/lib/app": disk}) as second:
        assert second.read_text("/var/lib/app/file") == "kept\n"
        assert second.disk("/var/lib/app") is disk


def test_readonly_gives_erofs_until_writable() -> None:
    with Box(disks={"/data": "16M"}) as box:
        disk = box.disk("/data")
        disk.readonly()
        refused = box.run("echo x > /data/file")
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr
        disk.writable()
        box.run("echo x > /data/file", check=True)
        assert box.read_text("/data/file") == "x\n"


def test_stats_count_the_disk_and_the_cgroup_io() -> None:
    with Box(disks={"/data": "32M"}) as box:
        disk = box.disk("/data")
        before = disk.stats()
        cgroup_before = box.cgroup.stats()
        box.run("dd if=/dev/urandom of=/data/f bs=1M count=4 oflag=direct 2>&1", check=True)
        after = disk.stats()
        assert after.write_bytes - before.write_bytes >= 4 << 20
        assert after.write_ops > before.write_ops
        cgroup_after = box.cgroup.stats()
        assert cgroup_after.io_write_bytes - cgroup_before.io_write_bytes >= 4 << 20
        assert cgroup_after.io_write_ops > cgroup_before.io_write_ops
        box.run("dd if=/data/f of=/dev/null bs=1M iflag=direct 2>&1", check=True)
        assert disk.stats().read_bytes - after.read_bytes >= 4 << 20
        assert box.cgroup.stats().io_read_bytes - cgroup_after.io_read_bytes >= 4 << 20


def test_a_write_cap_slows_direct_writes_to_its_rate() -> None:
    with Box(disks={"/data": "32M"}, limits={"io_write_bps": "2M"}) as box:
        began = time.monotonic()
        box.run("dd if=/dev/zero of=/data/f bs=1M count=6 oflag=direct 2>&1", check=True, timeout=60)
        assert time.monotonic() - began >= 2.0  # 6 MiB at 2 MiB/s: 3 s (lower bound only)
        box.cgroup.set(io_write_bps=None)  # lifted: the same writes go at the disk's speed
        box.run("dd if=/dev/zero of=/data/g bs=1M count=6 oflag=direct 2>&1", check=True, timeout=60)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"disks": {"data": "16M"}}, "must be an absolute path"),
        ({"disks": {"/": "16M"}}, "cannot mount a disk on '/'"),
        ({"disks": {"/a/../b": "16M"}}, "holds '..'"),
        ({"disks": {"/proc/x": "16M"}}, "cannot mount a disk"),
        ({"disks": {"/data": "lots"}}, "expected a size like 64M"),
        ({"disks": {"/data": {"size": "16M", "fs": "vfat"}}}, "'vfat' is not one of ext4, xfs, btrfs"),
        ({"disks": {"/data": {"size": "16M", "inodes": 0}}}, "inodes: expected a whole number"),
        ({"disks": {"/data": {"size": "16M", "options": "dev"}}}, "always nodev,nosuid"),
        ({"disks": {"/data": {"size": "16M", "options": "a b"}}}, "is not a mount option"),
        ({"disks": {"/data": {"fs": "ext4"}}}, "the size is missing"),
        ({"disks": {"/data": {"size": "16M", "colour": 1}}}, "unknown key"),
        ({"disks": {"/data": "16M"}, "tmpfs": {"/data": "1M"}}, "one mount per path"),
        ({"limits": {"io_write_bps": "2M"}}, "cap the I/O of the box's disks"),
        ({"disks": {"/data": "16M"}, "limits": {"io_read_iops": 0}}, "operations per second"),
        ({"disks": {"/data": "9" * 400 + "G"}}, "larger than any size"),
        ({"disks": {"/data": 2**70}}, "larger than any size"),
        ({"disks": {"/data": "1T"}}, "more than a test disk may be"),
        ({"disks": {"/data": "16M"}, "limits": {"io_read_bps": "9" * 400}}, "larger than any size"),
    ],
)
def test_bad_disks_are_refused_at_once_leaving_nothing(options: dict[str, object], message: str) -> None:
    before = box_loop_devices()
    with pytest.raises(ConfigError, match=message):
        Box(**options)  # type: ignore[arg-type]
    assert box_loop_devices() == before


@pytest.mark.parametrize(("fs", "package"), [("xfs", "xfsprogs"), ("btrfs", "btrfs-progs")])
def test_other_filesystems_or_the_package_to_install(fs: str, package: str) -> None:
    options = {"/data": {"size": "320M", "fs": fs}}
    if mkfs_program(fs) is None:
        with pytest.raises(ConfigError, match=f"apt-get install {package}"):
            Box(disks=options)
        return
    with Box(disks=options) as box:
        assert box.run("stat -f -c %T /data", check=True).stdout.strip() in (fs, "btrfs", "xfs")


def test_no_loop_device_is_left_after_stop() -> None:
    box = Box(disks={"/a": "16M", "/b": "16M"}).start()
    numbers = [int(box.disk(path).loop_device[len("/dev/loop") :]) for path in ("/a", "/b")]  # type: ignore[index]
    assert all(number in box_loop_devices() for number in numbers)
    box.stop()
    assert not set(numbers) & set(box_loop_devices())


def test_no_loop_device_is_left_after_the_owner_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            from pytest_nsbox import Box
            box = Box(disks={"/data": "16M"}).start()
            box.run("echo x > /data/f && sync", check=True)
            print(box.disk("/data").loop_device, *box.cgroup.dirs, flush=True)
            time.sleep(1000)
            """
        )
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    cgroup_dirs: list[str] = []
    try:
        assert owner.stdout is not None
        device, *cgroup_dirs = owner.stdout.readline().split()
        number = int(device[len("/dev/loop") :])
        assert number in box_loop_devices()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    try:
        assert eventually(lambda: loop.backing_file(number) is None, 15), "the loop device outlived its owner"
    finally:
        for directory in cgroup_dirs:  # a SIGKILLed owner cannot remove its box's cgroup
            rmdir_when_empty(directory)


def test_access_time_options_are_mount_attributes_and_fs_options_reach_the_filesystem() -> None:
    options = {"size": "16M", "options": "noatime,data=journal"}
    with Box(disks={"/data": options}) as box:
        mounts = box.run(["cat", "/proc/self/mounts"], check=True).stdout
        line = next(line for line in mounts.splitlines() if line.split()[1] == "/data")
        flags = line.split()[3].split(",")
        assert "noatime" in flags and "data=journal" in flags and "nodev" in flags, line
        box.run(["sh", "-c", "echo x > /data/f && sync"], check=True)


def test_two_boxes_started_at_once_on_one_disk_get_it_one_at_a_time() -> None:
    """A filesystem is mounted by one box at a time: of two threads starting boxes on the same
    Disk, one gets it and the other a ConfigError naming the holder; once the first stops,
    the disk is free again."""
    import threading

    with Box(disks={"/data": "16M"}) as first:
        first.run("echo one > /data/f && sync", check=True)
        disk = first.disk("/data")
    results: list[object] = []
    gate = threading.Barrier(2)

    def start() -> None:
        box = Box(disks={"/data": disk})
        gate.wait()
        try:
            results.append(box.start())
        except ConfigError as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    started = [result for result in results if isinstance(result, Box)]
    refused = [result for result in results if isinstance(result, ConfigError)]
    try:
        assert len(started) == 1 and len(refused) == 1, results
        assert f"held by box {started[0].id}" in str(refused[0])
        assert started[0].read_text("/data/f") == "one\n"
    finally:
        for box in started:
            box.stop()
    with Box(disks={"/data": disk}) as again:
        assert again.read_text("/data/f") == "one\n"
