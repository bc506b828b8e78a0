"""The v1 and v2 cgroup drivers on a fake tree: what they write, and how they read stats."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_nsbox.cgroups import Cgroup
from pytest_nsbox.cgroups.base import own_cgroup
from pytest_nsbox.cgroups.v1 import V1Driver, mounted_controllers
from pytest_nsbox.cgroups.v2 import V2Driver
from pytest_nsbox.errors import CgroupError
from pytest_nsbox.zygote_process import Plan


@pytest.fixture
def v2_tree(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup2"
    nest = root / own_cgroup(None).lstrip("/")
    nest = nest if nest == root else nest.parent
    nest.mkdir(parents=True, exist_ok=True)
    (nest / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (nest / "cgroup.subtree_control").write_text("")
    return root


def make_box_cgroup(driver: V1Driver | V2Driver, name: str) -> list[Path]:
    """A box cgroup made as boxes get theirs: the plan the driver hands the box helper,
    carried out by the helper's own code."""
    return [Path(path) for path in Plan(driver.helper_plan()).make_cgroup(name)]


def _v2_box(driver: V2Driver, name: str) -> Path:
    """A box directory as the kernel would populate it (a plain mkdir makes no files)."""
    driver._ready = True
    driver.parent.mkdir(parents=True, exist_ok=True)
    path = make_box_cgroup(driver, name)[0]
    for name_, content in {
        "cgroup.procs": "",
        "pids.max": "max",
        "memory.max": "max",
        "memory.swap.max": "max",
        "cpu.max": "max 100000",
        "io.weight": "default 100",
        "pids.current": "4\n",
        "pids.events": "max 2\n",
        "memory.current": "1048576\n",
        "memory.peak": "50331648\n",
        "memory.events": "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n",
        "cpu.stat": "usage_usec 421575\nuser_usec 400000\nthrottled_usec 1581381\n",
        "cgroup.events": "populated 0\nfrozen 0\n",
    }.items():
        (path / name_).write_text(content)
    return path


def test_v2_writes_each_limit_where_the_kernel_reads_it(v2_tree: Path) -> None:
    driver = V2Driver(v2_tree)
    path = _v2_box(driver, "nsb-test")
    Cgroup("nsb-test", driver, [path]).set(pids=3, memory="48M", cpus=0.5, io_weight=500)
    assert (path / "pids.max").read_text() == "3"
    assert (path / "memory.max").read_text() == str(48 << 20)
    assert (path / "memory.swap.max").read_text() == "0"  # swap off when memory is capped
    assert (path / "cpu.max").read_text() == "50000 100000"
    assert (path / "io.weight").read_text() == "default 500"
    Cgroup("nsb-test", driver, [path]).set(pids=None, cpus=None)
    assert (path / "pids.max").read_text() == "max"
    assert (path / "cpu.max").read_text() == "max 100000"


def test_v2_stats_without_pids_peak_infer_the_peak_from_fork_failures(v2_tree: Path) -> None:
    driver = V2Driver(v2_tree)
    path = _v2_box(driver, "nsb-stats")
    (path / "pids.max").write_text("5\n")
    stats = Cgroup("nsb-stats", driver, [path]).stats()
    assert stats.pids_current == 4 and stats.pids_peak == 5  # pids.events says the limit was hit
    assert (stats.memory_current, stats.memory_peak, stats.oom_kills) == (1 << 20, 48 << 20, 1)
    assert (stats.cpu_usec, stats.throttled_usec) == (421575, 1581381)


def test_v2_delegates_controllers_down_to_its_parent(v2_tree: Path) -> None:
    driver = V2Driver(v2_tree)
    driver._prepare()
    # A plain file stands in for cgroup.subtree_control: each write replaces it.
    assert (driver.nest / "cgroup.subtree_control").read_text().startswith("+")
    assert driver.parent.is_dir() and driver.parent.name == "pytest-nsbox"


def test_v2_cpuset_without_the_controller_is_a_clear_error(v2_tree: Path) -> None:
    driver = V2Driver(v2_tree)
    path = _v2_box(driver, "nsb-cpuset")
    with pytest.raises(CgroupError, match="needs the cpuset controller"):
        driver.apply([path], {"cpuset": "0"})


