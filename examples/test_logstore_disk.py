"""An append-only log store on a real disk: what it acknowledged must survive a power cut, a
failing disk must get an error and not a damaged log, and a full one a clean ENOSPC.

The box has a 16 MiB ext4 disk at /var/lib/log (`disks=`). apps/logstore.py frames each
record with its length and CRC-32 and fsyncs it before printing "ack". `disk.power_cut()`
loses whatever had not reached the disk and boots the box again on it; `disk.fail()` makes
every I/O fail with EIO until `disk.heal()`. Both need device-mapper in the kernel (dm-mod):
without it those tests skip and say so.
"""

from pathlib import Path

import pytest

from pytest_nsbox import devmapper

APP = Path(__file__).parent / "apps" / "logstore.py"
LOG = "/var/lib/log/records"
pytestmark = [pytest.mark.needs_programs("python3"), pytest.mark.nsbox(disks={"/var/lib/log": "16M"})]


@pytest.fixture
def store(nsbox):
    missing = devmapper.unavailable()
    if missing is not None:
        pytest.skip(f"disk faults need device-mapper: {missing}")
    nsbox.copy_in(APP, "/opt/logstore.py")
    return nsbox


def logstore(box, *args, **kwargs):
    return box.run(["python3", "/opt/logstore.py", *args], **kwargs)


def acknowledged(output):
    return [line.split()[1] for line in output.splitlines() if line.startswith("ack ")]


def test_every_acknowledged_record_survives_a_power_cut(store):
    writer = store.spawn(["python3", "/opt/logstore.py", "fill", LOG, "order", "3000"])
    writer.wait_for_output(r"ack order-200\n")  # the writer goes on while the power goes
    store.disk("/var/lib/log").power_cut()

    acked = acknowledged(writer.stdout)
    kept = logstore(store, "read", LOG, check=True).stdout.split()
    assert kept[: len(acked)] == acked, "acknowledged records were lost in the power cut"
    assert len(kept) <= len(acked) + 1  # at most the one written but not yet acknowledged
    logstore(store, "append", LOG, "after-the-cut", check=True)
    assert logstore(store, "read", LOG).stdout.split()[-1] == "after-the-cut"


def test_a_failing_disk_gets_an_error_and_keeps_the_log_whole(store):
    logstore(store, "append", LOG, "one", "two", check=True)
    disk = store.disk("/var/lib/log")
    disk.fail()
    failed = logstore(store, "append", LOG, "three")
    assert failed.returncode == 74, f"expected exit 74 (EX_IOERR), got {failed.returncode}:\n{failed.stderr}"
    assert "Traceback" not in failed.stderr
    assert "error: append three: Input/output error (EIO)" in failed.stderr
    assert "ack three" not in failed.stdout

    disk.heal()
    disk.power_cut()  # a reboot: the log as the disk holds it
    assert logstore(store, "read", LOG, check=True).stdout.split() == ["one", "two"]


def test_a_full_disk_gets_enospc_and_keeps_every_acknowledged_record(nsbox):
    nsbox.copy_in(APP, "/opt/logstore.py")
    filled = logstore(nsbox, "fill", LOG, "blob", "65536", timeout=120)
    assert filled.returncode == 74, (
        f"expected exit 74 at a full disk, got {filled.returncode}:\n{filled.stderr}"
    )
    assert "No space left on device (ENOSPC)" in filled.stderr
    acked = acknowledged(filled.stdout)
    assert 100 < len(acked) < 256  # 16 MiB of 64 KiB records, less the filesystem's own
    assert logstore(nsbox, "read", LOG, check=True).stdout.split() == acked
    size = int(nsbox.run(["stat", "-c", "%s", LOG], check=True).stdout)
    assert size == len(acked) * (8 + 65536), "a torn record was left at the end of the log"
