"""An installer must change exactly what it says it does, and nothing else.

`overlay_root.diff()` reads the box's overlay upper layer: every file the installer added,
modified or deleted, compared with the image. apps/install.sh is fed to `sh` on stdin, as a
`curl ... | sh` installer would be, so the test itself leaves no file behind; anything else in
the diff (a temporary directory it forgot, a config it clobbered) is the installer's doing.
"""

from pathlib import Path

import pytest

INSTALLER = (Path(__file__).parent / "apps" / "install.sh").read_text()
INSTALLED = ["/etc/greet", "/etc/greet/greet.conf", "/usr/local/bin/greet", "/var/lib/greet"]


@pytest.fixture
def install(nsbox):
    def run():
        result = nsbox.run(["sh", "-s"], input=INSTALLER)
        assert result.returncode == 0, result.stderr
        return result

    return run


def test_installer_adds_exactly_its_files(nsbox, overlay_root, install):
    install()

    changes = overlay_root.diff()
    assert changes.added == INSTALLED, f"the installer left or added something else:\n{changes.summary()}"
    assert changes.modified == [] and changes.deleted == []
    assert nsbox.run(["greet", "tests"]).stdout == "Hello, tests\n"


def test_running_the_installer_twice_changes_nothing_more(nsbox, overlay_root, install):
    install()
    first = {path: nsbox.read_bytes(path) for path in INSTALLED if not path.endswith(("greet", "/greet"))}

    install()

    assert overlay_root.diff().added == INSTALLED
    assert {path: nsbox.read_bytes(path) for path in first} == first


def test_an_upgrade_keeps_the_administrators_configuration(nsbox, overlay_root, install):
    nsbox.write_text("/etc/greet/greet.conf", "greeting=Howdy\n")

    output = install().stdout

    assert nsbox.read_text("/etc/greet/greet.conf") == "greeting=Howdy\n", (
        "the installer overwrote the config"
    )
    assert "kept your /etc/greet/greet.conf" in output
    assert "/etc/greet/greet.conf.new" in overlay_root.diff().added
    assert nsbox.run(["greet"]).stdout == "Howdy, world\n"
