"""Device nodes: a default box opens only its own few, whatever nodes its image ships.

The image tests ship a block node that names a real loop device on the host, backed by a file
holding a secret: a default box can neither read nor write through it, a privileged box still
can (as before), and ``devices=[...]`` gives a box a host node on purpose. The cgroup guard
is checked on its own too, from a host process placed in a box's cgroup: the v1 devices
controller, and on cgroup v2 the eBPF device filter (also on a scratch cgroup of any mounted
v2 hierarchy, so that a hybrid v1 host runs it).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from imagebuilder import Device, Entry, ImageSpec, write_docker_save_legacy

from pytest_nsbox import Box
from pytest_nsbox.devices import ALLOWED, cgroup_rules, restrict_v2

pytestmark = pytest.mark.requires("boxes")

SECRET = b"HOSTSECRET"
DEVICES_ROOT = Path("/sys/fs/cgroup/devices")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A host loop device (its path) backed by a file (its path) that starts with ``SECRET``;
    detached again whatever the test did, so no loop device outlives it."""
    if not Path("/dev/loop-control").exists():
        pytest.skip("this host has no loop devices (/dev/loop-control)")
    backing = tmp_path / "backing.img"
    backing.write_bytes(SECRET + b"\n" + bytes(4096 - len(SECRET) - 1))
    found = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {found.stderr.strip()}")
    device = found.stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
        backing.unlink()


def _major_minor(path: str) -> tuple[int, int]:
    rdev = os.stat(path).st_rdev
    return os.major(rdev), os.minor(rdev)


@pytest.fixture
def disk_image(tmp_path: Path, shell_layer: list[Entry], loop_device: tuple[str, Path]) -> str:
    """An image whose second layer ships ``/srv/disk`` (the loop device's block node, mode 666)
    and ``/srv/null`` (a character node 1:3, the host's /dev/null)."""
    major, minor = _major_minor(loop_device[0])
    nodes: list[Entry] = [
        Device("srv/disk", "blk", major, minor, mode=0o666),
        Device("srv/null", "chr", 1, 3, mode=0o666),
    ]
    archive = write_docker_save_legacy(tmp_path / "disk.tar", [ImageSpec([shell_layer, nodes])])
    return str(archive)


def _devices_dir(box: Box) -> Path:
    found = [d for d in box.cgroup.dirs if DEVICES_ROOT in d.parents]
    if not found:
        pytest.skip("this host has no cgroup v1 devices controller")
    return found[0]


def test_a_default_box_cannot_read_or_write_a_host_disk_through_an_image_node(
    disk_image: str, image_cache: str, loop_device: tuple[str, Path]
) -> None:
    _, backing = loop_device
    with Box(image=disk_image, cache=image_cache) as box:
        assert box.run("stat -c '%F' /srv/disk", check=True).stdout == "block special file\n"
        read = box.run("cat /srv/disk")
        assert read.returncode != 0 and "Permission denied" in read.stderr
        assert SECRET.decode() not in read.stdout
        write = box.run("echo PWNED > /srv/disk")
        assert write.returncode != 0 and "Permission denied" in write.stderr
    assert backing.read_bytes().startswith(SECRET + b"\n")
    assert b"PWNED" not in backing.read_bytes()


def test_a_privileged_box_still_reads_the_host_disk(
    disk_image: str, image_cache: str, loop_device: tuple[str, Path]
) -> None:
    with Box(image=disk_image, cache=image_cache, privileged=True) as box:
        assert box.run("cat /srv/disk", check=True, text=False).stdout.startswith(SECRET)


def test_a_character_node_in_the_image_is_dead_but_the_boxs_own_dev_null_works(
    disk_image: str, image_cache: str
) -> None:
    with Box(image=disk_image, cache=image_cache) as box:
        shipped = box.run("echo x > /srv/null")
        assert shipped.returncode != 0 and "Permission denied" in shipped.stderr
        assert box.run("echo x > /dev/null && cat /dev/null", check=True).stdout == ""
        assert box.run("echo x > /dev/full").returncode != 0  # ENOSPC: the real /dev/full


def test_every_mount_of_a_default_box_is_nodev_but_its_own_dev(nsbox_factory: Callable[..., Box]) -> None:
    box = nsbox_factory(tmpfs={"/data": "1M"})
    honouring = []
    for line in box.run("cat /proc/self/mountinfo", check=True).stdout.splitlines():
        fields = line.split()
        mount_point, options, source = fields[4], fields[5].split(","), fields[3]
        if "nodev" in options:
            continue
        honouring.append(mount_point)
        # /dev/null bound over a masked /proc file comes from the box's /dev, as in Docker.
        if mount_point not in ("/dev", "/dev/pts"):
            assert source == "/null", line
    assert {"/dev", "/dev/pts"} <= set(honouring)
    assert all(m in ("/dev", "/dev/pts") or m.startswith("/proc/") for m in honouring), honouring


