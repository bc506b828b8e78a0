"""Suite-wide checks: capability markers, and that a whole run leaves nothing behind."""

from __future__ import annotations

import ipaddress
import json
import os
import time

import psutil
import pytest
from cleanup import box_dm_devices, box_loop_devices
from local_registry import registry, secure_registry  # noqa: F401 - fixtures for every test
from rootless_skips import reason_for

from pytest_nsbox import cgroups, live_boxes, network, probe, state, zygote
from pytest_nsbox.network import bridge, pool
from pytest_nsbox.plugin import STRICT

_BASELINE = pytest.StashKey[dict[str, object]]()
_CAPABILITY_CHECKS = {
    "root": lambda: os.geteuid() == 0,
    "boxes": lambda: not probe.missing(),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*capabilities): skip unless this host has them: root, boxes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A rootless run skips what cannot work without root, each with its reason (``rootless_skips``)."""
    if os.geteuid() == 0:
        return
    have_cgroups = cgroups.driver() is not None
    for item in items:
        reason = reason_for(str(item.path), item.name, have_cgroups)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"rootless: {reason}"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("requires")
    if marker is None:
        return
    missing = [name for name in marker.args if not _CAPABILITY_CHECKS[name]()]
    if missing == ["root"] and probe.capabilities() and not probe.missing():
        # A rootless run: this test does what only root may on the host; it cannot fail here.
        pytest.skip("rootless: needs root on the host itself (not only in its boxes)")
    if missing:
        reason = f"needs {', '.join(missing)}"
        if missing == ["boxes"] or "boxes" in missing:
            reason += ": " + "; ".join(f"{c.name}: {c.detail}" for c in probe.missing())
        if item.config.stash.get(STRICT, False):
            pytest.fail(f"--nsbox-strict: {reason}", pytrace=False)
        pytest.skip(reason)


def _mount_lines() -> list[str]:
    with open("/proc/self/mountinfo") as handle:
        return [" ".join(line.split()[3:5]) for line in handle]


def _leftover_processes() -> list[psutil.Process]:
    helper = zygote.current()
    if helper is None:
        return []
    try:
        processes = psutil.Process(helper.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    # The helper keeps the next box cloned in advance; that one is waiting, not leaked.
    return [p for p in processes if _name(p) != "nsbox-waiting"]


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def _box_cgroups() -> set[str]:
    """Box cgroup directories (``nsb-*``) wherever this host's driver makes them."""
    backend = cgroups.driver()
    return {str(path) for path in backend.existing()} if backend else set()


def _empty(paths: set[str]) -> list[str]:
    """The box cgroups with no process in them: what a leak looks like (another session's
    live boxes on the same host have processes)."""
    empty = []
    for path in sorted(paths):
        try:
            with open(os.path.join(path, "cgroup.procs")) as handle:
                if not handle.read().strip():
                    empty.append(path)
        except OSError:
            continue
    return empty


def _links() -> set[str]:
    """Host interfaces named like ours (nsb*: bridges, veth ends)."""
    try:
        return {name for name in os.listdir("/sys/class/net") if name.startswith("nsb")}
    except OSError:
        return set()


def _our_leases() -> list[str]:
    """Addresses leased by this process in the host-wide pool (none may outlive the run)."""
    path = state.STATE_DIR / f"{pool.DOCUMENT}.json"
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    me = state.Owner.current().to_json()
    return [
        address
        for entry in document.get("pools", {}).values()
        for address, lease in entry.get("leases", {}).items()
        if lease.get("owner") == me
    ]


def _others_links() -> set[str]:
    """Interfaces that live processes other than this one hold (concurrent runs on the host)."""
    path = state.STATE_DIR / f"{pool.DOCUMENT}.json"
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    me = state.Owner.current().to_json()

    def other(owner: object) -> bool:
        return owner != me and state.Owner.from_json(owner).alive()

    names: set[str] = set()
    for subnet, entry in document.get("pools", {}).items():
        names |= {lease["interface"] for lease in entry.get("leases", {}).values() if other(lease["owner"])}
        names |= {name for name, owner in entry.get("private", {}).items() if other(owner)}
        if any(other(user) for user in entry.get("users", [])):
            names.add(bridge.shared_name(ipaddress.IPv4Network(subnet)))
    return names


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BASELINE] = {
        "mounts": _mount_lines(),
        "cgroups": _box_cgroups(),
        "links": _links(),
        "loops": box_loop_devices(),
        "dm": box_dm_devices(),
    }


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any box, mount or box process outlived the tests that made it."""
    baseline = session.config.stash.get(_BASELINE, None)
    if baseline is None or hasattr(session.config, "workerinput"):
        return
    problems = []
    boxes = live_boxes()
    if boxes:
        problems.append(f"boxes still running: {boxes}")
    deadline = time.monotonic() + 5
    while _leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.05)  # the zygote reaps a killed init as soon as its SIGCHLD arrives
    leftovers = _leftover_processes()
    if leftovers:
        problems.append(f"box processes still alive: {[(p.pid, p.name()) for p in leftovers]}")
    extra = sorted(set(_mount_lines()) - set(baseline["mounts"]))  # type: ignore[arg-type]
    if extra:
        problems.append(f"mounts added on the host: {extra}")
    deadline = time.monotonic() + 10  # a stopped box's disk goes with its mount namespace
    loops_before = set(baseline["loops"].items())  # type: ignore[attr-defined]
    while (loops := set(box_loop_devices().items()) - loops_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    if loops:
        problems.append(f"loop devices of disks left attached: {sorted(loops)}")
    dm_left = sorted(set(box_dm_devices()) - set(baseline["dm"]))  # type: ignore[arg-type]
    if dm_left:
        problems.append(f"device-mapper devices of disks left: {dm_left}")
    zygote.shutdown()  # its waiting box (and that box's cgroup) goes with it
    cgroups.flush_pending(wait=5)
    left = _empty(_box_cgroups() - baseline["cgroups"])  # type: ignore[operator]
    if left:
        time.sleep(1)  # a box of another process may be starting: its cgroup fills at once
        left = _empty(set(left) & _box_cgroups())
    if left:
        problems.append(f"box cgroups left behind: {left}")
    leases = _our_leases()
    if leases:
        problems.append(f"address leases left in the pool: {leases}")
    network.shutdown()  # this process leaves the shared bridge (the last one out deletes it)
    deadline = time.monotonic() + 15
    # A stopped box's veth goes with its network namespace, which the kernel destroys a moment
    # later; other processes on this host (xdist workers) may still be using theirs.
    while (links := _links() - baseline["links"] - _others_links()) and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.1)
    if links:
        problems.append(f"network interfaces left on the host: {sorted(links)}")
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "pytest-nsbox leak check failed:\n  " + "\n  ".join(problems)
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
