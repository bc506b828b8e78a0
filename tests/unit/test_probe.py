"""Host capability detection and the error that names what is missing."""

from __future__ import annotations

import errno
import os
import platform
import re
from pathlib import Path

import pytest

from pytest_nsbox import probe, rootless
from pytest_nsbox.errors import HostUnsupportedError, NsboxError, SyscallError
from pytest_nsbox.probe import Capability

EXPECTED_NAMES = [
    *("linux", "root", "namespaces", "overlayfs", "kernel", "architecture"),
    *("cgroups", "devices", "freezer", "time namespace", "userns", "rootless", "netem", "nft"),
    *("loop", "mkfs.ext4", "mkfs.xfs", "mkfs.btrfs", "devmapper"),
]


def test_capabilities_are_capability_tuples_in_doctor_order() -> None:
    caps = probe.capabilities()
    assert isinstance(caps, tuple)
    assert all(isinstance(c, Capability) for c in caps)
    assert [c.name for c in caps] == EXPECTED_NAMES


def test_cgroups_the_device_allowlist_and_the_network_extras_are_optional() -> None:
    required = {c.name: c.required for c in probe.capabilities()}
    optional = (
        "cgroups",
        "devices",
        "freezer",
        "time namespace",
        "userns",
        "rootless",
        "netem",
        "nft",
        "loop",
        "mkfs.ext4",
        "mkfs.xfs",
        "mkfs.btrfs",
        "devmapper",
    )
    assert required == {name: name not in optional for name in EXPECTED_NAMES}


def test_netem_verdict_follows_the_kernel_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe.os.path, "exists", lambda path: False)
    for setting, ok in (("n", False), ("m", True), ("y", True), (None, True)):
        monkeypatch.setattr(probe, "_kernel_option", lambda name, s=setting: s)
        verdict = probe._check_netem()
        assert verdict.ok is ok and not verdict.required
        assert ("CONFIG_NET_SCH_NETEM" in verdict.detail) is (not ok)


def test_every_capability_has_a_boolean_verdict_and_a_detail() -> None:
    for cap in probe.capabilities():
        assert isinstance(cap.ok, bool)
        assert isinstance(cap.detail, str)
        assert cap.detail


def test_capabilities_are_detected_once() -> None:
    assert probe.capabilities() is probe.capabilities()


def test_linux_capability_is_present_here() -> None:
    linux = next(c for c in probe.capabilities() if c.name == "linux")
    assert linux.ok is (platform.system() == "Linux")


def test_root_capability_matches_the_effective_uid() -> None:
    root = next(c for c in probe.capabilities() if c.name == "root")
    if os.geteuid() != 0:  # rootless: boxes unless something blocks user namespaces
        assert root.ok == (not rootless.blockers())
        assert f"uid {os.geteuid()}" in root.detail
    else:
        assert root.ok == bool(probe._effective_caps() & (1 << 21))


def test_missing_lists_required_capabilities_that_failed() -> None:
    expected = [c for c in probe.capabilities() if c.required and not c.ok]
    assert probe.missing() == expected


def fake_capabilities(monkeypatch: pytest.MonkeyPatch, *caps: Capability) -> None:
    monkeypatch.setattr(probe, "capabilities", lambda: caps)


def test_require_box_support_names_the_missing_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_capabilities(
        monkeypatch,
        Capability("linux", True, "Linux"),
        Capability("overlayfs", False, "no overlayfs: `modprobe overlay` as root"),
    )
    with pytest.raises(HostUnsupportedError) as info:
        probe.require_box_support()
    text = str(info.value)
    assert text.startswith("this host cannot make boxes: overlayfs: no overlayfs")
    assert "nsbox doctor" in text
    assert "linux" not in text


def test_require_box_support_names_every_missing_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_capabilities(
        monkeypatch,
        Capability("root", False, "running as uid 1000"),
        Capability("kernel", False, "4.19 is older than 5.6"),
    )
    with pytest.raises(HostUnsupportedError, match=r"root: running as uid 1000; kernel: 4\.19 is older"):
        probe.require_box_support()


def test_require_box_support_ignores_optional_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_capabilities(
        monkeypatch,
        Capability("linux", True, "Linux"),
        Capability("cgroups", False, "none found", required=False),
    )
    probe.require_box_support()
    assert probe.missing() == []


def test_host_unsupported_error_can_be_caught_as_nsbox_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_capabilities(monkeypatch, Capability("root", False, "not root"))
    with pytest.raises(NsboxError):
        probe.require_box_support()


# ---------------------------------------------------------------------------- kernel_version


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.18.44-fc-v782", (6, 18)),
        ("5.6.0", (5, 6)),
        ("5.10.0-28-amd64", (5, 10)),
        ("4.19.0-rc7", (4, 19)),
        ("5.15.90.1-microsoft-standard-WSL2", (5, 15)),
        ("6.1+", (6, 1)),
        ("garbage", (0, 0)),
        ("", (0, 0)),
    ],
)
def test_kernel_version_parses_the_release(
    monkeypatch: pytest.MonkeyPatch, release: str, expected: tuple[int, int]
) -> None:
    monkeypatch.setattr(probe.platform, "release", lambda: release)
    assert probe.kernel_version() == expected


def test_kernel_version_of_this_host() -> None:
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    assert match is not None
    assert probe.kernel_version() == (int(match[1]), int(match[2]))


def test_kernel_check_requires_openat2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe.platform, "release", lambda: "5.4.0-150-generic")
    old = probe._check_kernel()
    assert not old.ok
    assert "older than 5.6" in old.detail
    monkeypatch.setattr(probe.platform, "release", lambda: "5.6.0")
    assert probe._check_kernel().ok


class _FakeV2:
    version = "v2"

    def __init__(self, nest: Path) -> None:
        self.nest = nest


def test_the_device_allowlist_check_says_what_a_host_without_the_v2_filter_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe.cgroups, "driver", lambda: _FakeV2(tmp_path))

    def refusing(directory: str, rules: list[str]) -> None:
        assert Path(directory).parent == tmp_path and Path(directory).is_dir()
        raise SyscallError(errno.EPERM, "bpf(BPF_PROG_LOAD)")

    monkeypatch.setattr(probe.devices, "restrict_v2", refusing)
    verdict = probe._check_device_allowlist()
    assert not verdict.ok and not verdict.required
    assert "no cgroup v2 device filter (bpf(BPF_PROG_LOAD) failed: EPERM" in verdict.detail
    assert "nodev mounts and no CAP_MKNOD" in verdict.detail
    assert list(tmp_path.iterdir()) == []  # the scratch cgroup is gone

    monkeypatch.setattr(probe.devices, "restrict_v2", lambda directory, rules: None)
    assert probe._check_device_allowlist().ok
    assert list(tmp_path.iterdir()) == []


def test_loop_devices_and_mkfs_programs_are_listed_with_their_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(probe.os.path, "exists", lambda path: False)
    monkeypatch.setattr(probe.rootless, "active", lambda: False)  # what root would be told
    assert not probe._check_loop().ok and "modprobe loop" in probe._check_loop().detail
    import shutil

    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    details = {c.name: c.detail for c in probe._check_mkfs() if not c.ok}
    assert "apt-get install e2fsprogs" in details["mkfs.ext4"]
    assert "apt-get install xfsprogs" in details["mkfs.xfs"]
    assert "apt-get install btrfs-progs" in details["mkfs.btrfs"]
