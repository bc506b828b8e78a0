"""The file helpers reach the box's files, and never the host's through a box symlink."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from pytest_nsbox import Box

pytestmark = pytest.mark.requires("boxes")


def test_write_then_read_text_and_bytes(nsbox: Box) -> None:
    nsbox.write_text("/srv/app/config.ini", "[main]\nmode = test\n")
    assert nsbox.run("cat /srv/app/config.ini").stdout == "[main]\nmode = test\n"
    assert nsbox.run("stat -c %a /srv/app/config.ini").stdout == "644\n"
    nsbox.run("printf '\\001\\002' > /tmp/blob", check=True)
    assert nsbox.read_bytes("/tmp/blob") == b"\x01\x02"
    nsbox.write_bytes("/usr/local/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
    assert nsbox.run(["tool"]).stdout == "tool\n"
    assert nsbox.read_text("/etc/hostname") == "box\n"


def test_exists(nsbox: Box) -> None:
    assert nsbox.exists("/etc/passwd")
    assert not nsbox.exists("/etc/no-such-file")
    nsbox.run("rm /etc/passwd", check=True)
    assert not nsbox.exists("/etc/passwd")
    assert os.path.exists("/etc/passwd")


def test_box_symlinks_cannot_redirect_writes_to_the_host(nsbox: Box) -> None:
    host_target = f"/tmp/nsbox-escape-{secrets.token_hex(4)}"
    nsbox.run(["ln", "-s", host_target, "/tmp/evil"], check=True)
    nsbox.run(["ln", "-s", "../../../../../../tmp", "/srv/up"], check=True)
    nsbox.write_text("/tmp/evil", "written through a symlink\n")
    nsbox.write_text(f"/srv/up/{os.path.basename(host_target)}-2", "via dotdot\n")
    assert not os.path.exists(host_target)
    assert not os.path.exists(host_target + "-2")
    assert nsbox.run(["cat", host_target]).stdout == "written through a symlink\n"
    assert nsbox.run(["cat", host_target + "-2"]).stdout == "via dotdot\n"


def test_copy_in_and_out_a_file_and_a_tree(nsbox: Box, tmp_path: Path) -> None:
    source = tmp_path / "project"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (source / "run.sh").write_text("#!/bin/sh\necho run\n")
    (source / "run.sh").chmod(0o755)
    os.symlink("pkg/mod.py", source / "link.py")
    nsbox.copy_in(source, "/opt")
    assert nsbox.run(["/opt/project/run.sh"]).stdout == "run\n"
    assert nsbox.run("cat /opt/project/pkg/mod.py; readlink /opt/project/link.py").stdout == (
        "VALUE = 1\npkg/mod.py\n"
    )
    nsbox.copy_in(source / "run.sh", "/usr/local/bin/run-it")
    assert nsbox.run(["run-it"]).stdout == "run\n"

    nsbox.run("mkdir -p /out/sub && echo a > /out/a && echo b > /out/sub/b && ln -s /etc/shadow /out/s")
    nsbox.copy_out("/out", tmp_path / "back")
    assert (tmp_path / "back" / "a").read_text() == "a\n"
    assert (tmp_path / "back" / "sub" / "b").read_text() == "b\n"
    assert os.readlink(tmp_path / "back" / "s") == "/etc/shadow"  # copied as a link, not followed
    nsbox.copy_out("/out/a", tmp_path)
    assert (tmp_path / "a").read_text() == "a\n"


def test_host_path_reaches_the_merged_root(nsbox: Box) -> None:
    nsbox.write_text("/root/note", "hello\n")
    path = nsbox.host_path("/root/note")
    assert path.startswith(f"/proc/{nsbox.pid}/root/")
    with open(path) as handle:
        assert handle.read() == "hello\n"


def test_host_path_resolves_box_symlinks_inside_the_box(nsbox: Box) -> None:
    nsbox.run("mkdir -p /srv/real && echo box > /srv/real/passwd && ln -s /srv/real /srv/abs", check=True)
    nsbox.run("ln -s ../../../../../../etc /srv/up", check=True)
    path = nsbox.host_path("/srv/abs/passwd")
    assert path == f"/proc/{nsbox.pid}/root/srv/real/passwd"
    assert open(path).read() == "box\n"
    assert nsbox.host_path("/srv/up/passwd") == f"/proc/{nsbox.pid}/root/etc/passwd"


def test_copy_out_replaces_files_drops_setuid_and_never_writes_through_a_host_link(
    nsbox: Box, tmp_path: Path
) -> None:
    nsbox.run("mkdir -p /out && echo new > /out/a && cp /bin/true /out/tool && chmod 4755 /out/tool")
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    back = tmp_path / "back"
    (back / "out").mkdir(parents=True)
    os.symlink(victim, back / "out" / "a")  # a host symlink where the copy writes
    nsbox.copy_out("/out", back)  # into back/out, over what is there
    assert victim.read_text() == "untouched\n"
    assert not os.path.islink(back / "out" / "a") and (back / "out" / "a").read_text() == "new\n"
    assert os.stat(back / "out" / "tool").st_mode & 0o7777 == 0o755


def test_file_helpers_follow_relative_symlinks_while_mounts_change(nsbox: Box) -> None:
    """A lookup that meets ``..`` inside the box (``/etc/os-release -> ../usr/lib/os-release``)
    is refused by the kernel with EAGAIN whenever a mount changes anywhere meanwhile; other
    boxes starting and stopping do that all the time, and the helpers must retry, not fail."""
    nsbox.write_text("/srv/target", "found\n")
    nsbox.run("mkdir -p /srv/dir && ln -s ../target /srv/dir/link", check=True)
    churn = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", "while :; do mount -t tmpfs churn /mnt; umount /mnt; done"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(3000):
            assert nsbox.read_text("/srv/dir/link") == "found\n"
    finally:
        churn.kill()
        churn.wait()
