"""The plugin hooks: ``pytest_nsbox_configure``, ``pytest_nsbox_started``, ``pytest_nsbox_stopping``.

The inner run's conftest.py implements them and writes one JSON line per call to a file; the
outer test reads the calls back and checks their arguments and their order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")

RECORDING_CONFTEST = """
import json
import os

import pytest

EVENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "events.jsonl")
BOXES = {}


def record(**event):
    with open(EVENTS, "a") as handle:
        handle.write(json.dumps(event) + "\\n")


def pytest_nsbox_configure(spec, request):
    record(hook="configure", test=request.node.name, fixture=request.fixturename,
           hostname=spec.hostname, spec=type(spec).__name__)


def pytest_nsbox_started(box, request):
    BOXES[box.id] = box
    record(hook="started", test=request.node.name, fixture=request.fixturename,
           hostname=box.hostname, box=box.id, running=box.running)


def pytest_nsbox_stopping(box, request, report):
    record(hook="stopping", test=request.node.name, fixture=request.fixturename,
           hostname=box.hostname, box=box.id, running=box.running,
           report=None if report is None else [report.when, report.outcome])


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        record(hook="torn-down", test=report.nodeid.split("::")[-1],
               running=sorted(i for i, box in BOXES.items() if box.running))


@pytest.fixture
def call_event(request):
    return lambda **extra: record(hook="call", test=request.node.name, **extra)
"""


def events(pytester: pytest.Pytester) -> list[dict[str, Any]]:
    path = pytester.path / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_test(pytester: pytest.Pytester, test: str) -> list[tuple[Any, ...]]:
    """(hook, fixture, hostname, ...) of one inner test's calls, in order."""
    calls = []
    for event in events(pytester):
        if event["test"] != test:
            continue
        hook = event["hook"]
        if hook == "configure":
            calls.append((hook, event["fixture"], event["hostname"], event["spec"]))
        elif hook == "started":
            calls.append((hook, event["fixture"], event["hostname"], event["running"]))
        elif hook == "stopping":
            calls.append((hook, event["fixture"], event["hostname"], event["running"], event["report"]))
        elif hook == "torn-down":
            calls.append((hook, event["running"]))
        else:
            calls.append((hook,))
    return calls


