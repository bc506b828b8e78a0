"""The device allowlist: runc's default nodes, a box's own devices, and the v1 cgroup writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pytest_nsbox import devices
from pytest_nsbox.devices import ALLOWED, box_devices, cgroup_rules, restrict_v1
from pytest_nsbox.errors import ConfigError


def test_the_default_allowlist_is_runcs_without_mknod() -> None:
    assert [rule.split()[1] for rule in ALLOWED] == [
        "1:3", "1:5", "1:7", "1:8", "1:9", "5:0", "5:1", "5:2", "136:*",
    ]  # fmt: skip
    assert all(rule.startswith("c ") and rule.endswith(" rw") for rule in ALLOWED)


def test_a_boxs_own_devices_follow_the_allowlist_with_mknod() -> None:
    rules = cgroup_rules([["/dev/fuse", "c", 10, 229, 0o666], ["/dev/loop3", "b", 7, 3, 0o600]])
    assert rules == [*ALLOWED, "c 10:229 rwm", "b 7:3 rwm"]


def test_box_devices_reads_type_numbers_and_mode_from_the_host() -> None:
    info = os.stat("/dev/null")
    assert box_devices(["/dev/null"]) == [
        ["/dev/null", "c", os.major(info.st_rdev), os.minor(info.st_rdev), stat.S_IMODE(info.st_mode)]
    ]


def test_a_device_gone_since_the_spec_was_made_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"devices: '/dev/nsbox-gone' is gone from this host"):
        box_devices(["/dev/nsbox-gone"])


def test_restrict_v1_denies_all_then_allows_each_rule_in_its_own_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel needs "a" denied first, then one rule per write(2) to devices.allow."""
    (tmp_path / "devices.deny").touch()
    (tmp_path / "devices.allow").touch()
    writes: list[bytes] = []
    real_write = os.write

    def recording(fd: int, data: bytes) -> int:
        writes.append(data)
        return real_write(fd, data)

    monkeypatch.setattr(devices.os, "write", recording)
    restrict_v1(str(tmp_path), ["c 1:3 rw", "c 10:229 rwm"])
    monkeypatch.undo()
    assert (tmp_path / "devices.deny").read_text() == "a"
    assert writes == [b"c 1:3 rw", b"c 10:229 rwm"]


def test_restrict_v1_skips_a_rule_the_parent_cgroup_does_not_allow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "devices.deny").touch()
    (tmp_path / "devices.allow").touch()
    real_write = os.write

    def refusing(fd: int, data: bytes) -> int:
        if data == b"c 5:1 rw":
            raise PermissionError(1, "Operation not permitted")
        return real_write(fd, data)

    monkeypatch.setattr(devices.os, "write", refusing)
    restrict_v1(str(tmp_path), ["c 1:3 rw", "c 5:1 rw", "c 1:5 rw"])
    monkeypatch.undo()
    assert (tmp_path / "devices.allow").read_text() == "c 1:3 rwc 1:5 rw"