def test_v1_finds_hierarchies_in_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    found = mounted_controllers(str(mountinfo))
    assert found == {
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "pids": Path("/sys/fs/cgroup/pids"),
    }


@pytest.fixture
def v1_tree(tmp_path: Path) -> dict[str, Path]:
    hierarchies = {c: tmp_path / c for c in ("pids", "memory", "cpu", "cpuacct")}
    for controller, root in hierarchies.items():
        (root / own_cgroup(controller).lstrip("/")).mkdir(parents=True, exist_ok=True)
    return hierarchies


def test_v1_makes_one_directory_per_hierarchy_and_writes_limits(v1_tree: dict[str, Path]) -> None:
    driver = V1Driver(v1_tree)
    dirs = make_box_cgroup(driver, "nsb-v1")
    assert {d.name for d in dirs} == {"nsb-v1"} and len(dirs) == 3  # pids, memory, cpuacct
    memory = next(d for d in dirs if d.parent == driver.parents["memory"])
    (memory / "memory.memsw.limit_in_bytes").write_text("-1")
    driver.apply(dirs, {"pids": 7, "memory": 64 << 20, "cpus": 0.25})
    assert (driver.parents["pids"] / "nsb-v1" / "pids.max").read_text() == "7"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(64 << 20)  # no swap
    assert (driver.parents["cpu"] / "nsb-v1" / "cpu.cfs_quota_us").read_text() == "25000"
    assert len(dirs) == 4  # the cpu hierarchy was joined when a limit needed it


def test_v1_plan_names_the_devices_parent_where_it_is_mounted(tmp_path: Path) -> None:
    """Every box joins the devices hierarchy; the zygote writes the allowlist in its parent's
    box cgroups, and removes them with the others."""
    hierarchies = {c: tmp_path / c for c in ("pids", "memory", "cpuacct", "devices")}
    for controller, root in hierarchies.items():
        (root / own_cgroup(controller).lstrip("/")).mkdir(parents=True, exist_ok=True)
    driver = V1Driver(hierarchies)
    plan = driver.helper_plan()
    devices_parent = str(driver.parents["devices"])
    assert plan["devices"] == devices_parent
    assert devices_parent in plan["make"] and devices_parent in plan["remove"]
    assert "devices" not in V1Driver({c: hierarchies[c] for c in ("pids", "memory")}).helper_plan()


def test_v1_stats_convert_nanoseconds_and_read_oom_kills(v1_tree: dict[str, Path]) -> None:
    driver = V1Driver(v1_tree)
    dirs = make_box_cgroup(driver, "nsb-stats")
    driver._make("cpu", "nsb-stats")
    dirs.append(driver.parents["cpu"] / "nsb-stats")
    base = {c: driver.parents[c] / "nsb-stats" for c in v1_tree}
    (base["pids"] / "pids.current").write_text("2\n")
    (base["pids"] / "pids.peak").write_text("3\n")
    (base["memory"] / "memory.usage_in_bytes").write_text("1000\n")
    (base["memory"] / "memory.max_usage_in_bytes").write_text("2000\n")
    (base["memory"] / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (base["cpuacct"] / "cpuacct.usage").write_text("421575000\n")
    (base["cpu"] / "cpu.stat").write_text("nr_periods 20\nnr_throttled 15\nthrottled_time 1581381000\n")
    stats = Cgroup("nsb-stats", driver, dirs).stats()
    assert (stats.pids_current, stats.pids_peak) == (2, 3)
    assert (stats.memory_current, stats.memory_peak, stats.oom_kills) == (1000, 2000, 2)
    assert (stats.cpu_usec, stats.throttled_usec) == (421575, 1581381)


def test_v1_a_limit_whose_controller_is_missing_is_named(v1_tree: dict[str, Path]) -> None:
    driver = V1Driver({"pids": v1_tree["pids"]})
    dirs = make_box_cgroup(driver, "nsb-partial")
    with pytest.raises(CgroupError, match="limit 'memory' needs the v1 memory controller"):
        driver.apply(dirs, {"memory": 1 << 20})


def test_a_cgroup_without_a_driver_refuses_limits_and_reports_zeros() -> None:
    cgroup = Cgroup("nsb-none", None, [])
    assert cgroup.stats().pids_current == 0 and cgroup.remove()
    with pytest.raises(CgroupError, match="no usable cgroups"):
        cgroup.set(pids=1)
