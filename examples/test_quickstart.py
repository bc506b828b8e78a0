"""The README's first example: a box of its own for one test, with a size-capped disk.

`@pytest.mark.nsbox(...)` configures the test's box; here a 1 MiB tmpfs at /data, so the
disk is full after a megabyte. The box's root is a throwaway layer over the image: the test
can break anything in it, and no other test (nor the host) sees the damage.
"""

import pytest


@pytest.mark.nsbox(hostname="web", tmpfs={"/data": "1M"})
def test_writer_survives_a_full_disk(nsbox):
    result = nsbox.run("dd if=/dev/zero of=/data/blob bs=64k count=100")
    assert "No space left on device" in result.stderr
    assert nsbox.run("hostname").stdout == "web\n"
    nsbox.run("rm -rf --no-preserve-root /etc")  # harms nothing outside this box
    assert not nsbox.exists("/etc/passwd")


def test_the_next_box_starts_clean(nsbox):
    assert nsbox.exists("/etc/passwd")
    assert nsbox.run("hostname").stdout == "box\n"
