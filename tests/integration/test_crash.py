"""pytest killed in the middle of a test that holds a bridged, cgroup-limited box.

SIGINT and SIGTERM run the normal teardown: nothing is left. SIGKILL runs nothing of ours:
the kernel takes every box process down (parent-death signals), the helper removes the
cgroups, and what only state can tell (the address lease, the shared bridge) is left to
``nsbox gc`` or the next session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from cleanup import box_mounts

from pytest_nsbox import state
from pytest_nsbox.cli import main as nsbox_cli
from pytest_nsbox.network import pool

pytestmark = pytest.mark.requires("boxes")

SUBNET = "10.216.0.0/16"  # a pool of its own: nothing else of this run shares its bridge

_HELD_TEST = """
import json, os, time
import pytest

@pytest.mark.nsbox(network="bridge", limits={"pids": 64}, subnet="SUBNET")
def test_holds_a_box(nsbox):
    sleeper = nsbox.spawn(["sleep", "1000"])
    from pytest_nsbox import zygote
    helper = zygote.current()
    deadline = time.monotonic() + 30
    while not [w for boxes in helper._waiting.values() for w in boxes if w.veth]:
        assert time.monotonic() < deadline, "no bridged box waits"
        helper.waiting_boxes()  # files the announcements that arrived
        time.sleep(0.02)
    info = {
        "waiting_veths": [w.veth[0] for boxes in helper._waiting.values() for w in boxes if w.veth],
        "init": nsbox.pid,
        "sleeper": sleeper.host_pid,
        "ip": nsbox.ip,
        "interface": nsbox.network.host_interface,
        "cgroups": [str(d) for d in nsbox.cgroup.dirs],
        "pytest": os.getpid(),
    }
    with open(os.environ["HELD_INFO"] + ".tmp", "w") as handle:
        json.dump(info, handle)
    os.rename(os.environ["HELD_INFO"] + ".tmp", os.environ["HELD_INFO"])
    time.sleep(1000)
""".replace("SUBNET", SUBNET)


def _start_held_box(tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    test_file = tmp_path / "test_held.py"
    test_file.write_text(textwrap.dedent(_HELD_TEST))
    info_path = tmp_path / "held.json"
    mounts_before = box_mounts()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            str(test_file),
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
        ],
        env={**os.environ, "HELD_INFO": str(info_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 60
    while not info_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the held box never started: {process.communicate()[0][-3000:]}")
        time.sleep(0.05)
    info = json.loads(info_path.read_text())
    info["mounts_before"] = mounts_before
    return process, info


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _leases() -> dict[str, object]:
    try:
        document = json.loads((state.STATE_DIR / f"{pool.DOCUMENT}.json").read_text())
    except FileNotFoundError:
        return {}
    return dict(document.get("pools", {}).get(SUBNET, {}).get("leases", {}))


def _shared_bridge_exists() -> bool:
    return any(name.startswith("nsbb") and _bridge_of_subnet(name) for name in os.listdir("/sys/class/net"))


def _bridge_of_subnet(name: str) -> bool:
    from ipaddress import IPv4Network

    from pytest_nsbox.network import bridge

    return name == bridge.shared_name(IPv4Network(SUBNET))


def _nothing_left(info: dict[str, object]) -> list[str]:
    problems = []
    leaked = set(box_mounts()) - set(info["mounts_before"])  # type: ignore[arg-type]
    if leaked:
        problems.append(f"mounts of ours on the host: {sorted(leaked)}")
    for key in ("init", "sleeper"):
        if not _dead(int(info[key])):  # type: ignore[call-overload]
            problems.append(f"box process {key} ({info[key]}) alive")
    left = [d for d in info["cgroups"] if os.path.exists(d)]  # type: ignore[attr-defined]
    if left:
        problems.append(f"cgroups {left}")
    if os.path.exists(f"/sys/class/net/{info['interface']}"):
        problems.append(f"veth {info['interface']}")
    for name in info["waiting_veths"]:  # type: ignore[attr-defined]
        if os.path.exists(f"/sys/class/net/{name}"):
            problems.append(f"veth {name} of a waiting box")
    if info["ip"] in _leases():
        problems.append(f"lease {info['ip']}")
    if _shared_bridge_exists():
        problems.append("the shared bridge of the subnet")
    return problems


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_tears_everything_down(tmp_path: Path, signum: signal.Signals) -> None:
    process, info = _start_held_box(tmp_path)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    # 2 is pytest's "interrupted": the KeyboardInterrupt path, teardown included, ran (a
    # process that SIGTERM simply killed would report -15).
    assert process.returncode == pytest.ExitCode.INTERRUPTED, output[-2000:]
    # The veth goes with the box's network namespace, which the kernel destroys a moment later.
    assert _wait(lambda: not _nothing_left(info), 10), (_nothing_left(info), output[-2000:])


def test_a_killed_run_leaves_only_what_gc_removes(tmp_path: Path) -> None:
    process, info = _start_held_box(tmp_path)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    time.sleep(2)
    for key in ("init", "sleeper"):
        assert _dead(int(info[key])), f"box process {key} outlived pytest by 2 s"  # type: ignore[call-overload]
    assert _wait(lambda: not [d for d in info["cgroups"] if os.path.exists(d)], 10)  # type: ignore[attr-defined]
    # The lease and the shared bridge are still there, unless another pytest-nsbox process on
    # this host has taken the pool's lock since (each one reclaims what dead owners held).
    assert nsbox_cli(["gc"]) == 0
    assert _wait(lambda: not _nothing_left(info), 10), _nothing_left(info)
