"""`nsbox shell`'s choices made from the box's files: its login shell, its terminal device."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from pytest_nsbox import terminal
from pytest_nsbox.boxfs import BoxFiles
from pytest_nsbox.errors import BoxError
from pytest_nsbox.shell import _open_pty, login_shell


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    box = tmp_path / "root"
    for directory in ("etc", "bin", "home/boss", "dev/pts"):
        (box / directory).mkdir(parents=True)
    for name in ("sh", "bash"):
        (box / "bin" / name).write_text("#!\n")
        (box / "bin" / name).chmod(0o755)
    return box


@pytest.fixture
def files(root: pathlib.Path) -> Iterator[BoxFiles]:
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield BoxFiles(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("passwd", "expected"),
    [
        ("root:x:0:0:root:/home/boss:/bin/bash\n", ("/home/boss", "/bin/bash")),
        ("app:x:1000:1000::/app:/bin/sh\nadmin:x:0:0::/home/boss:/bin/bash\n", ("/home/boss", "/bin/bash")),
        ("root:x:0:0:root:/root:/bin/bash\ntoor:x:0:0::/:/bin/sh\n", ("/root", "/bin/bash")),  # the first
        ("root:x:0:0:root::/bin/bash\n", ("/root", "/bin/bash")),  # no home: /root
        ("root:x:0:0:root:/root:/bin/zsh\n", ("/root", "/bin/sh")),  # not in the box
        ("root:x:0:0:root:/root:/etc\n", ("/root", "/bin/sh")),  # a directory
        ("root:x:0:0:root:/root:/etc/passwd\n", ("/root", "/bin/sh")),  # not executable
        ("root:x:0:0:root:/root:bin/bash\n", ("/root", "/bin/sh")),  # not absolute
        ("root:x:0:0:root:/root\n", ("/root", "/bin/sh")),  # no shell field
        ("app:x:1000:1000::/app:/bin/bash\n", ("/root", "/bin/sh")),  # no root
    ],
)
def test_the_login_shell_is_roots_from_the_boxs_passwd(
    root: pathlib.Path, files: BoxFiles, passwd: str, expected: tuple[str, str]
) -> None:
    (root / "etc" / "passwd").write_text(passwd)
    assert login_shell(files) == expected


def test_without_a_passwd_file_the_login_shell_is_bin_sh(files: BoxFiles) -> None:
    assert login_shell(files) == ("/root", "/bin/sh")


def test_the_shell_is_looked_up_inside_the_box(
    root: pathlib.Path, files: BoxFiles, tmp_path: pathlib.Path
) -> None:
    """An absolute symlink is the box's: /bin/bash -> /usr/bin/bash is found in the box, and a
    shell named only on the host does not count."""
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin" / "bash").unlink()
    (root / "bin" / "bash").symlink_to("/usr/bin/bash")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert login_shell(files) == ("/root", "/bin/sh"), "/usr/bin/bash is not in the box"
    (root / "usr" / "bin" / "bash").write_text("#!\n")
    (root / "usr" / "bin" / "bash").chmod(0o755)
    assert login_shell(files) == ("/root", "/bin/bash")


def test_a_passwd_that_is_not_a_file_is_not_read(root: pathlib.Path, files: BoxFiles) -> None:
    """A box could make it a FIFO: opening it must not hang `nsbox shell`."""
    os.mkfifo(root / "etc" / "passwd")
    assert login_shell(files) == ("/root", "/bin/sh")


def test_a_passwd_link_to_a_host_file_is_the_boxs(
    root: pathlib.Path, files: BoxFiles, tmp_path: pathlib.Path
) -> None:
    host = tmp_path / "host-passwd"
    host.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "passwd").symlink_to(f"../../{host.name}")  # climbs out: held at the box's root
    assert login_shell(files) == ("/root", "/bin/sh")


def test_only_the_pseudo_terminal_multiplexer_is_opened_as_the_boxs_pty(
    root: pathlib.Path, files: BoxFiles
) -> None:
    (root / "dev" / "pts" / "ptmx").write_text("")  # a box process may put anything there
    with pytest.raises(OSError, match="not the pseudo-terminal multiplexer"):
        terminal.open_box_pty(files)
    with pytest.raises(BoxError, match=r"cannot open a terminal in its /dev/pts.*pipe as stdin"):
        _open_pty(files, "48d05e31")


def test_a_pty_pair_from_a_devpts(tmp_path: pathlib.Path) -> None:
    """Through a root whose /dev/pts is the host's devpts: a working pair, the slave by descriptor."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        master, slave = terminal.open_box_pty(BoxFiles(fd))
    finally:
        os.close(fd)
    try:
        assert os.isatty(slave) and os.ttyname(slave).startswith("/dev/pts/")
        os.write(slave, b"hello\n")
        assert os.read(master, 100) == b"hello\r\n"
        assert not os.get_inheritable(master) and not os.get_inheritable(slave)
    finally:
        os.close(master)
        os.close(slave)
