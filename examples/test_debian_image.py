"""A test against a real distribution image: run with `pytest --nsbox-image debian.tar`.

Make the archive with `docker save debian:bookworm -o debian.tar` (or podman save, skopeo copy,
or mmdebstrap). Without --nsbox-image the boxes run the host's own /, and this test skips.
"""

import pytest


@pytest.fixture
def debian(nsbox):
    if not nsbox.exists("/etc/debian_version") or nsbox.image.lowers == ("/",):
        pytest.skip("needs --nsbox-image with a Debian image (docker save debian:bookworm -o debian.tar)")
    return nsbox


def test_the_package_database_is_the_images(debian):
    packages = debian.run(["dpkg-query", "-W", "-f", "${Package}\\n"], check=True).stdout.split()
    assert "dpkg" in packages and "apt" in packages


def test_adding_a_user_touches_only_what_it_should(debian, overlay_root):
    debian.run(["useradd", "--create-home", "app"], check=True)

    changes = overlay_root.diff()
    assert "/home/app" in changes.added
    assert {"/etc/passwd", "/etc/shadow", "/etc/group"} <= set(changes.modified)
    assert debian.run("id -un", user="app").stdout == "app\n"
