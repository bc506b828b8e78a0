"""A tiny append-only log store: records framed with their length and CRC-32, each made
durable (fsync) before it is acknowledged.

    python3 logstore.py append LOG RECORD...   append each RECORD; print "ack RECORD" once it is
                                               on the disk; exit 0
    python3 logstore.py fill LOG PREFIX [SIZE] append PREFIX-1, PREFIX-2, ... (padded with "."
                                               to SIZE bytes) until stopped or refused
    python3 logstore.py read LOG               print every whole record, one a line; a torn
                                               record at the end (a crash mid-write) is left out

A record on the disk is an 8-byte header (the payload's length and its CRC-32, big-endian)
and the payload. A write that fails (EIO from a failing disk, ENOSPC from a full one) is
never acknowledged: the store cuts the file back to where the record began, as far as the
disk lets it, says "error: append RECORD: <what failed>" on stderr and exits 74 (EX_IOERR).
`read` stops at the first record that is short or fails its CRC: what follows it was never
acknowledged.
"""

import errno
import os
import struct
import sys
import zlib

HEADER = struct.Struct(">II")  # length, crc32
EX_IOERR = 74


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def append(fd: int, payload: bytes) -> None:
    """Write the whole record and fsync it; on a failure, cut off what got written."""
    start = os.lseek(fd, 0, os.SEEK_END)
    data = frame(payload)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], start + written)
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, start)  # no half record left for the next append to follow
            os.fsync(fd)
        except OSError:
            pass  # the disk refuses that too: `read` stops at the torn record
        raise


def records(path: str) -> list[bytes]:
    """Every whole record, in order, up to the first torn or damaged one."""
    with open(path, "rb") as handle:
        data = handle.read()
    found = []
    offset = 0
    while offset + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, offset)
        payload = data[offset + HEADER.size : offset + HEADER.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        found.append(payload)
        offset += HEADER.size + length
    return found


def payloads(argv: list[str]):  # type: ignore[no-untyped-def]
    if argv[0] == "fill":
        size = int(argv[3]) if len(argv) > 3 else 0
        number = 0
        while True:
            number += 1
            yield f"{argv[2]}-{number}".ljust(size, ".")
    yield from argv[2:]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("append", "fill", "read"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "read":
        try:
            for payload in records(argv[1]):
                print(payload.decode().rstrip("."))
        except FileNotFoundError:
            pass  # nothing appended yet
        return 0
    fd = os.open(argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    for record in payloads(argv):
        try:
            append(fd, record.encode())
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "?")
            print(f"error: append {record.rstrip('.')}: {exc.strerror} ({name})", file=sys.stderr)
            return EX_IOERR
        print(f"ack {record.rstrip('.')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