def test_hooks_are_called_in_order_with_their_arguments(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makeconftest(RECORDING_CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(hostname="one")
        def test_nsbox(nsbox, call_event):
            call_event()

        def test_factory(nsbox_factory, call_event):
            nsbox_factory(hostname="web")
            call_event()
            nsbox_factory(hostname="db")

        def test_overlay_root_alone(overlay_root, call_event):
            call_event()

        def test_nsbox_and_overlay_root(nsbox, overlay_root, call_event):
            call_event()  # one box: overlay_root is the nsbox's root

        def test_netpair(netpair, call_event):
            call_event()

        def test_fails(nsbox, call_event):
            call_event()
            assert False

        @pytest.fixture
        def broken(nsbox):
            raise RuntimeError("setup fails after the box started")

        def test_setup_fails(broken):
            pass

        def test_stops_its_box(nsbox, call_event):
            nsbox.stop()
            call_event()
        """
    )
    result = run_inner()
    result.assert_outcomes(passed=6, failed=1, errors=1)

    passed = ["call", "passed"]
    assert by_test(pytester, "test_nsbox") == [
        ("configure", "nsbox", "one", "BoxSpec"),
        ("started", "nsbox", "one", True),
        ("call",),
        ("stopping", "nsbox", "one", True, passed),
        ("torn-down", []),
    ]
    assert by_test(pytester, "test_factory") == [
        ("configure", "nsbox_factory", "web", "BoxSpec"),
        ("started", "nsbox_factory", "web", True),
        ("call",),
        ("configure", "nsbox_factory", "db", "BoxSpec"),
        ("started", "nsbox_factory", "db", True),
        ("stopping", "nsbox_factory", "db", True, passed),  # the last started stops first
        ("stopping", "nsbox_factory", "web", True, passed),
        ("torn-down", []),
    ]
    assert by_test(pytester, "test_overlay_root_alone") == [
        ("configure", "overlay_root", "box", "BoxSpec"),
        ("started", "overlay_root", "box", True),
        ("call",),
        ("stopping", "overlay_root", "box", True, passed),
        ("torn-down", []),
    ]
    assert by_test(pytester, "test_nsbox_and_overlay_root") == [
        ("configure", "nsbox", "box", "BoxSpec"),
        ("started", "nsbox", "box", True),
        ("call",),
        ("stopping", "nsbox", "box", True, passed),
        ("torn-down", []),
    ]
    assert by_test(pytester, "test_netpair") == [
        ("configure", "netpair", "a", "BoxSpec"),
        ("configure", "netpair", "b", "BoxSpec"),
        ("started", "netpair", "a", True),
        ("started", "netpair", "b", True),
        ("call",),
        ("stopping", "netpair", "b", True, passed),
        ("stopping", "netpair", "a", True, passed),
        ("torn-down", []),
    ]
    assert by_test(pytester, "test_fails") == [
        ("configure", "nsbox", "box", "BoxSpec"),
        ("started", "nsbox", "box", True),
        ("call",),
        ("stopping", "nsbox", "box", True, ["call", "failed"]),
        ("torn-down", []),
    ]
    assert by_test(pytester, "test_setup_fails") == [
        ("configure", "nsbox", "box", "BoxSpec"),
        ("started", "nsbox", "box", True),
        ("stopping", "nsbox", "box", True, None),  # no call phase: no report
        ("torn-down", []),
    ]
    assert by_test(pytester, "test_stops_its_box") == [
        ("configure", "nsbox", "box", "BoxSpec"),
        ("started", "nsbox", "box", True),
        ("call",),  # no stopping: the test stopped the box itself
        ("torn-down", []),
    ]


def test_configure_changes_the_box(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makeconftest(
        """
        def pytest_nsbox_configure(spec, request):
            if request.node.get_closest_marker("keep"):
                return None  # the spec as asked
            hostname = "tuned" if spec.hostname == "box" else spec.hostname
            return spec.merged(
                "conftest.py",
                hostname=hostname,
                env={**spec.env, "FROM_HOOK": request.fixturename},
                limits={**spec.limits, "pids": 42},
            )
        """
    )
    pytester.makeini("[pytest]\nmarkers = keep")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(env={"FROM_MARKER": "1"})
        def test_nsbox(nsbox):
            assert nsbox.hostname == "tuned"
            assert nsbox.run("hostname").stdout == "tuned\\n"
            assert nsbox.run("echo $FROM_MARKER $FROM_HOOK").stdout == "1 nsbox\\n"
            assert nsbox.spec.limits["pids"] == 42
            pids_max = [
                nsbox.read_text(path) for path in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max")
                if nsbox.exists(path)
            ]
            assert pids_max in ([], ["42\\n"])

        def test_factory(nsbox_factory):
            web = nsbox_factory(hostname="web")
            assert web.hostname == "web"  # the hook saw the factory's options
            assert web.run("echo $FROM_HOOK").stdout == "nsbox_factory\\n"

        def test_overlay_root(overlay_root):
            assert open(overlay_root.merged + "/etc/hostname").read() == "tuned\\n"

        def test_netpair(netpair):
            assert netpair.a.hostname == "a"
            assert netpair.b.run("echo $FROM_HOOK").stdout == "netpair\\n"
            assert netpair.a.spec.limits["pids"] == 42
            assert netpair.a.run("getent hosts b").stdout.split()[0] == netpair.b.ip

        @pytest.mark.keep
        def test_none_keeps_the_spec(nsbox):
            assert nsbox.hostname == "box"
            assert not nsbox.spec.limits
        """
    )
    run_inner().assert_outcomes(passed=5)


def test_a_bad_configure_fails_the_test_and_says_why(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makeconftest(
        """
        def pytest_nsbox_configure(spec, request):
            if request.node.name == "test_not_a_spec":
                return {"hostname": "x"}
            if request.node.name == "test_bad_value":
                return spec.merged("conftest.py", hostname="-bad-")
            if request.node.name == "test_pair_hostname":
                return spec.merged("conftest.py", hostname="c")
        """
    )
    pytester.makepyfile(
        """
        def test_not_a_spec(nsbox):
            pass

        def test_bad_value(nsbox):
            pass

        def test_pair_hostname(netpair):
            pass
        """
    )
    result = run_inner()
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*pytest_nsbox_configure must return a BoxSpec or None, got {'hostname': 'x'}*",
            "*pytest_nsbox_configure: conftest.py: hostname: '-bad-' is not a valid hostname*",
            "*pytest_nsbox_configure: netpair box a: the pair sets hostname, network, nat and subnet "
            "itself; the hook changed hostname*",
        ]
    )


def test_a_failing_stopping_hook_still_stops_the_boxes(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makeconftest(
        RECORDING_CONFTEST
        + """

@pytest.hookimpl(tryfirst=True)
def pytest_nsbox_stopping(box, request, report):
    raise RuntimeError(f"stopping hook failed for {box.hostname}")
"""
    )
    pytester.makepyfile(
        """
        def test_factory(nsbox_factory):
            nsbox_factory(hostname="one")
            nsbox_factory(hostname="two")

        def test_pair(netpair):
            pass
        """
    )
    result = run_inner()
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(["*RuntimeError: stopping hook failed for two*"])
    result.stdout.fnmatch_lines(["*RuntimeError: stopping hook failed for b*"])
    # Every box was stopped all the same, at its test's teardown.
    torn_down = [event for event in events(pytester) if event["hook"] == "torn-down"]
    assert [event["running"] for event in torn_down] == [[], []]
    started = [event for event in events(pytester) if event["hook"] == "started"]
    assert len(started) == 4


def test_a_conftest_hook_applies_below_its_directory(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makeconftest(
        """
        def pytest_nsbox_configure(spec, request):
            return spec.merged("conftest.py", hostname="outer")
        """
    )
    sub = pytester.mkpydir("sub")
    (sub / "conftest.py").write_text(
        "def pytest_nsbox_configure(spec, request):\n"
        "    return spec.merged('sub/conftest.py', hostname='inner', env={'SUB': '1'})\n"
    )
    (sub / "test_inside.py").write_text(
        "def test_inside(nsbox):\n"
        "    # The deeper conftest's hook is called first, and the first spec returned wins.\n"
        "    assert nsbox.run('echo $(hostname) $SUB').stdout == 'inner 1\\n'\n"
    )
    pytester.makepyfile(
        test_outside="""
        def test_outside(nsbox):
            assert nsbox.run("echo $(hostname) $SUB").stdout == "outer\\n"
        """
    )
    run_inner().assert_outcomes(passed=2)
