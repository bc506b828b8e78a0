"""Boxes are hardened as Docker containers are: few capabilities, a guarded /proc and /sys.

Every dangerous command here runs inside a box, and none could harm the host even if the
hardening failed: the sysrq trigger is opened for writing but never written, a module "load"
passes /dev/null, and the one host-wide sysctl written gets the value it already has.
`privileged=True` boxes show the other side: all capabilities and nothing masked.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Callable

import pytest

from pytest_nsbox import Box
from pytest_nsbox.syscalls import CAPABILITIES

pytestmark = pytest.mark.requires("boxes")

# Docker's default capabilities (moby's oci/caps/defaults.go) less CAP_MKNOD: Docker pairs it
# with a device cgroup a box does not have.
EXPECTED = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
MASKED_FILES = ("kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug")
MASKED_DIRS = ("/proc/acpi", "/proc/asound", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap")
READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
FINIT_MODULE = {"x86_64": 313, "aarch64": 273}


def mask_of(names: tuple[str, ...]) -> int:
    return sum(1 << CAPABILITIES[name] for name in names)


def capability_sets(text: str) -> dict[str, int]:
    """The ``Cap*`` lines of a ``/proc/PID/status``, as numbers."""
    fields = (line.split(":") for line in text.splitlines() if line.startswith("Cap"))
    return {name: int(value, 16) for name, value in fields}


def host_bounding_set() -> int:
    with open("/proc/self/status") as handle:
        return capability_sets(handle.read())["CapBnd"]


def names(mask: int) -> set[str]:
    return {name for name, number in CAPABILITIES.items() if mask & (1 << number)}


def proc_mounts(box: Box) -> dict[str, list[str]]:
    """Mount point -> per-mount options of the mounts at or below ``/proc`` in the box."""
    mounts = {}
    for line in box.run("cat /proc/self/mountinfo", check=True).stdout.splitlines():
        fields = line.split()
        if fields[4] == "/proc" or fields[4].startswith("/proc/"):
            mounts[fields[4]] = fields[5].split(",")
    return mounts


def python(box: Box, script: str, timeout: float | None = None) -> str:
    """Run a Python script in the box (the host's interpreter: a box sees the host's root)."""
    result = box.run([sys.executable, "-c", script], timeout=timeout)
    assert result.returncode == 0, result.stderr
    return str(result.stdout)


# ------------------------------------------------------------------------------ capabilities


def test_commands_run_as_root_hold_only_dockers_default_capabilities(nsbox: Box) -> None:
    sets = capability_sets(nsbox.run("cat /proc/self/status", check=True).stdout)
    expected = mask_of(EXPECTED) & host_bounding_set()  # this host's pytest may lack one
    assert names(sets["CapBnd"]) == names(expected)
    assert sets["CapEff"] == sets["CapPrm"] == sets["CapBnd"]
    assert sets["CapInh"] == sets["CapAmb"] == 0
    gone = {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_MODULE", "CAP_MKNOD", "CAP_SYS_PTRACE"}
    assert not gone & names(sets["CapBnd"])


def test_a_command_run_as_another_user_holds_no_capability(nsbox: Box) -> None:
    sets = capability_sets(nsbox.run("cat /proc/self/status", user="nobody", check=True).stdout)
    assert sets["CapEff"] == sets["CapPrm"] == 0
    assert names(sets["CapBnd"]) == names(mask_of(EXPECTED) & host_bounding_set())


def test_mounting_is_refused(nsbox: Box) -> None:
    result = nsbox.run("mount -t tmpfs none /mnt")
    assert result.returncode != 0
    assert "permission denied" in result.stderr
    assert " /mnt " not in nsbox.run("cat /proc/self/mountinfo").stdout


def test_making_a_block_device_is_refused(nsbox: Box) -> None:
    result = nsbox.run("mknod /tmp/blk b 7 0")
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr
    assert not nsbox.exists("/tmp/blk")


def test_loading_a_kernel_module_is_refused(nsbox: Box) -> None:
    number = FINIT_MODULE.get(platform.machine())
    if number is None:
        pytest.skip(f"no finit_module number known for {platform.machine()}")
    # Even were it allowed, the kernel would find no module in /dev/null.
    script = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = os.open('/dev/null', os.O_RDONLY)\n"
        f"result = libc.syscall({number}, fd, b'', 0)\n"
        "print(result, os.strerror(ctypes.get_errno()))\n"
    )
    # A kernel built without module support (no /proc/modules) has no such call at all.
    expected = "Operation not permitted" if os.path.exists("/proc/modules") else "Function not implemented"
    assert python(nsbox, script) == f"-1 {expected}\n"


@pytest.mark.skipif(shutil.which("ip") is None, reason="the host (a box's default root) has no `ip`")
def test_adding_a_network_link_is_refused(nsbox: Box) -> None:
    result = nsbox.run("ip link add nsbh0 type veth peer name nsbh1")
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr
    assert "nsbh0" not in nsbox.run("cat /proc/net/dev").stdout


def test_commands_cannot_reach_into_init(nsbox: Box) -> None:
    # Init keeps its capabilities; ptrace access to it needs them all, so its fds, its root
    # and its memory are out of a command's reach.
    for path in ("/proc/1/root/", "/proc/1/cwd/", "/proc/1/environ", "/proc/1/mem"):
        result = nsbox.run(["cat", path])
        assert result.returncode != 0
        assert "Permission denied" in result.stderr, path


# ----------------------------------------------------------------------------------- /proc


def test_sysrq_trigger_cannot_be_opened_for_writing(nsbox: Box) -> None:
    # Opened, never written: even were it writable, nothing would be triggered.
    script = (
        "import os\n"
        "try:\n"
        "    os.close(os.open('/proc/sysrq-trigger', os.O_WRONLY))\n"
        "    print('opened')\n"
        "except OSError as exc:\n"
        "    print(os.strerror(exc.errno))\n"
    )
    # A kernel without CONFIG_MAGIC_SYSRQ has no trigger to guard.
    expected = (
        "Read-only file system" if os.path.exists("/proc/sysrq-trigger") else "No such file or directory"
    )
    assert python(nsbox, script) == f"{expected}\n"


def test_kernel_tables_in_proc_are_read_only(nsbox: Box) -> None:
    mounts = proc_mounts(nsbox)
    for name in READ_ONLY:
        if os.path.exists(f"/proc/{name}"):
            assert "ro" in mounts[f"/proc/{name}"], name
    assert "rw" in mounts["/proc"]  # the rest of /proc is the box's own
    # Writing a host-wide setting the value it already has: harmless, were it allowed.
    script = (
        "import os\n"
        "path = '/proc/sys/vm/swappiness'\n"
        "value = open(path).read()\n"
        "try:\n"
        "    with open(path, 'w') as handle:\n"
        "        handle.write(value)\n"
        "    print('written')\n"
        "except OSError as exc:\n"
        "    print(os.strerror(exc.errno))\n"
    )
    assert python(nsbox, script) == "Read-only file system\n"
    result = nsbox.run("echo other > /proc/sys/kernel/hostname")
    assert "Read-only file system" in result.stderr
    assert nsbox.run("hostname").stdout == "box\n"


def test_kernel_memory_keys_and_timers_read_as_nothing(nsbox: Box) -> None:
    there = [name for name in MASKED_FILES if os.path.exists(f"/proc/{name}")]
    if not there:
        pytest.skip("this kernel has none of the files a box masks")
    with open("/proc/timer_list", "rb") as handle:
        assert handle.read(1), "the host's timer list should not be empty"
    for name in MASKED_FILES:
        # 0 bytes where the host has the file (/dev/null is over it), and no file where not.
        result = nsbox.run(f"head -c 4096 /proc/{name} | wc -c; test -e /proc/{name}; echo $?")
        assert result.stdout.split() == ["0", "0" if name in there else "1"], name


def test_acpi_firmware_and_friends_are_empty(nsbox: Box) -> None:
    there = [path for path in MASKED_DIRS if os.path.isdir(path) and os.listdir(path)]
    if not there:
        pytest.skip("the host has none of the directories a box masks")
    for path in there:
        assert nsbox.run(["ls", "-A", path], check=True).stdout == "", path
        assert "Read-only file system" in nsbox.run(f"touch {path}/x").stderr


def test_sys_stays_read_only(nsbox: Box) -> None:
    assert "Read-only file system" in nsbox.run("touch /sys/kernel/x").stderr


# ----------------------------------------------------------------- ordinary software still works


def test_root_can_chown_and_chmod_and_read_others_files(nsbox: Box) -> None:
    script = (
        "set -e\n"
        "echo secret > /tmp/f\n"
        "chown 65534:65534 /tmp/f\n"  # CAP_CHOWN
        "chmod 600 /tmp/f\n"  # CAP_FOWNER: nobody's file now
        "cat /tmp/f\n"  # CAP_DAC_OVERRIDE
        "stat -c '%u:%g %a' /tmp/f\n"
    )
    assert nsbox.run(script, check=True).stdout == "secret\n65534:65534 600\n"


def test_switching_users_works(nsbox: Box) -> None:
    assert nsbox.run("id -u", user="nobody", check=True).stdout == "65534\n"
    switched = nsbox.run("setpriv --reuid=65534 --regid=65534 --clear-groups id -u", check=True)
    assert switched.stdout == "65534\n"
    assert nsbox.run("su -s /bin/sh -c 'id -un' nobody", check=True).stdout == "nobody\n"
    assert nsbox.run("chroot / true").returncode == 0  # CAP_SYS_CHROOT


def test_root_can_bind_a_low_port_and_open_a_raw_socket(nsbox: Box) -> None:
    script = (
        "import socket\n"
        "server = socket.socket()\n"
        "server.bind(('0.0.0.0', 80))\n"  # CAP_NET_BIND_SERVICE
        "server.listen()\n"
        "raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n"  # CAP_NET_RAW
        "print(server.getsockname()[1], raw.type == socket.SOCK_RAW)\n"
    )
    assert python(nsbox, script) == "80 True\n"


def test_root_can_signal_its_own_and_other_users_processes(nsbox: Box) -> None:
    own = nsbox.run("sleep 60 & kill $!; wait $!; echo $?", timeout=30)
    assert own.stdout == "143\n"
    script = (
        "import os, signal, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setuid(65534)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(0.1)\n"
        "os.kill(pid, signal.SIGTERM)\n"  # CAP_KILL: another user's process
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    assert python(nsbox, script, timeout=30) == f"{-15}\n"


# ---------------------------------------------------------------------------------- privileged


def test_a_privileged_box_holds_every_capability(nsbox_factory: Callable[..., Box]) -> None:
    box = nsbox_factory(privileged=True)
    sets = capability_sets(box.run("cat /proc/self/status", check=True).stdout)
    assert sets["CapBnd"] == sets["CapEff"] == host_bounding_set()


def test_a_privileged_box_can_mount_make_devices_and_add_links(nsbox_factory: Callable[..., Box]) -> None:
    box = nsbox_factory(privileged=True)
    box.run("mount -t tmpfs nsb-hardening /mnt && mknod /tmp/blk b 7 0", check=True)
    assert box.run("stat -c %F /tmp/blk").stdout == "block special file\n"
    assert "nsb-hardening" in box.run("cat /proc/self/mountinfo").stdout
    if shutil.which("ip") is not None:
        box.run("ip link add nsbh0 type veth peer name nsbh1", check=True)
        assert "nsbh0" in box.run("cat /proc/net/dev").stdout
        assert not os.path.exists("/sys/class/net/nsbh0")  # the box's own network namespace


def test_a_privileged_box_has_nothing_masked(nsbox_factory: Callable[..., Box]) -> None:
    box = nsbox_factory(privileged=True)
    # The sysrq trigger is not written, even here: its mount's flags say enough.
    assert proc_mounts(box) == {"/proc": proc_mounts(box)["/proc"]}
    assert "rw" in proc_mounts(box)["/proc"]
    assert box.run("head -c 1 /proc/timer_list | wc -c").stdout == "1\n"
    for path in MASKED_DIRS:
        if os.path.isdir(path) and os.listdir(path):
            assert box.run(["ls", "-A", path], check=True).stdout != "", path
    assert "Read-only file system" in box.run("touch /sys/kernel/x").stderr  # sysfs stays ro
