"""The ``nsbox_cluster`` fixture: marker defaults, hooks, teardown, and the failure report's
nemesis timeline."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")


def test_clusters_take_the_marker_defaults_and_all_stop_after_the_test(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_nsbox import ConfigError, live_boxes

        made = []

        @pytest.mark.nsbox(env={"ROLE": "replica"}, hostname="ignored")
        def test_two_clusters(nsbox_cluster):
            first = nsbox_cluster(["db1", "db2"])
            second = nsbox_cluster(2, env={"ROLE": "other"})
            made.extend([*first, *second])
            assert first.names == ("db1", "db2") and second.names == ("n1", "n2")
            assert first["db2"].run("echo $ROLE").stdout == "replica\\n"
            assert second["n1"].run("echo $ROLE").stdout == "other\\n"
            assert first["db1"].run("getent hosts db2").stdout.split()[0] == first["db2"].ip
            assert first.bridge != second.bridge
            with pytest.raises(ConfigError, match="more than once"):
                nsbox_cluster(["a", "a"])
            with pytest.raises(ConfigError, match="hostname= is set by the cluster"):
                nsbox_cluster(2, hostname="x")

        def test_all_stopped():
            assert len(made) == 4
            assert not any(box.running for box in made)
            assert not [box for box in live_boxes() if box in made]
        """
    )
    result = run_inner("-p", "no:randomly")
    result.assert_outcomes(passed=2)


def test_nodes_go_through_the_hooks(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makeconftest(
        """
        started = []

        def pytest_nsbox_configure(spec, request):
            if request.node.name == "test_bad_hook":
                return spec.merged("hook", hostname="renamed")
            return spec.merged("hook", env={"FROM_HOOK": spec.hostname})

        def pytest_nsbox_started(box, request):
            started.append(box.hostname)
        """
    )
    pytester.makepyfile(
        """
        import conftest

        def test_hooked(nsbox_cluster):
            cluster = nsbox_cluster(["x", "y"])
            assert cluster["y"].run("echo $FROM_HOOK").stdout == "y\\n"
            assert conftest.started == ["x", "y"]

        def test_bad_hook(nsbox_cluster):
            nsbox_cluster(2)
        """
    )
    result = run_inner("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*cluster node n1: the cluster sets hostname*the hook changed hostname*"])


def test_a_failure_report_shows_the_nemesis_timeline(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        import time

        import pytest

        @pytest.fixture
        def slow_setup():
            time.sleep(0.4)

        def test_split(slow_setup, nsbox_cluster):
            cluster = nsbox_cluster(["db1", "db2", "db3"])
            cluster.partition(["db1"], ["db2", "db3"])
            cluster.heal()
            with cluster["db3"].paused():
                pass
            cluster["db2"].restart()
            cluster.block("db2", "db1")
            print("NODES", *(box.id for box in cluster))
            assert False
        """
    )
    result = run_inner()
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    node_ids = output.split("NODES ", 1)[1].split()[:3]
    for box_id in node_ids:
        assert f"nsbox box {box_id}" in output
    section = output.split("nsbox cluster db1, db2, db3", 1)[1]
    timeline = re.findall(r"^\s+\+(\d+\.\d{3})s (.*)$", section, re.MULTILINE)
    assert [text for _, text in timeline][1:] == [
        "partition [db1] | [db2, db3]",
        "heal",
        "pause db3",
        "resume db3",
        "restart db2",
        "block db2 -> db1",
    ]
    assert timeline[0][1].startswith("started db1 ")
    times = [float(seconds) for seconds, _ in timeline]
    assert times == sorted(times)
    # Counted from the test's start, not the cluster's: the fixture before it slept 0.4 s.
    assert times[0] >= 0.4
    assert "times from the test's start" in section
    assert "cut now: db2 -> db1" in section
