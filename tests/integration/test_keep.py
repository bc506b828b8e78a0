"""--nsbox-keep: a failed test's box outlives pytest; `nsbox shell` enters it; `nsbox gc` ends it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from pytest_nsbox import kept, state
from pytest_nsbox.cli import main as nsbox_cli

pytestmark = pytest.mark.requires("boxes")

_SUITE = """
import pytest

@pytest.mark.nsbox(hostname="kept-one", network="bridge", limits={"pids": 32})
def test_fails(nsbox):
    nsbox.run("echo left for later > /root/note")
    nsbox.spawn(["sleep", "1000"])
    assert False, "look inside"

@pytest.mark.nsbox(hostname="passes")
def test_passes(nsbox):
    nsbox.run("true", check=True)
"""


def _nsbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_failed_tests_box_is_kept_entered_and_collected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_keep_me=_SUITE)
    before = set(kept.entries())
    result = pytester.runpytest_subprocess("--nsbox-keep=failed")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*nsbox: kept boxes*", "* kept-one *test_fails*", "*nsbox shell BOX_ID*"])
    new = {key: entry for key, entry in kept.entries().items() if key not in before}
    assert [entry["hostname"] for entry in new.values()] == ["kept-one"], "only the failed test's box"
    ((box_id, entry),) = new.items()
    try:
        init = psutil.Process(entry["pid"])
        assert init.is_running() and init.name() == "nsbox-init"
        # Entered through the ledger: the box's own files, hostname, pid namespace and limits.
        shell = _nsbox(
            "shell", box_id[:6], "--", "sh", "-c", "cat /root/note; hostname; echo $$; ps -e | wc -l"
        )
        assert shell.returncode == 0, shell.stderr
        note, hostname, own_pid, _ = shell.stdout.split("\n", 3)
        assert (note, hostname) == ("left for later", "kept-one")
        assert int(own_pid) < 10
        status = _nsbox("shell", box_id, "--", "grep", "CapBnd", "/proc/self/status").stdout.split()[1]
        assert not int(status, 16) & (1 << 21), "a shell in a default box must not have CAP_SYS_ADMIN"
        assert _nsbox("shell", box_id, "--", "sh", "-c", "exit 7").returncode == 7
        # Its address stays leased while it is kept (the lease belongs to its init now).
        assert entry["ip"] and _lease_owner(entry["ip"]) == [entry["pid"], entry["start"]]
        dry = _nsbox("gc", "--dry-run")
        assert f"would remove: kept box {box_id} (kept-one, init pid {entry['pid']}" in dry.stdout
        assert init.is_running()
    finally:
        gc = _nsbox("gc")
    assert f"removed: kept box {box_id} (kept-one, init pid {entry['pid']}" in gc.stdout, (
        gc.stdout + gc.stderr
    )
    assert not state.Owner(entry["pid"], entry["start"]).alive()
    assert box_id not in kept.entries()
    assert not any(path.name == entry["cgroup"] for path in _cgroup_dirs())
    deadline = time.monotonic() + 10
    while _lease_owner(entry["ip"]) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _lease_owner(entry["ip"]) is None


def test_shell_needs_to_know_which_box(capsys: pytest.CaptureFixture[str]) -> None:
    assert nsbox_cli(["shell", "no-such-box", "--", "true"]) == 1
    assert "no kept box matches 'no-such-box'" in capsys.readouterr().err


def test_shell_in_a_fresh_box_of_an_image_runs_and_cleans_up() -> None:
    result = _nsbox("shell", "--image", "/", "--", "sh", "-c", "hostname; echo $$")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "shell" and int(result.stdout.split()[1]) < 10


def _lease_owner(address: str) -> list[int] | None:
    from pytest_nsbox.network import pool

    try:
        with state.locked_document(pool.DOCUMENT, readonly=True) as document:
            for entry in document.get("pools", {}).values():
                if address in entry.get("leases", {}):
                    return list(entry["leases"][address]["owner"])
    except FileNotFoundError:
        return None
    return None


def _cgroup_dirs() -> list[os.PathLike[str]]:
    from pytest_nsbox import cgroups

    backend = cgroups.driver()
    return list(backend.existing()) if backend else []
