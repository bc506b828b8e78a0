"""Pure helpers of the box's init: overlay option escaping, /etc/hosts, PATH lookup, users."""

from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import pwd
import subprocess
from collections.abc import Iterable

import pytest
from forking import in_child

from pytest_nsbox import capabilities, init, rootfs, syscalls
from pytest_nsbox.init import find_program, resolve_user
from pytest_nsbox.overlay import escape_overlay_path
from pytest_nsbox.rootfs import hosts_file

# ---------------------------------------------------------------------- escape_overlay_path


def test_escape_overlay_path_escapes_separators_and_backslash() -> None:
    assert escape_overlay_path("a,b:c\\d") == "a\\,b\\:c\\\\d"


def test_escape_overlay_path_escapes_backslash_first() -> None:
    # Escaping "," first and "\\" second would double the backslash added for the comma.
    assert escape_overlay_path(",") == "\\,"
    assert escape_overlay_path("\\,") == "\\\\\\,"


def test_escape_overlay_path_leaves_ordinary_paths_alone() -> None:
    assert escape_overlay_path("/var/lib/images/debian-12_amd64") == "/var/lib/images/debian-12_amd64"


# ------------------------------------------------------------------------------ hosts_file


def test_hosts_file_resolves_the_hostname_and_localhost_to_loopback() -> None:
    text = hosts_file("web")
    assert text.endswith("\n")
    entries = [line.split() for line in text.splitlines()]
    assert ["127.0.0.1", "localhost"] in entries
    assert ["127.0.1.1", "web"] in entries
    assert any(fields[0] == "::1" and "localhost" in fields[1:] for fields in entries)


def test_hosts_file_uses_tabs_and_names_the_host_once() -> None:
    text = hosts_file("db.internal")
    assert "127.0.1.1\tdb.internal\n" in text
    assert text.count("db.internal") == 1


# ---------------------------------------------------------------------------- find_program


def make_program(path: pathlib.Path, mode: int = 0o755) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_find_program_finds_an_executable_on_the_path(tmp_path: pathlib.Path) -> None:
    program = make_program(tmp_path / "bin" / "tool")
    search = f"{tmp_path / 'empty'}:{tmp_path / 'bin'}"
    assert find_program("tool", search) == str(program)


def test_find_program_takes_the_first_match(tmp_path: pathlib.Path) -> None:
    first = make_program(tmp_path / "a" / "tool")
    make_program(tmp_path / "b" / "tool")
    assert find_program("tool", f"{tmp_path / 'a'}:{tmp_path / 'b'}") == str(first)