def test_the_boxs_dev_holds_only_its_own_nodes(nsbox: Box) -> None:
    listing = nsbox.run("ls /dev", check=True).stdout.split()
    own = "fd full mqueue null ptmx pts random shm stderr stdin stdout tty urandom zero"
    assert sorted(listing) == own.split()


def test_the_v1_devices_cgroup_allows_only_the_boxs_own_nodes(nsbox_factory: Callable[..., Box]) -> None:
    box = nsbox_factory()
    directory = _devices_dir(box)
    assert (directory / "devices.list").read_text().split("\n")[:-1] == list(ALLOWED)
    privileged = nsbox_factory(privileged=True)
    assert (_devices_dir(privileged) / "devices.list").read_text() == "a *:* rwm\n"


def _attempts_from(procs: Path, device: str, node: Path) -> list[str]:
    """A host process (all capabilities, host /dev without nodev) moved into the cgroup of
    ``procs`` tries to open ``device`` and /dev/null and to make a node at ``node``; what it is
    refused, the cgroup refused, not nodev or a missing capability. One line per attempt:
    ``what ok`` or ``what ERRNO``."""
    script = (
        "import os, sys\n"
        f"open({str(procs)!r}, 'w').write(str(os.getpid()))\n"
        "def attempt(what, call):\n"
        "    try:\n"
        "        call()\n"
        "        print(what, 'ok')\n"
        "    except OSError as exc:\n"
        "        print(what, exc.errno)\n"
        f"attempt('device', lambda: os.close(os.open({device!r}, os.O_RDONLY)))\n"
        "attempt('null', lambda: os.close(os.open('/dev/null', os.O_RDWR)))\n"
        f"attempt('mknod', lambda: os.mknod({str(node)!r}, 0o600 | 0o020000, os.makedev(1, 3)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    if node.exists():
        node.unlink()
    return out.splitlines()


REFUSED = [f"device {errno.EPERM}", "null ok", f"mknod {errno.EPERM}"]


def test_the_v1_devices_cgroup_alone_refuses_host_devices_and_mknod(
    nsbox_factory: Callable[..., Box],
    loop_device: tuple[str, Path],
    tmp_path: Path,
) -> None:
    box = nsbox_factory()
    assert _attempts_from(_devices_dir(box) / "cgroup.procs", loop_device[0], tmp_path / "node") == REFUSED
    assert not (tmp_path / "node").exists()


# A character device every Linux host has and no box's allowlist holds (1:11, 10:237, ...).
_OFF_LIST = ("/dev/kmsg", "/dev/loop-control", "/dev/mem")


@pytest.fixture
def off_list_device() -> str:
    """A host device node a default box may not use (opening it read-only as root works)."""
    for path in _OFF_LIST:
        if Path(path).exists() and stat.S_ISCHR(os.stat(path).st_mode):
            return path
    pytest.skip(f"this host has none of {', '.join(_OFF_LIST)}")


def _v2_mount() -> Path | None:
    """Where a cgroup v2 hierarchy is mounted (a hybrid v1 host has an empty one too)."""
    with open("/proc/self/mounts") as handle:
        for line in handle:
            fields = line.split()
            if fields[2] == "cgroup2":
                return Path(fields[1])
    return None


@pytest.fixture
def scratch_v2_cgroup() -> Iterator[Path]:
    """An empty cgroup of the host's v2 hierarchy, removed after the test."""
    mount = _v2_mount()
    if mount is None:
        pytest.skip("this host has no cgroup v2 hierarchy mounted")
    directory = mount / f"nsbox-test-filter-{os.getpid()}"
    directory.mkdir()
    try:
        yield directory
    finally:
        directory.rmdir()  # the processes moved in have exited; the program goes with it


def test_the_v2_device_filter_refuses_what_its_rules_do_not_list(
    scratch_v2_cgroup: Path, off_list_device: str, tmp_path: Path
) -> None:
    try:
        restrict_v2(str(scratch_v2_cgroup), cgroup_rules([]))
    except OSError as exc:
        pytest.skip(f"this kernel refuses the cgroup v2 device filter: {exc}")
    assert _attempts_from(scratch_v2_cgroup / "cgroup.procs", off_list_device, tmp_path / "node") == REFUSED


def test_the_v2_device_filter_allows_the_devices_a_box_names(
    scratch_v2_cgroup: Path, off_list_device: str, tmp_path: Path
) -> None:
    rdev = os.stat(off_list_device).st_rdev
    try:
        restrict_v2(
            str(scratch_v2_cgroup),
            cgroup_rules([[off_list_device, "c", os.major(rdev), os.minor(rdev), 0o600]]),
        )
    except OSError as exc:
        pytest.skip(f"this kernel refuses the cgroup v2 device filter: {exc}")
    node = tmp_path / "node"
    assert _attempts_from(scratch_v2_cgroup / "cgroup.procs", off_list_device, node) == [
        "device ok",
        "null ok",
        f"mknod {errno.EPERM}",  # 1:3 is listed rw, without m
    ]


def _v2_box_dir(box: Box) -> Path:
    if box.cgroup.version != "v2" or not box.cgroup.dirs:
        pytest.skip(f"this host's boxes use cgroup {box.cgroup.version}, not v2")
    return box.cgroup.dirs[0]


def test_a_v2_box_cgroup_refuses_host_devices_and_mknod(
    nsbox_factory: Callable[..., Box], off_list_device: str, tmp_path: Path
) -> None:
    procs = _v2_box_dir(nsbox_factory()) / "cgroup.procs"
    assert _attempts_from(procs, off_list_device, tmp_path / "node") == REFUSED


def test_a_v2_box_cgroup_lets_through_the_devices_a_box_names_and_a_privileged_box_all(
    nsbox_factory: Callable[..., Box], off_list_device: str, tmp_path: Path
) -> None:
    named = _v2_box_dir(nsbox_factory(devices=[off_list_device])) / "cgroup.procs"
    assert _attempts_from(named, off_list_device, tmp_path / "node")[:2] == ["device ok", "null ok"]
    privileged = _v2_box_dir(nsbox_factory(privileged=True)) / "cgroup.procs"
    assert _attempts_from(privileged, off_list_device, tmp_path / "node") == [
        "device ok",
        "null ok",
        "mknod ok",
    ]


def test_devices_gives_a_box_the_host_node_it_names(loop_device: tuple[str, Path]) -> None:
    device, _ = loop_device
    major, minor = _major_minor(device)
    extra = [device] + (["/dev/fuse"] if Path("/dev/fuse").exists() else [])
    with Box(devices=extra) as box:
        assert box.run(["stat", "-c", "%t:%T %F", device], check=True).stdout == (
            f"{major:x}:{minor:x} block special file\n"
        )
        assert box.run(["cat", device], check=True, text=False).stdout.startswith(SECRET)
        if "/dev/fuse" in extra:
            assert box.run("exec 3<>/dev/fuse && echo opened", check=True).stdout == "opened\n"
        directory = next((d for d in box.cgroup.dirs if DEVICES_ROOT in d.parents), None)
        if directory is not None:
            assert f"b {major}:{minor} rwm" in (directory / "devices.list").read_text().splitlines()
    with Box() as box:
        assert not box.exists(device)
        assert box.run(["cat", device]).returncode != 0


def test_a_device_given_to_a_box_keeps_its_host_mode() -> None:
    if not Path("/dev/fuse").exists():
        pytest.skip("this host has no /dev/fuse")
    with Box(devices=["/dev/fuse"]) as box:
        expected = f"{stat.S_IMODE(os.stat('/dev/fuse').st_mode):o}\n"
        assert box.run("stat -c %a /dev/fuse", check=True).stdout == expected


def _setuid_id(box: Box) -> None:
    box.run("cp /usr/bin/id /usr/local/bin/suid-id && chmod 4755 /usr/local/bin/suid-id", check=True)


def test_a_setuid_program_gains_root_by_default() -> None:
    with Box() as box:
        _setuid_id(box)
        assert box.run(["suid-id", "-u"], user="nobody", check=True).stdout == "0\n"
        assert "NoNewPrivs:\t0" in box.run("cat /proc/self/status", check=True).stdout


@pytest.mark.nsbox(no_new_privileges=True)
def test_no_new_privileges_keeps_a_setuid_program_at_the_callers_uid(nsbox: Box) -> None:
    _setuid_id(nsbox)
    nobody = nsbox.run(["id", "-u"], user="nobody", check=True).stdout
    assert nsbox.run(["suid-id", "-u"], user="nobody", check=True).stdout == nobody != "0\n"
    assert "NoNewPrivs:\t1" in nsbox.run("cat /proc/self/status", user="nobody", check=True).stdout
    assert "NoNewPrivs:\t1" in nsbox.run("cat /proc/self/status", check=True).stdout  # root's too
