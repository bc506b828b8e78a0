"""A program that must report a full disk cleanly and keep what it already wrote.

The box gets a 1 MiB tmpfs at /data, so filling the disk takes a millisecond and harms
nothing. The program under test is a tiny log writer, written in the box's Python.
"""

import sys

import pytest

LOG_WRITER = r"""
import errno, sys
written = 0
try:
    with open("/data/app.log", "w") as log:
        while True:
            log.write("x" * 1023 + "\n")
            log.flush()
            written += 1
except OSError as exc:
    if exc.errno != errno.ENOSPC:
        raise
    print(f"disk full after {written} records", file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.nsbox(tmpfs={"/data": "1M"})
def test_log_writer_reports_enospc_and_keeps_complete_records(nsbox):
    result = nsbox.run([sys.executable, "-c", LOG_WRITER], timeout=60)

    assert result.returncode == 3, result.stderr
    assert "disk full after" in result.stderr
    records = int(result.stderr.split()[3])
    lines = nsbox.read_text("/data/app.log").splitlines()
    assert len(lines) >= records > 0
    assert all(line == "x" * 1023 for line in lines[:records])
