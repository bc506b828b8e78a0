"""I/O counters of a box's cgroup: summed over the box's disks only when it has some (a
device-mapper device's I/O is counted again on the loop device under it)."""

from __future__ import annotations

from pathlib import Path

from pytest_nsbox.cgroups import v1, v2

IO_STAT = (
    "253:0 rbytes=4096 wbytes=4194304 rios=1 wios=32 dbytes=0 dios=0\n"
    "7:3 rbytes=4096 wbytes=4194304 rios=1 wios=32 dbytes=0 dios=0\n"
    "8:0 rbytes=100 wbytes=200 rios=3 wios=4 dbytes=0 dios=0\n"
)


def test_v2_counts_every_device_without_disks_and_the_disks_only_with_them() -> None:
    assert v2._io_stats(IO_STAT) == {
        "io_read_bytes": 8292,
        "io_write_bytes": 8388808,
        "io_read_ops": 5,
        "io_write_ops": 68,
    }
    assert v2._io_stats(IO_STAT, ("253:0",)) == {
        "io_read_bytes": 4096,
        "io_write_bytes": 4194304,
        "io_read_ops": 1,
        "io_write_ops": 32,
    }


def test_v1_throttle_counters_are_filtered_alike(tmp_path: Path) -> None:
    blkio = tmp_path / "blkio" / "pytest-nsbox" / "nsb-x"
    blkio.mkdir(parents=True)
    (blkio / "blkio.throttle.io_service_bytes_recursive").write_text(
        "253:0 Read 4096\n253:0 Write 4194304\n7:3 Read 4096\n7:3 Write 4194304\nTotal 8396800\n"
    )
    (blkio / "blkio.throttle.io_serviced_recursive").write_text(
        "253:0 Read 1\n253:0 Write 32\n7:3 Read 1\n7:3 Write 32\nTotal 66\n"
    )
    driver = v1.V1Driver({"blkio": tmp_path / "blkio"})
    both = driver._io_stats([blkio])
    assert both == {"io_read_bytes": 8192, "io_write_bytes": 8388608, "io_read_ops": 2, "io_write_ops": 64}
    one = driver._io_stats([blkio], ("253:0",))
    assert one == {"io_read_bytes": 4096, "io_write_bytes": 4194304, "io_read_ops": 1, "io_write_ops": 32}
