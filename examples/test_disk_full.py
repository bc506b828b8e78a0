"""A program that fills the disk must say so cleanly and lose nothing it had written.

The box has a 1 MiB tmpfs at /var/lib/app (the marker's `tmpfs=`), so the disk is full in a
millisecond and nothing else is harmed. apps/journal.py appends records to a journal that
already holds an earlier run's records; at ENOSPC it must cut off the half-written record,
report how many it committed and exit 75, and every record written before must still be there,
byte for byte.
"""

from pathlib import Path

import pytest

APP = Path(__file__).parent / "apps" / "journal.py"
pytestmark = pytest.mark.needs_programs("python3")
JOURNAL = "/var/lib/app/journal"


def record(number):
    return f"order {number:06d} " + "x" * 300 + "\n"  # 314 bytes: a record can straddle the end


@pytest.mark.nsbox(tmpfs={"/var/lib/app": "1M"})
def test_journal_reports_a_full_disk_and_keeps_every_complete_record(nsbox):
    nsbox.copy_in(APP, "/opt/app/journal.py")
    earlier = "".join(record(n) for n in range(100))
    nsbox.write_text(JOURNAL, earlier)  # an earlier run's records

    incoming = "".join(record(n) for n in range(100, 10_000))  # about 3 MB: far more than fits
    result = nsbox.run(["python3", "/opt/app/journal.py", JOURNAL], input=incoming, timeout=60)

    assert result.returncode == 75, (
        f"expected exit 75 at a full disk, got {result.returncode}:\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr
    committed = int(result.stderr.split("disk full, ")[1].split()[0])
    journal = nsbox.read_text(JOURNAL)
    assert journal.startswith(earlier), "records written before the disk filled up were lost"
    assert journal.endswith("\n"), "a torn record was left at the end of the journal"
    assert journal == earlier + "".join(record(n) for n in range(100, 100 + committed))
