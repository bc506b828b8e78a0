"""A real Debian image: `pytest --nsbox-image debian.tar` as a user runs it."""

from __future__ import annotations

import hashlib
import os

import pytest

from pytest_nsbox import Box
from pytest_nsbox.image import load_image

pytestmark = pytest.mark.requires("boxes")

INNER_TESTS = """
import pytest

def test_it_is_debian_12(nsbox):
    assert nsbox.run("cat /etc/debian_version").stdout.startswith("12.")
    assert "bookworm" in nsbox.read_text("/etc/os-release")

def test_dpkg_knows_the_images_packages(nsbox):
    listing = nsbox.run(["dpkg-query", "-W"], check=True).stdout
    packages = dict(line.split("\\t") for line in listing.splitlines())
    assert {"bash", "coreutils", "dpkg", "apt", "passwd"} <= set(packages)
    assert len(packages) > 50

def test_passwd_keeps_its_setuid_bit(nsbox):
    assert nsbox.run(["stat", "-c", "%a %U", "/usr/bin/passwd"]).stdout == "4755 root\\n"

def test_a_user_is_created_and_used(nsbox):
    nsbox.run(["useradd", "--create-home", "tester"], check=True)
    assert nsbox.run("id -un; echo $HOME", user="tester").stdout == "tester\\n/home/tester\\n"

@pytest.mark.nsbox(hostname="deb")
def test_the_host_is_not_in_this_box(nsbox):
    assert nsbox.run("hostname").stdout == "deb\\n"
    assert not nsbox.exists("/work")
"""


def test_nsbox_image_option_boots_debian(
    pytester: pytest.Pytester, debian_archive: str, debian_cache: str
) -> None:
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess(
        f"--nsbox-image={debian_archive}#debian:bookworm",
        f"--nsbox-cache={debian_cache}",
        "--nsbox-strict",
        "-p",
        "no:cacheprovider",
        timeout=600,
    )
    result.assert_outcomes(passed=5)


def _tree_digest(root: str) -> str:
    digest = hashlib.sha256()
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            info = os.lstat(path)
            digest.update(
                f"{os.path.relpath(path, root)} {info.st_mode} {info.st_uid} {info.st_gid}".encode()
            )
            digest.update(f" {info.st_size} {info.st_mtime_ns} {info.st_rdev}\n".encode())
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as handle:
                    digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def test_rm_rf_root_in_debian_leaves_the_layer_byte_identical(debian_archive: str, debian_cache: str) -> None:
    image = load_image(debian_archive, debian_cache)
    before = [_tree_digest(lower) for lower in image.lowers]
    with Box(image=debian_archive, cache=debian_cache) as box:
        box.run("rm -rf --no-preserve-root / 2>/dev/null; true", timeout=300)
        assert not box.exists("/usr/bin/dpkg")
        deleted = box.root.diff().deleted if box.root else []
        # what rm could remove is reported as deleted (mount points such as /etc/hosts stay)
        assert "/etc/apt" in deleted and any(path.startswith("/usr") for path in deleted)
    assert [_tree_digest(lower) for lower in image.lowers] == before
    with Box(image=debian_archive, cache=debian_cache) as fresh:
        assert fresh.run(["dpkg-query", "-W", "bash"], check=True).stdout.startswith("bash\t")