def test_find_program_skips_a_directory_with_the_name(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a" / "tool").mkdir(parents=True)
    program = make_program(tmp_path / "b" / "tool")
    assert find_program("tool", f"{tmp_path / 'a'}:{tmp_path / 'b'}") == str(program)


def test_find_program_skips_a_file_that_is_not_executable(tmp_path: pathlib.Path) -> None:
    make_program(tmp_path / "a" / "tool", mode=0o644)
    program = make_program(tmp_path / "b" / "tool")
    assert find_program("tool", f"{tmp_path / 'a'}:{tmp_path / 'b'}") == str(program)


def test_find_program_not_found_raises_file_not_found_naming_it(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bin" / "tool").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        find_program("tool", str(tmp_path / "bin"))
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "tool"
    assert "tool: command not found" in str(info.value)


def test_find_program_with_a_slash_returns_the_name_unchanged() -> None:
    assert find_program("/no/such/program", "/usr/bin") == "/no/such/program"
    assert find_program("./run.sh", "") == "./run.sh"


def test_find_program_empty_path_entry_means_the_current_directory(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_program(tmp_path / "tool")
    monkeypatch.chdir(tmp_path)
    assert find_program("tool", "/nonexistent:") == "./tool"


# ---------------------------------------------------------------------------- resolve_user


def test_resolve_user_none_is_root_without_changing_ids() -> None:
    assert resolve_user(None) == (None, None, None, "/root")


@pytest.mark.parametrize("user", ["root", 0, "0"])
def test_resolve_user_root_from_the_host_passwd(user: object) -> None:
    uid, gid, groups, home = resolve_user(user)
    assert (uid, gid, home) == (0, 0, pwd.getpwnam("root").pw_dir)
    assert isinstance(groups, list)


def test_resolve_user_nobody_from_the_host_passwd() -> None:
    entry = pwd.getpwnam("nobody")
    uid, gid, _groups, home = resolve_user("nobody")
    assert (uid, gid, home) == (entry.pw_uid, entry.pw_gid, entry.pw_dir)


def test_resolve_user_numeric_user_and_group() -> None:
    uid, gid, _groups, _home = resolve_user("1000:1000")
    assert (uid, gid) == (1000, 1000)


def test_resolve_user_numeric_ids_unknown_to_passwd() -> None:
    with pytest.raises(KeyError):
        pwd.getpwuid(54321)
    assert resolve_user("54321:54322") == (54321, 54322, [], "/")
    assert resolve_user(54321) == (54321, 0, [], "/"), "gid 0 and HOME=/, as runc gives an unknown uid"


def test_resolve_user_unknown_name_raises_lookup_error_naming_it() -> None:
    with pytest.raises(LookupError, match="user 'no-such-user-xyz' not found in the box's /etc/passwd"):
        resolve_user("no-such-user-xyz")


def test_resolve_user_unknown_group_raises_lookup_error_naming_it() -> None:
    with pytest.raises(LookupError, match="group 'no-such-group-xyz' not found in the box's /etc/group"):
        resolve_user("root:no-such-group-xyz")


def test_resolve_user_reads_absolute_etc_passwd_not_the_cwd(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:4242:4242:root:/elsewhere:/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    uid, _gid, _groups, home = resolve_user("root")
    assert uid == 0
    assert home == pwd.getpwnam("root").pw_dir


# ------------------------------------------------------- resolve_user against fake tables


PASSWD = [
    "root:x:0:0:root:/root:/bin/bash",
    "app:x:1001:1001:App:/srv/app:/bin/sh",
    "nohome:x:1002:1002:::/bin/sh",
]
GROUP = [
    "root:x:0:",
    "app:x:1001:",
    "staff:x:50:app,other",
    "docker:x:999:app",
    "audio:x:29:other",
]


@pytest.fixture
def fake_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    tables = {
        "/etc/passwd": [line.split(":") for line in PASSWD],
        "/etc/group": [line.split(":") for line in GROUP],
    }
    monkeypatch.setattr(init, "_read_table", lambda path: tables[path])


@pytest.mark.usefixtures("fake_tables")
def test_resolve_user_name_gives_its_supplementary_groups_sorted() -> None:
    assert resolve_user("app") == (1001, 1001, [50, 999], "/srv/app")


@pytest.mark.usefixtures("fake_tables")
def test_resolve_user_by_uid_finds_the_passwd_entry() -> None:
    assert resolve_user(1001) == (1001, 1001, [50, 999], "/srv/app")


@pytest.mark.usefixtures("fake_tables")
def test_resolve_user_with_a_group_name_gets_that_group_alone() -> None:
    assert resolve_user("app:staff") == (1001, 50, [], "/srv/app"), "no supplementary groups, as runc"
    assert resolve_user("1001:1001") == (1001, 1001, [], "/srv/app")


@pytest.mark.usefixtures("fake_tables")
def test_resolve_user_with_a_numeric_group_not_in_the_table() -> None:
    assert resolve_user("app:777")[1] == 777


@pytest.mark.usefixtures("fake_tables")
def test_resolve_user_without_a_home_gets_root_dir() -> None:
    assert resolve_user("nohome")[3] == "/"


# ------------------------------------------------------------------------------ _read_table


def test_read_table_splits_lines_and_skips_short_ones(tmp_path: pathlib.Path) -> None:
    table = tmp_path / "passwd"
    table.write_text("root:x:0:0:root:/root:/bin/bash\n\n# comment\nbroken:line\nnewline:x:5")
    assert init._read_table(str(table)) == [
        ["root", "x", "0", "0", "root", "/root", "/bin/bash"],
        ["newline", "x", "5"],
    ]


def test_read_table_of_a_missing_file_is_empty(tmp_path: pathlib.Path) -> None:
    assert init._read_table(str(tmp_path / "missing")) == []
    assert not os.path.exists(tmp_path / "missing")


# ------------------------------------------------------------------------------- hardening


def capabilities_of(status: str) -> dict[str, int]:
    """The ``Cap*`` lines of a ``/proc/PID/status``, as numbers."""
    fields = (line.split(":") for line in status.splitlines() if line.startswith("Cap"))
    return {name: int(value, 16) for name, value in fields}


def own_capabilities() -> dict[str, int]:
    with open("/proc/self/status") as handle:
        return capabilities_of(handle.read())


def mask_of(names: Iterable[str]) -> int:
    return sum(1 << syscalls.CAPABILITIES[name] for name in names)


def test_box_capabilities_are_dockers_defaults_without_mknod() -> None:
    docker = {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    }
    assert set(capabilities.BOX_CAPABILITIES) == docker - {"CAP_MKNOD"}
    assert len(capabilities.BOX_CAPABILITIES) == len(set(capabilities.BOX_CAPABILITIES))


def test_capabilities_to_drop_are_the_bounding_set_less_the_kept_ones() -> None:
    last = syscalls.last_capability()
    drop = capabilities.capabilities_to_drop(last)
    bounding = own_capabilities()["CapBnd"]
    kept = mask_of(capabilities.BOX_CAPABILITIES)
    assert drop == sorted(drop)
    assert mask_of(name for name, cap in syscalls.CAPABILITIES.items() if cap in drop) == bounding & ~kept


@pytest.mark.requires("root")
def test_limit_capabilities_leaves_nothing_a_program_could_regain() -> None:
    admin = syscalls.CAPABILITIES["CAP_SYS_ADMIN"]
    kill = syscalls.CAPABILITIES["CAP_KILL"]

    def limit() -> list[str]:
        # Before: CAP_SYS_ADMIN inheritable and ambient, which a root program would get back.
        effective, permitted, inheritable = syscalls.capability_sets()
        syscalls.set_capability_sets(effective, permitted, inheritable | 1 << admin | 1 << kill)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(47, 2, admin, 0, 0) == 0  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE
        capabilities.limit_capabilities(
            capabilities.capabilities_to_drop(syscalls.last_capability()), syscalls.capability_sets()
        )
        with open("/proc/self/status") as handle:
            own = handle.read()
        program = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True, check=True)
        return [own, program.stdout]

    before = own_capabilities()
    statuses = in_child(limit)
    assert isinstance(statuses, list)
    own, program = (capabilities_of(status) for status in statuses)
    kept = mask_of(capabilities.BOX_CAPABILITIES) & before["CapBnd"]
    assert own == {**before, "CapBnd": kept, "CapInh": 1 << kill, "CapAmb": 0}  # its own stay
    assert program == {"CapInh": 1 << kill, "CapPrm": kept, "CapEff": kept, "CapBnd": kept, "CapAmb": 0}


@pytest.mark.requires("root")
def test_mask_kernel_files_guards_proc_and_sysfs(tmp_path: pathlib.Path) -> None:
    kernel = str(tmp_path)

    def mask() -> dict[str, object]:
        syscalls.unshare(syscalls.CLONE_NEWNS)  # the child's own mounts, gone when it exits
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        for name, fstype in (("proc", "proc"), ("sys", "sysfs")):
            os.mkdir(f"{kernel}/{name}")
            syscalls.mount(name, f"{kernel}/{name}", fstype, syscalls.MS_NOSUID | syscalls.MS_NODEV)
        made = rootfs.mask_kernel_files(kernel, "/dev/null")
        with open(f"{kernel}/proc/timer_list", "rb") as handle:
            timer_list = handle.read()
        try:
            with open(f"{kernel}/proc/sys/vm/swappiness", "r+") as handle:
                handle.write(handle.read())  # the value it has: harmless, were it allowed
            written = "written"
        except OSError as exc:
            written = os.strerror(exc.errno or 0)
        acpi = os.listdir(f"{kernel}/proc/acpi") if os.path.isdir(f"{kernel}/proc/acpi") else []
        return {"made": made, "timer_list": len(timer_list), "written": written, "acpi": acpi}

    result = in_child(mask)
    assert isinstance(result, dict)
    names = [
        name
        for name in rootfs._READ_ONLY + rootfs._MASKED_FILES + rootfs._MASKED_DIRS
        if os.path.exists(f"/{name}")
    ]
    assert result["made"] == [f"{kernel}/{name}" for name in names]
    assert (result["timer_list"], result["written"], result["acpi"]) == (0, "Read-only file system", [])
    assert not os.path.ismount(f"{kernel}/proc")  # nothing of it reached this process
