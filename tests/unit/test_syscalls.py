"""The ctypes wrappers: flag rendering, errors that name their arguments, openat2 confinement."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
from forking import in_child

from pytest_nsbox import syscalls
from pytest_nsbox.errors import MountError, SyscallError
from pytest_nsbox.syscalls import (
    _CLONE_FLAG_NAMES,
    _MOUNT_FLAG_NAMES,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    MS_BIND,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    RESOLVE_IN_ROOT,
    flag_names,
)

# ---------------------------------------------------------------------------- flag_names


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0, "0"),
        (MS_BIND, "MS_BIND"),
        (MS_BIND | MS_REC, "MS_BIND|MS_REC"),
        (MS_REC | MS_PRIVATE, "MS_REC|MS_PRIVATE"),
        (MS_RDONLY | MS_BIND | 0x10000000, "MS_RDONLY|MS_BIND|0x10000000"),
        (0x10000000, "0x10000000"),
    ],
)
def test_flag_names_renders_mount_flags_by_kernel_name(flags: int, expected: str) -> None:
    assert flag_names(flags, _MOUNT_FLAG_NAMES) == expected


def test_flag_names_renders_clone_flags() -> None:
    text = flag_names(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET, _CLONE_FLAG_NAMES)
    assert text == "CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWNET"


def test_flag_names_collects_all_unknown_bits_into_one_hex_number() -> None:
    assert flag_names(MS_BIND | 0x100 | 0x200, _MOUNT_FLAG_NAMES) == "MS_BIND|0x300"


# ------------------------------------------------------------------------- failing calls


@pytest.mark.requires("root")
def test_mount_on_a_missing_target_raises_mount_error_naming_it(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "does-not-exist"
    with pytest.raises(MountError) as info:
        syscalls.mount(str(tmp_path), str(target), None, MS_BIND | MS_REC)
    err = info.value
    assert err.errno == errno.ENOENT
    assert isinstance(err, OSError)
    text = str(err)
    assert text.startswith("mount failed: ENOENT")
    assert f"target={str(target)!r}" in text
    assert f"source={str(tmp_path)!r}" in text
    assert "flags=MS_BIND|MS_REC" in text
    assert "type=None" in text
    assert not target.exists()


@pytest.mark.requires("root")
def test_mount_of_an_unknown_filesystem_type_hints_at_modprobe(tmp_path: pathlib.Path) -> None:
    with pytest.raises(MountError) as info:
        syscalls.mount("none", str(tmp_path), "nsbox-no-such-fs", 0, "size=1")
    assert info.value.errno == errno.ENODEV
    text = str(info.value)
    assert "type='nsbox-no-such-fs'" in text
    assert "data='size=1'" in text
    assert "does not support filesystem type 'nsbox-no-such-fs'" in text


def test_umount2_of_a_non_mount_point_raises_mount_error_naming_it(tmp_path: pathlib.Path) -> None:
    with pytest.raises(MountError) as info:
        syscalls.umount2(str(tmp_path), syscalls.MNT_DETACH)
    assert info.value.errno in (errno.EINVAL, errno.EPERM)
    assert f"target={str(tmp_path)!r} flags=0x2" in str(info.value)


def test_sethostname_longer_than_the_kernel_allows_fails_naming_it() -> None:
    before = os.uname().nodename
    name = "n" * 65
    with pytest.raises(SyscallError) as info:
        syscalls.sethostname(name)
    assert info.value.errno in (errno.EINVAL, errno.EPERM)
    assert str(info.value).startswith("sethostname failed:")
    assert repr(name) in str(info.value)
    assert os.uname().nodename == before


def test_prctl_with_an_unknown_option_raises_syscall_error() -> None:
    with pytest.raises(SyscallError) as info:
        syscalls.prctl(999_999, 7)
    assert info.value.errno == errno.EINVAL
    assert "option 999999, arg 7" in str(info.value)


def test_prctl_returns_the_kernel_result() -> None:
    # PR_GET_DUMPABLE (3) returns 0, 1 or 2; reading it changes nothing.
    assert syscalls.prctl(3) in (0, 1, 2)


def test_setns_on_a_bad_descriptor_raises_ebadf() -> None:
    with pytest.raises(SyscallError) as info:
        syscalls.setns(-1, CLONE_NEWNET)
    assert info.value.errno == errno.EBADF
    assert "fd -1, CLONE_NEWNET" in str(info.value)


# -------------------------------------------------------------------------------- openat2


@pytest.fixture
def root_dir(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, int]]:
    """A directory standing in for a box root, and an O_PATH descriptor of it."""
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield root, fd
    finally:
        os.close(fd)


def read_fd(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def test_openat2_in_root_does_not_follow_an_absolute_symlink_out(root_dir: tuple[pathlib.Path, int]) -> None:
    root, fd = root_dir
    assert os.path.exists("/etc/hostname")
    (root / "esc").symlink_to("/etc/hostname")
    with pytest.raises(SyscallError) as info:
        syscalls.openat2(fd, "esc", os.O_RDONLY, resolve=RESOLVE_IN_ROOT)
    assert info.value.errno == errno.ENOENT
    assert str(info.value).startswith("openat2 failed: ENOENT")
    assert "'esc'" in str(info.value)


def test_openat2_in_root_resolves_an_absolute_symlink_inside_the_root(
    root_dir: tuple[pathlib.Path, int],
) -> None:
    root, fd = root_dir
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("inside\n")
    (root / "esc").symlink_to("/etc/hostname")
    assert read_fd(syscalls.openat2(fd, "esc", os.O_RDONLY, resolve=RESOLVE_IN_ROOT)) == b"inside\n"


def test_openat2_in_root_clamps_dotdot_at_the_root(root_dir: tuple[pathlib.Path, int]) -> None:
    root, fd = root_dir
    (root / "f").write_text("root file")
    (root.parent / "f").write_text("outside")
    assert read_fd(syscalls.openat2(fd, "../../f", os.O_RDONLY, resolve=RESOLVE_IN_ROOT)) == b"root file"


def test_openat2_without_resolve_flags_follows_the_symlink_to_the_host(
    root_dir: tuple[pathlib.Path, int],
) -> None:
    # The control for the test above: it is RESOLVE_IN_ROOT that keeps the lookup inside.
    root, fd = root_dir
    (root / "esc").symlink_to("/etc/hostname")
    with open("/etc/hostname", "rb") as handle:
        assert read_fd(syscalls.openat2(fd, "esc", os.O_RDONLY)) == handle.read()


def test_openat2_descriptors_are_close_on_exec(root_dir: tuple[pathlib.Path, int]) -> None:
    root, fd = root_dir
    (root / "f").write_text("x")
    opened = syscalls.openat2(fd, "f", os.O_RDONLY, resolve=RESOLVE_IN_ROOT)
    try:
        assert os.get_inheritable(opened) is False
    finally:
        os.close(opened)


def test_openat2_creates_files_with_the_given_mode(root_dir: tuple[pathlib.Path, int]) -> None:
    root, fd = root_dir
    old = os.umask(0)
    try:
        opened = syscalls.openat2(fd, "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, RESOLVE_IN_ROOT)
    finally:
        os.umask(old)
    os.write(opened, b"data")
    os.close(opened)
    assert (root / "new").read_bytes() == b"data"
    assert (root / "new").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("flags", [os.O_RDONLY | os.O_DIRECTORY, os.O_PATH | os.O_DIRECTORY, os.O_RDONLY])
def test_openat2_ignores_mode_when_not_creating(root_dir: tuple[pathlib.Path, int], flags: int) -> None:
    # openat2 refuses a non-zero mode without O_CREAT/O_TMPFILE (EINVAL); O_DIRECTORY shares a
    # bit with O_TMPFILE, which must not count as creating. BoxFiles always passes a mode.
    root, fd = root_dir
    (root / "sub").mkdir()
    opened = syscalls.openat2(fd, "sub", flags, 0o644, RESOLVE_IN_ROOT)
    try:
        assert os.path.samestat(os.fstat(opened), os.stat(root / "sub"))
    finally:
        os.close(opened)


# --------------------------------------------------------------------------- capabilities


def status_capabilities() -> dict[str, int]:
    """The ``Cap*`` lines of this process's ``/proc/self/status``, as numbers."""
    with open("/proc/self/status") as handle:
        fields = [line.split(":") for line in handle if line.startswith("Cap")]
    return {name: int(value, 16) for name, value in fields}


