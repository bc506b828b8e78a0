"""A Debian package tested where it will be installed: a real Debian image.

Run with `pytest examples/test_debian_image.py --nsbox-image debian.tar`; make the archive with
`docker save debian:bookworm -o debian.tar` (or podman save, skopeo copy, or mmdebstrap: see the
README's "Images"). Without --nsbox-image the boxes run the host's own /, and these tests skip.

The package under test, greet-service, is built in the box with dpkg-deb: a program, and
maintainer scripts that create its system user on install and remove it, and its state, on
purge. dpkg runs them as it would on a server, and the box's overlay shows what is left.
"""

import pytest

CONTROL = """\
Package: greet-service
Version: 1.0
Architecture: all
Maintainer: Example <example@example.org>
Description: says hello, as a service
"""
POSTINST = """\
#!/bin/sh
set -e
if [ "$1" = configure ] && ! getent passwd greet >/dev/null; then
    useradd --system --home-dir /var/lib/greet --create-home --shell /usr/sbin/nologin greet
fi
"""
POSTRM = """\
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    userdel greet
    rm -rf /var/lib/greet
fi
"""
ACCOUNTS = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")


@pytest.fixture
def debian(nsbox):
    if nsbox.image.reference == "host /":
        pytest.skip(
            "needs a Debian image: --nsbox-image debian.tar (docker save debian:bookworm -o debian.tar)"
        )
    if not nsbox.exists("/etc/debian_version"):
        pytest.skip(f"{nsbox.image.reference} is not a Debian image")
    return nsbox


@pytest.fixture
def package(debian):
    """greet-service_1.0_all.deb, built in the box; returns its path there."""
    debian.write_text("/build/greet/DEBIAN/control", CONTROL)
    debian.write_text("/build/greet/DEBIAN/postinst", POSTINST, mode=0o755)
    debian.write_text("/build/greet/DEBIAN/postrm", POSTRM, mode=0o755)
    debian.write_text("/build/greet/usr/bin/greet", "#!/bin/sh\necho hello from $(id -un)\n", mode=0o755)
    debian.run(["dpkg-deb", "--root-owner-group", "--build", "/build/greet", "/build/greet.deb"], check=True)
    return "/build/greet.deb"


def test_the_package_installs_its_program_and_its_user(debian, package):
    debian.run(["dpkg", "--install", package], check=True)

    status = debian.run(["dpkg-query", "--show", "--showformat", "${Status}", "greet-service"])
    assert status.stdout == "install ok installed"
    assert debian.run(["greet"], user="greet").stdout == "hello from greet\n"
    assert debian.run(["stat", "-c", "%U", "/var/lib/greet"]).stdout == "greet\n"


def test_purging_the_package_removes_its_files_and_its_user(debian, package, overlay_root):
    accounts = {path: debian.read_text(path) for path in ACCOUNTS}

    debian.run(["dpkg", "--install", package], check=True)
    debian.run(["dpkg", "--purge", "greet-service"], check=True)

    assert {path: debian.read_text(path) for path in ACCOUNTS} == accounts, "the greet user is still there"
    left = [
        path
        for path in overlay_root.diff().added
        if not path.startswith(("/build", "/var/lib/dpkg/", "/var/log/"))  # the test's, dpkg's records
        and not path.endswith("-")  # /etc/shadow- and the like: backups useradd and userdel keep
    ]
    assert left == [], f"the purge left these behind: {left}"
