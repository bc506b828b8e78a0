"""The session's box work waits for the first box: nothing on --collect-only or without box tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

# Counts the sweeps of leftovers and records the SIGTERM handler as the session ends (before
# pytest_unconfigure puts the old one back).
SPY_CONFTEST = """
import json, signal
from pytest_nsbox import reaper

sweeps = []
_real_sweep = reaper.sweep

def _spy(*args, **kwargs):
    sweeps.append(1)
    return _real_sweep(*args, **kwargs)

reaper.sweep = _spy

def pytest_sessionfinish(session):
    handler = signal.getsignal(signal.SIGTERM)
    handler = "default" if handler == signal.SIG_DFL else getattr(handler, "__name__", repr(handler))
    with open("spy.json", "w") as report:
        json.dump({"sweeps": len(sweeps), "sigterm": handler}, report)
"""

BOX_TEST = "def test_box(nsbox):\n    assert nsbox.run('true').returncode == 0\n"


def _spied(pytester: pytest.Pytester) -> dict[str, object]:
    report: dict[str, object] = json.loads((pytester.path / "spy.json").read_text())
    return report


def test_collect_only_does_no_box_work(
    pytester: pytest.Pytester, run_inner: Callable[..., pytest.RunResult], tmp_path: Path
) -> None:
    pytester.makeconftest(SPY_CONFTEST)
    pytester.makepyfile(test_boxes=BOX_TEST)
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(b"not an image" * 100)
    result = run_inner("--collect-only", f"--nsbox-image={damaged}", f"--nsbox-cache={tmp_path / 'c'}")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*test_box*"])
    assert _spied(pytester) == {"sweeps": 0, "sigterm": "default"}


def test_a_suite_without_box_tests_does_no_box_work(
    pytester: pytest.Pytester, run_inner: Callable[..., pytest.RunResult]
) -> None:
    pytester.makeconftest(SPY_CONFTEST)
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = run_inner()
    result.assert_outcomes(passed=1)
    assert _spied(pytester) == {"sweeps": 0, "sigterm": "default"}


@pytest.mark.requires("boxes")
@pytest.mark.parametrize(
    "test_file",
    [
        BOX_TEST,
        # No box fixture: a Box made in the test itself triggers the same work, once.
        "from pytest_nsbox import Box\n\ndef test_box():\n    for _ in range(2):\n"
        "        with Box() as box:\n            assert box.run('true').returncode == 0\n",
    ],
    ids=["fixture", "Box()"],
)
def test_the_first_box_sweeps_once_and_routes_sigterm(
    pytester: pytest.Pytester, run_inner: Callable[..., pytest.RunResult], test_file: str
) -> None:
    pytester.makeconftest(SPY_CONFTEST)
    pytester.makepyfile(test_boxes=test_file)
    result = run_inner("--nsbox-strict", timeout=120)
    result.assert_outcomes(passed=1)
    assert _spied(pytester) == {"sweeps": 1, "sigterm": "_on_sigterm"}
