"""An append-only journal: each line of stdin becomes one record, appended to the journal
file and flushed to disk before the next is read.

When the disk fills up, a record may have been half written. The journal must then cut
that torn record off, keep every complete record (including those written by earlier runs),
report how many records it committed, and exit 75 (EX_TEMPFAIL) so the caller can retry later.

    producer | python3 journal.py /var/lib/app/journal
"""

import errno
import os
import sys


def append(fd: int, data: bytes) -> None:
    """Write all of ``data`` (a full disk can cut a write short) and flush it to the disk."""
    while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)


def main() -> None:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    committed = 0
    for line in sys.stdin.buffer:
        end = os.lseek(fd, 0, os.SEEK_END)  # where this record starts
        try:
            append(fd, line)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            os.ftruncate(fd, end)  # drop the torn record
            print(f"journal: disk full, {committed} records committed", file=sys.stderr)
            sys.exit(75)
        committed += 1
    os.close(fd)
    print(f"journal: {committed} records committed", file=sys.stderr)


if __name__ == "__main__":
    main()
