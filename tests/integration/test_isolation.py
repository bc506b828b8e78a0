"""Each namespace of a box really isolates it: pids, hostname, network, SysV IPC, mounts, files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from pytest_nsbox import Box

pytestmark = pytest.mark.requires("boxes")


def test_the_shell_is_a_small_pid_and_init_is_pid_1(nsbox: Box) -> None:
    result = nsbox.run("echo $$; cat /proc/1/comm")
    pid, init_name = result.stdout.split()
    assert int(pid) < 10
    assert init_name == "nsbox-init"


def test_init_shows_as_nsbox_init_and_nothing_of_the_host(nsbox_factory) -> None:
    # Its command line was the host's interpreter, the package's directory and a JSON plan of
    # the host's cgroup paths; its environment, pytest's.
    for box in (nsbox_factory(), nsbox_factory(privileged=True)):  # privileged: environ is readable
        assert box.run(["ps", "-o", "args=", "-p", "1"]).stdout == "nsbox-init\n"
        assert box.run(["cat", "/proc/1/cmdline"]).stdout == "nsbox-init\0"
        assert box.run(["cat", "/proc/1/comm"]).stdout == "nsbox-init\n"
    environ = box.run(["cat", "/proc/1/environ"])
    assert environ.returncode == 0 and environ.stdout == "", environ


def test_the_helper_and_its_boxes_show_their_names_on_the_host(nsbox: Box) -> None:
    from pytest_nsbox import zygote

    helper = zygote.current()
    assert helper is not None

    def children(pid: int) -> list[int]:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]

    def shown(pid: int) -> tuple[bytes, bytes]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline, open(f"/proc/{pid}/environ", "rb") as env:
                return cmdline.read(), env.read()
        except OSError:
            return b"", b""  # a waiting box that exited unused meanwhile

    assert shown(helper.pid) == (b"nsbox-zygote\0", b"")
    assert shown(nsbox.pid) == (b"nsbox-init\0", b"")
    if nsbox.userns_ids is not None:
        return  # a userns box is made when asked for: none waits behind it (nsbox_userns = true)
    # The next box, cloned while this test runs, renames itself as it starts waiting.
    deadline = time.monotonic() + 10
    while b"nsbox-waiting\0" not in {shown(pid)[0] for pid in children(helper.pid)}:
        assert time.monotonic() < deadline, [shown(pid) for pid in children(helper.pid)]
        time.sleep(0.01)


def test_proc_lists_only_the_box_processes(nsbox: Box) -> None:
    pids = nsbox.run("ls /proc | grep -E '^[0-9]+$'").stdout.split()
    # init, the shell, ls, grep: nothing of the host's hundreds of processes
    assert 1 <= len(pids) <= 6, pids
    assert str(os.getpid()) not in pids or int(str(os.getpid())) < 10


def test_hostname_is_the_boxes_own(nsbox_factory) -> None:
    web = nsbox_factory(hostname="web")
    db = nsbox_factory(hostname="db.internal")
    assert web.run("hostname").stdout == "web\n"
    assert db.run(["hostname"]).stdout == "db.internal\n"
    assert web.read_text("/etc/hostname") == "web\n"
    assert "web" in web.run(["getent", "hosts", "web"]).stdout
    assert socket.gethostname() not in ("web", "db.internal")


def test_network_has_only_loopback_and_it_works(nsbox: Box) -> None:
    devices = nsbox.run("cat /proc/net/dev").stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]
    script = (
        "import socket\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "client = socket.create_connection(server.getsockname())\n"
        "peer, _ = server.accept()\n"
        "client.sendall(b'ping')\n"
        "print(peer.recv(4).decode())\n"
    )
    result = nsbox.run([sys.executable, "-c", script], check=True)
    assert result.stdout == "ping\n"


def test_host_interfaces_are_not_visible(nsbox: Box) -> None:
    host_links = set(os.listdir("/sys/class/net"))
    box_links = set(nsbox.run("ls /sys/class/net").stdout.split())
    assert box_links == {"lo"}
    assert host_links - {"lo"}, "the host should have more than loopback for this test to mean something"


def test_sysv_ipc_is_private(nsbox_factory) -> None:
    first = nsbox_factory()
    second = nsbox_factory()
    key = first.run(["ipcmk", "-Q"], check=True).stdout
    assert "Message queue id" in key
    assert first.run("ipcs -q | grep -c '^0x'").stdout.strip() == "1"
    assert second.run("ipcs -q | grep -c '^0x' || true").stdout.strip() == "0"
    host = subprocess.run(["ipcs", "-q"], capture_output=True, text=True, check=True).stdout
    queue_id = key.split(":")[1].strip()
    assert f" {queue_id} " not in host


def test_mounts_inside_stay_inside(nsbox_factory) -> None:
    box = nsbox_factory(privileged=True)
    with open("/proc/self/mountinfo") as handle:
        host_before = handle.read()
    box.run("mkdir -p /mnt/inner && mount -t tmpfs nsb-inner /mnt/inner", check=True)
    box_mounts = box.run("cat /proc/self/mountinfo").stdout
    assert "nsb-inner" in box_mounts
    with open("/proc/self/mountinfo") as handle:
        assert handle.read() == host_before
    assert " /work " not in box_mounts and " /sys/fs/cgroup " not in box_mounts


def test_sys_is_read_only_and_dev_is_minimal(nsbox: Box) -> None:
    result = nsbox.run("touch /sys/kernel/x 2>&1; echo rc=$?")
    assert "Read-only file system" in result.stdout
    devices = set(nsbox.run("ls /dev").stdout.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx"} <= devices
    assert not devices & {"vda", "sda", "mem", "kmsg", "nvme0n1"}
    assert nsbox.run("head -c 4 /dev/zero | od -An -tx1").stdout.split() == ["00"] * 4
    assert "No space left" in nsbox.run("dd if=/dev/zero of=/dev/full bs=1 count=1").stderr


def test_rm_rf_root_harms_neither_host_nor_next_box() -> None:
    with Box() as box:
        box.run("rm -rf --no-preserve-root /etc /usr/bin /tmp", timeout=120)
        assert not box.exists("/etc/passwd") and not box.exists("/usr/bin/ls")
        if os.path.realpath("/bin/sh").startswith("/usr/bin/"):
            with pytest.raises(FileNotFoundError, match="/bin/sh"):
                box.run("true")  # /bin is /usr/bin on merged-usr systems: the shell is gone too
    assert os.path.exists("/etc/passwd") and os.path.exists("/usr/bin/ls") and os.path.isdir("/tmp")
    with Box() as fresh:
        assert fresh.run(["ls", "/usr/bin/ls", "/etc/passwd"], check=True).returncode == 0
        assert fresh.exists("/tmp")


def test_writes_land_in_the_throwaway_layer(nsbox: Box, overlay_root) -> None:
    marker = f"/etc/nsbox-test-{os.getpid()}"
    nsbox.run(f"echo hi > {marker} && rm /etc/issue && echo x >> /etc/motd", check=True)
    assert not os.path.exists(marker)
    changes = overlay_root.diff()
    assert marker in changes.added
    assert "/etc/issue" in changes.deleted
    assert "/etc/motd" in changes.modified
    assert "/etc/hostname" not in changes.added + changes.modified  # bind-mounted, not written
    assert overlay_root.lowers == ("/",)


def test_a_deleted_directory_is_listed_as_an_added_one_is(nsbox: Box, nsbox_factory) -> None:
    tree = "mkdir -p /srv/tree/a/b && echo 1 > /srv/tree/a/b/file && echo 2 > /srv/tree/top"
    nsbox.run(tree, check=True)
    paths = ["/srv/tree", "/srv/tree/a", "/srv/tree/a/b", "/srv/tree/a/b/file", "/srv/tree/top"]
    assert (
        nsbox.root is not None and [p for p in nsbox.root.diff().added if p.startswith("/srv/tree")] == paths
    )

    box = nsbox_factory(image=nsbox.snapshot())  # the tree is in its image now
    box.run("rm -rf /srv/tree && mkdir -p /srv/again/sub && rm -rf /srv/again/sub", check=True)
    assert box.root is not None
    changes = box.root.diff()
    assert changes.deleted == paths and changes.added == ["/srv/again"]
    assert box.root.diff(collapse=True).deleted == ["/srv/tree"] == changes.collapsed().deleted
