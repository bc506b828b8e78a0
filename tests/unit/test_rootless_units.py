"""rootless.py without a box: /etc/subuid parsing, the blockers' fixes, the unshare errors."""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path

import pytest

from pytest_nsbox import rootless


def _me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def test_a_subordinate_range_is_found_by_name_or_by_number(tmp_path: Path) -> None:
    by_name = tmp_path / "by-name"
    by_name.write_text(f"someone:100000:65536\n{_me()}:200000:65536\n")
    assert rootless.subordinate_range("uid", str(by_name)) == (200000, 65535)
    by_number = tmp_path / "by-number"
    by_number.write_text(f"{os.getuid()}:300000:70000\n")
    assert rootless.subordinate_range("uid", str(by_number)) == (300000, 65535)


def test_short_malformed_and_other_users_ranges_are_passed_over(tmp_path: Path) -> None:
    listing = tmp_path / "subuid"
    listing.write_text(
        f"{_me()}:100000:1000\n"  # too few ids for a box's 65,536
        f"{_me()}:x:65536\n"  # not a number
        f"{_me()}:0:65536\n"  # would map the host's root
        "someone-else:400000:65536\n"
        f"{_me()}:500000:65536\n"
    )
    assert rootless.subordinate_range("uid", str(listing)) == (500000, 65535)
    assert rootless.subordinate_range("uid", str(tmp_path / "missing")) is None


def test_each_known_blocker_is_named_with_its_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {}
    for name, value in (("apparmor", "1"), ("max", "0"), ("clone", "0")):
        files[name] = tmp_path / name
        files[name].write_text(value + "\n")
    sysctls = [(str(files[key]), *rest) for key, (_path, *rest) in zip(files, rootless._SYSCTLS, strict=True)]
    monkeypatch.setattr(rootless, "_SYSCTLS", tuple(sysctls))
    found = rootless.blockers()
    assert any("apparmor_restrict_unprivileged_userns=0" in line for line in found)
    assert any("user.max_user_namespaces=15000" in line for line in found)
    assert any("unprivileged_userns_clone=1" in line for line in found)
    for path in files.values():
        path.write_text("harmless\n")
    assert rootless.blockers() == [] or not os.path.exists("/proc/self/ns/user")


def test_a_refused_unshare_without_a_sysctl_to_blame_names_seccomp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootless, "blockers", lambda: [])
    message = rootless.unshare_refused(errno.EPERM, "Operation not permitted")
    assert "seccomp" in message and "seccomp=unconfined" in message
    assert "max_user_namespaces" in rootless.unshare_refused(errno.ENOSPC, "No space left on device")


def test_the_users_directories_follow_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert rootless.cache_home() == tmp_path / "cache" / "pytest-nsbox"
    assert rootless.runtime_dir() == tmp_path / "pytest-nsbox"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "not-there"))
    assert rootless.runtime_dir() == Path(f"/tmp/pytest-nsbox-{os.getuid()}")


def test_a_refused_user_namespace_is_found_by_trying_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a container whose seccomp profile forbids unshare: only trying shows it."""
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(rootless, "blockers", lambda: [])
    refused = rootless.try_user_namespace()
    assert refused is not None and "seccomp" in refused
    fake.write_text("#!/bin/sh\nexit 0\n")
    assert rootless.try_user_namespace() is None