def test_capability_numbers_follow_the_kernel_header() -> None:
    table = syscalls.CAPABILITIES
    assert sorted(table.values()) == list(range(len(table)))
    assert (table["CAP_CHOWN"], table["CAP_NET_ADMIN"], table["CAP_SYS_ADMIN"]) == (0, 12, 21)
    assert (table["CAP_MKNOD"], table["CAP_SETFCAP"], table["CAP_CHECKPOINT_RESTORE"]) == (27, 31, 40)


def test_last_capability_is_the_kernels() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        assert syscalls.last_capability() == int(handle.read())
    assert syscalls.last_capability() >= syscalls.CAPABILITIES["CAP_AUDIT_READ"]  # Linux 3.16


def test_in_bounding_set_agrees_with_proc_status() -> None:
    bounding = status_capabilities()["CapBnd"]
    for cap in range(syscalls.last_capability() + 1):
        assert syscalls.in_bounding_set(cap) == bool(bounding & (1 << cap)), cap


def test_in_bounding_set_of_an_unknown_capability_raises_naming_it() -> None:
    with pytest.raises(SyscallError) as info:
        syscalls.in_bounding_set(syscalls.last_capability() + 1)
    assert info.value.errno == errno.EINVAL
    assert f"cap {syscalls.last_capability() + 1}" in str(info.value)


