"""The kept-box ledger: ``nsbox gc`` kills only the very process an entry names."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_nsbox import kept, state


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def _entry(pid: int, start: int) -> dict[str, object]:
    return {"id": "b0x", "pid": pid, "start": start, "hostname": "h", "test": "t", "cgroup": ""}


def test_end_all_spares_a_process_that_reuses_a_kept_init_pid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    monkeypatch.setattr(state, "STATE_DIR", tmp_path)
    start = state.process_start(sleeper.pid)
    assert start is not None
    kept.record(_entry(sleeper.pid, start + 1))  # the same pid, another process
    assert kept.end_all(dry_run=True) == ["kept box b0x (h, from t), whose init has ended already"]
    assert kept.end_all() == ["kept box b0x (h, from t), whose init has ended already"]
    assert sleeper.poll() is None
    assert kept.end_all() == []  # forgotten all the same


def test_end_all_kills_the_init_it_names_and_waits_for_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    monkeypatch.setattr(state, "STATE_DIR", tmp_path)
    start = state.process_start(sleeper.pid)
    assert start is not None
    kept.record(_entry(sleeper.pid, start))
    assert kept.inits() == [state.Owner(sleeper.pid, start)]
    assert kept.end_all(dry_run=True) == [f"kept box b0x (h, init pid {sleeper.pid}, from t)"]
    assert sleeper.poll() is None
    assert kept.end_all() == [f"kept box b0x (h, init pid {sleeper.pid}, from t)"]
    assert sleeper.wait(timeout=1) == -9
