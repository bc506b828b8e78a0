"""BoxFiles on a plain directory standing in for a box root: paths never leave that root."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from pytest_nsbox.boxfs import BoxFiles, _relative


@pytest.fixture
def box_root(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text("ID=box\n")
    return root


@pytest.fixture
def files(box_root: pathlib.Path) -> Iterator[BoxFiles]:
    fd = os.open(box_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield BoxFiles(fd)
    finally:
        os.close(fd)


@pytest.fixture
def host_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """A host file outside the box root that an escaping path would reach."""
    target = tmp_path / "host" / "secret"
    target.parent.mkdir()
    target.write_text("host secret")
    return target


@pytest.mark.parametrize(
    ("path", "expected"), [("/etc/x", "etc/x"), ("etc/x", "etc/x"), ("/", "."), ("", ".")]
)
def test_relative_makes_box_paths_relative_to_the_root(path: str, expected: str) -> None:
    assert _relative(path) == expected


def test_read_bytes_reads_a_box_file(files: BoxFiles) -> None:
    assert files.read_bytes("/etc/os-release") == b"ID=box\n"


def test_exists(files: BoxFiles) -> None:
    assert files.exists("/etc/os-release")
    assert files.exists("/etc")
    assert files.exists("/")
    assert not files.exists("/etc/missing")
    assert not files.exists("/etc/os-release/not-a-dir")


def test_write_bytes_creates_and_truncates(files: BoxFiles, box_root: pathlib.Path) -> None:
    files.write_bytes("/etc/motd", b"a long first version")
    files.write_bytes("/etc/motd", b"short", mode=0o600)
    assert (box_root / "etc" / "motd").read_bytes() == b"short"


def test_write_bytes_applies_the_mode_to_a_new_file(files: BoxFiles, box_root: pathlib.Path) -> None:
    old = os.umask(0)
    try:
        files.write_bytes("/etc/key", b"k", mode=0o600)
    finally:
        os.umask(old)
    assert (box_root / "etc" / "key").stat().st_mode & 0o777 == 0o600


def test_write_bytes_makes_missing_parent_directories(files: BoxFiles, box_root: pathlib.Path) -> None:
    files.write_bytes("/srv/app/config/settings.ini", b"[app]\n")
    assert (box_root / "srv" / "app" / "config" / "settings.ini").read_bytes() == b"[app]\n"
    assert (box_root / "srv" / "app").is_dir()


def test_makedirs_creates_every_missing_component(files: BoxFiles, box_root: pathlib.Path) -> None:
    files.makedirs("/var/lib/app/data")
    files.makedirs("/var/lib/app/data")  # existing: fine
    assert (box_root / "var" / "lib" / "app" / "data").is_dir()


def test_missing_box_file_is_file_not_found_naming_the_box_path(files: BoxFiles) -> None:
    with pytest.raises(FileNotFoundError) as info:
        files.read_bytes("/etc/missing")
    assert info.value.filename == "/etc/missing"
    assert "(in the box)" in str(info.value)


def test_writing_over_a_directory_is_is_a_directory_error(files: BoxFiles) -> None:
    with pytest.raises(IsADirectoryError):
        files.write_bytes("/etc", b"x")


def test_read_through_an_absolute_symlink_stays_in_the_box(
    files: BoxFiles, box_root: pathlib.Path, host_file: pathlib.Path
) -> None:
    (box_root / "etc" / "link").symlink_to(host_file)
    assert not files.exists("/etc/link")
    with pytest.raises(OSError):
        files.read_bytes("/etc/link")


def test_read_through_an_absolute_symlink_reads_the_box_copy(files: BoxFiles, box_root: pathlib.Path) -> None:
    (box_root / "etc" / "link").symlink_to("/etc/os-release")
    assert files.read_bytes("/etc/link") == b"ID=box\n"


def test_dotdot_cannot_climb_out_of_the_box(files: BoxFiles, host_file: pathlib.Path) -> None:
    relative = os.path.relpath(host_file, "/")
    assert not files.exists("/../../../../../../" + relative)


def test_write_through_an_absolute_symlink_writes_the_box_copy(
    files: BoxFiles, box_root: pathlib.Path, host_file: pathlib.Path
) -> None:
    (box_root / "etc" / "link").symlink_to(host_file)
    (box_root / host_file.parent.relative_to("/")).mkdir(parents=True)
    files.write_bytes("/etc/link", b"box data")
    assert host_file.read_text() == "host secret"
    assert (box_root / host_file.relative_to("/")).read_bytes() == b"box data"


def test_write_through_a_dotdot_symlink_stays_in_the_box(
    files: BoxFiles, box_root: pathlib.Path, host_file: pathlib.Path
) -> None:
    # Resolved on the host, root/etc/../../host/secret is the host file.
    (box_root / "etc" / "rel").symlink_to("../../host/secret")
    assert (box_root / "etc" / "rel").resolve() == host_file
    (box_root / "host").mkdir()
    files.write_bytes("/etc/rel", b"box data")
    assert host_file.read_text() == "host secret"
    assert (box_root / "host" / "secret").read_bytes() == b"box data"


def test_write_missing_parents_under_an_escaping_symlink_stay_in_the_box(
    files: BoxFiles, box_root: pathlib.Path, host_file: pathlib.Path
) -> None:
    (box_root / "data").symlink_to(host_file.parent)  # absolute: the host's directory
    try:
        files.write_bytes("/data/new/file", b"box data")
    except OSError:
        pass  # refusing is fine too; escaping is not
    assert sorted(os.listdir(host_file.parent)) == ["secret"]


def test_write_through_a_symlinked_directory_stays_in_the_box(
    files: BoxFiles, box_root: pathlib.Path, host_file: pathlib.Path
) -> None:
    (box_root / "data").symlink_to(host_file.parent)  # absolute: the host's directory
    (box_root / host_file.parent.relative_to("/")).mkdir(parents=True)
    files.write_bytes("/data/secret", b"box data")
    assert host_file.read_text() == "host secret"
    assert (box_root / host_file.relative_to("/")).read_bytes() == b"box data"


def test_copy_in_a_file_into_a_directory(
    files: BoxFiles, box_root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    source = tmp_path / "app.conf"
    source.write_text("conf")
    source.chmod(0o640)
    files.copy_in(str(source), "/etc")
    copied = box_root / "etc" / "app.conf"
    assert copied.read_text() == "conf"
    assert copied.stat().st_mode & 0o777 == 0o640


def test_copy_out_a_tree_keeps_symlinks_as_links(
    files: BoxFiles, box_root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    (box_root / "etc" / "sub").mkdir()
    (box_root / "etc" / "sub" / "f").write_text("f")
    (box_root / "etc" / "abs").symlink_to("/etc/shadow")
    out = tmp_path / "out"
    files.copy_out("/etc", str(out))
    assert (out / "os-release").read_text() == "ID=box\n"
    assert (out / "sub" / "f").read_text() == "f"
    assert os.readlink(out / "abs") == "/etc/shadow"


# ------------------------------------------------------------------- logs: glob, read_tail


def test_glob_matches_within_the_box_and_never_on_the_host(
    files: BoxFiles, box_root: pathlib.Path, host_file: pathlib.Path
) -> None:
    (box_root / "srv" / "app").mkdir(parents=True)
    for name in ("a.log", "b.log", ".hidden.log", "notes.txt"):
        (box_root / "srv" / "app" / name).write_text(name)
    (box_root / "srv" / "app" / "escape.log").symlink_to(host_file)  # absolute: the box's own /tmp/...
    (box_root / "srv" / "out").symlink_to(host_file.parent)
    assert files.glob("/srv/app/*.log") == ["/srv/app/a.log", "/srv/app/b.log"]
    assert files.glob("/srv/*/.*.log") == ["/srv/app/.hidden.log"]
    assert files.glob("/srv/app/[ab].log") == ["/srv/app/a.log", "/srv/app/b.log"]
    assert files.glob("/srv/app/notes.txt") == ["/srv/app/notes.txt"]
    assert files.glob("/srv/app/missing.log") == [] and files.glob("/nowhere/*.log") == []
    assert files.glob("/srv/out/*") == []  # the host directory the link names is not the box's


def test_read_tail_reads_the_end_of_a_file_and_says_its_size(files: BoxFiles, box_root: pathlib.Path) -> None:
    (box_root / "big.log").write_bytes(b"x" * 100_000 + b"\nlast\n")
    assert files.read_tail("/big.log", 10) == (b"\nlast\n"[-10:].rjust(10, b"x"), 100_006)
    assert files.read_tail("/etc/os-release", 1000) == (b"ID=box\n", 7)


def test_read_tail_refuses_what_is_not_a_regular_file(files: BoxFiles, box_root: pathlib.Path) -> None:
    os.mkfifo(box_root / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        files.read_tail("/fifo", 10)  # refused without waiting for a writer
    with pytest.raises(IsADirectoryError):
        files.read_tail("/etc", 10)