def test_capability_sets_agree_with_proc_status() -> None:
    status = status_capabilities()
    assert syscalls.capability_sets() == (status["CapEff"], status["CapPrm"], status["CapInh"])


def test_set_capability_sets_refuses_what_the_kernel_forbids() -> None:
    def attempt() -> str:
        effective, _, inheritable = syscalls.capability_sets()
        # Root: an effective capability must stay permitted. Others: none may grant itself one.
        wanted = (effective, 0, inheritable) if effective else (0, 1, inheritable)
        try:
            syscalls.set_capability_sets(*wanted)
        except SyscallError as exc:
            return f"{exc.errno} {exc}"
        return "no error"

    text = str(in_child(attempt))
    assert text.startswith(f"{errno.EPERM} capset failed: EPERM")
    assert "effective=" in text and "inheritable=" in text


@pytest.mark.requires("root")
def test_set_capability_sets_changes_the_inheritable_set() -> None:
    kill = 1 << syscalls.CAPABILITIES["CAP_KILL"]

    def change() -> list[int]:
        effective, permitted, inheritable = syscalls.capability_sets()
        syscalls.set_capability_sets(effective, permitted, inheritable | kill)
        return list(syscalls.capability_sets())

    effective, permitted, inheritable = syscalls.capability_sets()
    assert in_child(change) == [effective, permitted, inheritable | kill]
    assert syscalls.capability_sets() == (effective, permitted, inheritable)


@pytest.mark.requires("root")
def test_drop_from_bounding_set_drops_for_good() -> None:
    effective = syscalls.capability_sets()[0]
    held = [cap for cap in range(syscalls.last_capability() + 1) if syscalls.in_bounding_set(cap)]
    cap = max(cap for cap in held if effective & (1 << cap))

    def drop() -> list[object]:
        syscalls.drop_from_bounding_set([cap])
        syscalls.drop_from_bounding_set([cap])  # dropping what is gone is no error
        still_effective = bool(syscalls.capability_sets()[0] & (1 << cap))
        return [syscalls.in_bounding_set(cap), still_effective, status_capabilities()["CapBnd"]]

    # Gone from the bounding set, still the process's own.
    assert in_child(drop) == [False, True, status_capabilities()["CapBnd"] & ~(1 << cap)]
    assert syscalls.in_bounding_set(cap)  # the parent's is untouched


# ---------------------------------------------------------------------------- fork_into_namespaces


def test_a_failing_clone_call_still_releases_the_import_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyOS_BeforeFork takes the import lock; its AfterFork half must run whatever happens, or
    the next import in any other thread waits forever."""
    import _imp
    import types

    def broken(*_arguments: object) -> int:
        raise RuntimeError("the call itself failed")

    monkeypatch.setattr(syscalls, "_libc_gil", types.SimpleNamespace(syscall=broken))
    with pytest.raises(RuntimeError, match="the call itself failed"):
        syscalls.fork_into_namespaces(0)
    assert not _imp.lock_held()


# ------------------------------------------------------------------- names in ps and /proc

_RENAME = """
import os, sys
from pytest_nsbox import syscalls
syscalls.set_process_name("nsbox-test-name")
syscalls.hide_environment()
sys.stdout.buffer.write(open("/proc/self/cmdline", "rb").read() + b"|" + open("/proc/self/comm", "rb").read())
environ = open("/proc/self/environ", "rb").read()
sys.stdout.buffer.write(b"|" + environ.strip(b"\\0"))
sys.stdout.buffer.write(b"|" + os.environ["NSBOX_TEST_SECRET"].encode())  # Python's copy stays
"""


def test_a_process_renames_its_command_line_and_blanks_its_environment() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _RENAME, "an argument naming a host path /srv/secret"],
        env={**os.environ, "NSBOX_TEST_SECRET": "/home/someone/.token"},
        capture_output=True,
        check=True,
    )
    cmdline, comm, environ, kept = result.stdout.split(b"|")
    assert cmdline == b"nsbox-test-name\0"  # what ps -o args and pgrep -f read
    assert comm == b"nsbox-test-name\n"
    assert environ == b""
    assert kept == b"/home/someone/.token"
