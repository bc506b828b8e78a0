"""Pure helpers of the box's init: overlay option escaping, /etc/hosts, PATH lookup, users."""

from __future__ import annotations

import errno
import os
import pathlib
import pwd

import pytest

from pytest_nsbox import init
from pytest_nsbox.init import escape_overlay_path, find_program, hosts_file, resolve_user

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
    assert resolve_user(54321) == (54321, 54321, [], "/")


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
def test_resolve_user_with_a_group_name() -> None:
    assert resolve_user("app:staff") == (1001, 50, [50, 999], "/srv/app")


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
