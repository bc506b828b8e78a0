"""The first test anyone writes: a fresh machine per test, thrown away afterwards."""

import pytest


@pytest.mark.nsbox(hostname="web", env={"APP_ENV": "test"})
def test_a_box_is_a_small_machine_of_its_own(nsbox):
    assert nsbox.run("hostname").stdout == "web\n"
    assert nsbox.run("echo $APP_ENV").stdout == "test\n"
    assert nsbox.run("ps -o pid= -p 1 -o comm=").stdout.split() == ["1", "nsbox-init"]

    nsbox.write_text("/etc/app.conf", "debug = true\n")
    result = nsbox.run(["grep", "-c", "debug", "/etc/app.conf"], check=True)
    assert result.stdout == "1\n"


def test_breaking_the_box_breaks_nothing_else(nsbox):
    nsbox.run("rm -rf /etc/ssl /usr/share/doc")
    assert not nsbox.exists("/etc/ssl")
    # The next test's box, and the host, still have them: each box has its own throwaway layer.
