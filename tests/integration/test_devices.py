"""Device nodes: a default box opens only its own few, whatever nodes its image ships.

The image tests ship a block node that names a real loop device on the host, backed by a file
holding a secret: a default box can neither read nor write through it, a privileged box still
can (as before), and ``devices=[...]`` gives a box a host node on purpose. The v1 devices
cgroup is checked on its own too, from a host process placed in a box's cgroup.
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
from pytest_nsbox.devices import ALLOWED

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


def test_the_v1_devices_cgroup_alone_refuses_host_devices_and_mknod(
    nsbox_factory: Callable[..., Box],
    loop_device: tuple[str, Path],
    tmp_path: Path,
) -> None:
    """A host process (all capabilities, host /dev without nodev) moved into a box's devices
    cgroup: what it is refused, the cgroup refused, not nodev or a missing capability."""
    box = nsbox_factory()
    procs = _devices_dir(box) / "cgroup.procs"
    script = (
        "import os, sys\n"
        f"open({str(procs)!r}, 'w').write(str(os.getpid()))\n"
        "def attempt(what, call):\n"
        "    try:\n"
        "        call()\n"
        "        print(what, 'ok')\n"
        "    except OSError as exc:\n"
        "        print(what, exc.errno)\n"
        f"attempt('loop', lambda: os.close(os.open({loop_device[0]!r}, os.O_RDONLY)))\n"
        "attempt('null', lambda: os.close(os.open('/dev/null', os.O_RDWR)))\n"
        f"node = {str(tmp_path / 'node')!r}\n"
        "attempt('mknod', lambda: os.mknod(node, 0o600 | 0o020000, os.makedev(1, 3)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"loop {errno.EPERM}", "null ok", f"mknod {errno.EPERM}"]
    assert not (tmp_path / "node").exists()


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
