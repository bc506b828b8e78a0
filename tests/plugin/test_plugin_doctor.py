"""``nsbox doctor`` (``python -m pytest_nsbox doctor`` and the ``nsbox`` console script)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_nsbox import probe

CAPABILITY_NAMES = (
    *("linux", "root", "namespaces", "overlayfs", "kernel", "architecture"),
    *("cgroups", "devices", "freezer", "time namespace", "userns", "rootless", "netem", "nft"),
    *("loop", "mkfs.ext4", "mkfs.xfs", "mkfs.btrfs", "devmapper"),
)


def _run(argv: list[str], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _doctor_with(tmp_path: Path, setup: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``cli.main(["doctor", *args])`` in a fresh interpreter after ``setup`` ran."""
    code = "\n".join(
        [
            "import sys",
            "from pytest_nsbox import cli, probe",
            "from pytest_nsbox.probe import Capability",
            setup,
            f"sys.exit(cli.main(['doctor', *{list(args)!r}]))",
        ]
    )
    return _run([sys.executable, "-c", code], tmp_path)


def _check_healthy_report(result: subprocess.CompletedProcess[str], try_box: bool) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    expected = probe.capabilities()
    assert [c.name for c in expected] == list(CAPABILITY_NAMES)
    assert len(lines) == len(expected) + (1 if try_box else 0)
    width = max(len(name) for name in CAPABILITY_NAMES)
    for line, capability in zip(lines, expected, strict=False):
        mark = "ok  " if capability.ok else "--  "
        assert line == f"{mark} {capability.name:<{width}}  {capability.detail}"
    if try_box:
        assert re.fullmatch(
            rf"ok   {'box':<{width}}  started, ran hostname, stopped in \d+\.\d ms", lines[-1]
        ), lines[-1]


@pytest.mark.requires("boxes")
def test_module_doctor_on_this_host(tmp_path: Path) -> None:
    _check_healthy_report(_run([sys.executable, "-m", "pytest_nsbox", "doctor"], tmp_path), try_box=True)


@pytest.mark.requires("boxes")
def test_module_doctor_no_box(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "pytest_nsbox", "doctor", "--no-box"], tmp_path)
    _check_healthy_report(result, try_box=False)
    assert "box  " not in result.stdout


def test_doctor_missing_capability_fails(tmp_path: Path) -> None:
    setup = 'probe.capabilities = lambda: (Capability("root", False, "pretend: running as uid 1000"),)'
    result = _doctor_with(tmp_path, setup)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["FAIL root  pretend: running as uid 1000"]
    assert "boxes cannot be made on this host: fix the FAIL lines above" in result.stderr


def test_doctor_lists_every_capability_and_marks_optional_ones(tmp_path: Path) -> None:
    setup = """
probe.capabilities = lambda: (
    Capability("linux", True, "Linux"),
    Capability("overlayfs", False, "pretend: no overlayfs"),
    Capability("cgroups", False, "pretend: none found", required=False),
)
"""
    result = _doctor_with(tmp_path, setup)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "ok   linux      Linux",
        "FAIL overlayfs  pretend: no overlayfs",
        "--   cgroups    pretend: none found",
    ]


def test_doctor_optional_gap_is_not_a_failure(tmp_path: Path) -> None:
    setup = """
probe.capabilities = lambda: (
    Capability("linux", True, "Linux"),
    Capability("cgroups", False, "pretend: none found", required=False),
)
"""
    result = _doctor_with(tmp_path, setup, "--no-box")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ok   linux    Linux", "--   cgroups  pretend: none found"]


def test_doctor_reports_a_box_that_will_not_start(tmp_path: Path) -> None:
    setup = """
from pytest_nsbox.errors import BoxError

class BrokenBox:
    def __init__(self, **options):
        pass

    def __enter__(self):
        raise BoxError("box deadbeef failed to start: pretend")

    def __exit__(self, *exc_info):
        return None

probe.capabilities = lambda: (Capability("linux", True, "Linux"),)
cli.Box = BrokenBox
"""
    result = _doctor_with(tmp_path, setup)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "ok   linux  Linux",
        "FAIL box    box deadbeef failed to start: pretend",
    ]


def test_doctor_usage_errors(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "pytest_nsbox"], tmp_path)
    assert result.returncode == 2
    assert "usage: nsbox" in result.stderr
    result = _run([sys.executable, "-m", "pytest_nsbox", "frobnicate"], tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


@pytest.fixture
def nsbox_script() -> str:
    path = shutil.which("nsbox")
    if path is None:
        pytest.skip("the nsbox console script is not on PATH")
    return path


@pytest.mark.requires("boxes")
def test_console_script_doctor(tmp_path: Path, nsbox_script: str) -> None:
    _check_healthy_report(_run([nsbox_script, "doctor"], tmp_path), try_box=True)


def test_console_script_help(tmp_path: Path, nsbox_script: str) -> None:
    result = _run([nsbox_script, "--help"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: nsbox ")
    assert "doctor" in result.stdout
    result = _run([nsbox_script, "doctor", "--help"], tmp_path)
    assert result.returncode == 0
    assert "--no-box" in result.stdout
