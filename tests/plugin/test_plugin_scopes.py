"""Boxes of wider scope: ``nsbox_factory_class``, ``_module``, ``_package`` and ``_session``.

Each test writes a small suite, runs it in an inner pytest (``run_inner``) and reads back what
the inner tests and hooks recorded (``recorder.py``, one JSON line per event): a box serves
every test of its scope, stops at the end of that scope, and goes through the same defaults,
hooks, failure report and ``--nsbox-keep`` as a test's own boxes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from imagebuilder import File, ImageSpec, Symlink, write_docker_save_legacy

from pytest_nsbox import cgroups, kept, state

RunInner = Callable[..., pytest.RunResult]

needs_boxes = pytest.mark.requires("boxes")

# Importable by every inner test file and conftest.py (the inner rootdir is on sys.path).
RECORDER = """
import json
import pathlib
import time

import psutil

PATH = pathlib.Path(__file__).with_name("record.jsonl")


def record(**event):
    with PATH.open("a") as handle:
        handle.write(json.dumps(event) + "\\n")


def recorded(**match):
    lines = PATH.read_text().splitlines() if PATH.exists() else []
    events = [json.loads(line) for line in lines]
    return [e for e in events if all(e.get(key) == value for key, value in match.items())]


def facts(box):
    \"\"\"What identifies a box: its id and its init (host pid and start time).\"\"\"
    return {"id": box.id, "pid": box.pid, "started": psutil.Process(box.pid).create_time()}


def gone(box_facts, timeout=5.0):
    \"\"\"Whether that init has died (a zombie not yet reaped counts: dead).\"\"\"
    deadline = time.monotonic() + timeout
    while True:
        try:
            process = psutil.Process(box_facts["pid"])
            dead = process.create_time() != box_facts["started"] or process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            dead = True
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.02)
"""

# Every hook call, with what the hook was given.
RECORDING_HOOKS = """
import pytest
from recorder import record


def _where(request):
    return {"fixture": request.fixturename, "scope": request.scope, "node": type(request.node).__name__}


def pytest_nsbox_configure(spec, request):
    record(hook="configure", hostname=spec.hostname, **_where(request))


def pytest_nsbox_started(box, request):
    record(hook="started", hostname=box.hostname, box=box.id, running=box.running, **_where(request))


def pytest_nsbox_stopping(box, request, report):
    record(hook="stopping", hostname=box.hostname, box=box.id, running=box.running,
           report=None if report is None else report.outcome, **_where(request))


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        record(hook="torn-down", test=report.nodeid.split("::")[-1])
"""


def records(pytester: pytest.Pytester, **match: Any) -> list[dict[str, Any]]:
    path = pytester.path / "record.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in events if all(e.get(key) == value for key, value in match.items())]


def the(pytester: pytest.Pytester, **match: Any) -> dict[str, Any]:
    """The one event that matches."""
    found = records(pytester, **match)
    assert len(found) == 1, (match, records(pytester))
    return found[0]


def dead(box_facts: dict[str, Any]) -> bool:
    try:
        process = psutil.Process(box_facts["pid"])
        return process.create_time() != box_facts["started"] or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def recorder(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(recorder=RECORDER)


@needs_boxes
def test_a_module_box_serves_every_test_of_its_module_and_stops_after_it(
    pytester: pytest.Pytester, run_inner: RunInner, recorder: None
) -> None:
    pytester.makepyfile(
        test_a_server="""
        import pytest
        from recorder import facts, record

        @pytest.fixture(scope="module")
        def server(nsbox_factory_module):
            box = nsbox_factory_module(hostname="server")
            box.spawn(["sleep", "600"])
            return box

        def test_one(server):
            server.run("echo written-by-test-one > /var/tmp/note", check=True)
            record(test="one", **facts(server))

        def test_two(server):
            processes = [p.name() for p in server.processes()]
            record(test="two", note=server.read_text("/var/tmp/note"), processes=processes, **facts(server))
        """,
        test_b_after="""
        import pytest_nsbox
        from recorder import facts, gone, record, recorded

        def test_the_first_modules_box_has_stopped(nsbox_factory_module):
            [first] = recorded(test="one")
            assert first["id"] not in [box.id for box in pytest_nsbox.live_boxes()]
            assert gone(first)
            record(test="b", **facts(nsbox_factory_module(hostname="other")))
        """,
    )
    run_inner("-v").assert_outcomes(passed=3)
    one, two, b = the(pytester, test="one"), the(pytester, test="two"), the(pytester, test="b")
    # One box for the module: the same id and init, the file test one wrote, the sleep of its fixture.
    assert (two["id"], two["pid"], two["started"]) == (one["id"], one["pid"], one["started"])
    assert two["note"] == "written-by-test-one\n"
    assert "sleep" in two["processes"]
    # The next module got a box of its own (and saw the first one stopped); both are gone now.
    assert b["id"] != one["id"]
    assert dead(one) and dead(b)


@needs_boxes
def test_a_class_box_serves_its_class_only(
    pytester: pytest.Pytester, run_inner: RunInner, recorder: None
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from recorder import facts, gone, record, recorded

        @pytest.fixture(scope="class")
        def box(nsbox_factory_class):
            return nsbox_factory_class()

        class TestFirst:
            def test_one(self, box):
                record(test="first-one", **facts(box))

            def test_two(self, box):
                record(test="first-two", **facts(box))

        class TestSecond:
            def test_one(self, box):
                [first] = recorded(test="first-one")
                assert gone(first)
                record(test="second-one", **facts(box))
        """
    )
    run_inner().assert_outcomes(passed=3)
    first_one, first_two = the(pytester, test="first-one"), the(pytester, test="first-two")
    second = the(pytester, test="second-one")
    assert first_one["id"] == first_two["id"]
    assert second["id"] != first_one["id"]


def _image(path: Path) -> str:
    """dash and the libraries it needs, copied from the host, and a file naming the image."""
    entries: list[object] = []
    program = os.path.realpath("/bin/dash")
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    for name in [program] + [p for p in listing.split() if p.startswith("/")]:
        entries.append(File(name, Path(os.path.realpath(name)).read_bytes(), mode=0o755))
    entries.append(Symlink("/bin/sh", program))
    spec = ImageSpec([entries, [File("/etc/which-image", b"scoped\n")]], tag="scoped:1")
    return str(write_docker_save_legacy(path, [spec]))


@needs_boxes
def test_the_command_line_the_ini_and_the_configure_hook_reach_a_module_box(
    pytester: pytest.Pytester, run_inner: RunInner, recorder: None, tmp_path: Path
) -> None:
    image = _image(tmp_path / "image.tar")
    pytester.makeini("[pytest]\nnsbox_subnet = 10.219.64.0/24\n")
    pytester.makeconftest(
        """
        from recorder import record

        def pytest_nsbox_configure(spec, request):
            record(hook="configure", fixture=request.fixturename, image=spec.image, subnet=spec.subnet)
            return spec.merged("conftest.py", hostname="from-hook")
        """
    )
    pytester.makepyfile(
        """
        import ipaddress

        import pytest

        @pytest.fixture(scope="module")
        def server(nsbox_factory_module):
            return nsbox_factory_module(network="bridge")

        def test_the_box_is_as_configured(server):
            assert server.read_text("/etc/which-image") == "scoped\\n"  # --nsbox-image
            assert server.hostname == "from-hook"
            assert server.read_text("/etc/hostname") == "from-hook\\n"
            assert ipaddress.ip_address(server.ip) in ipaddress.ip_network("10.219.64.0/24")  # ini

        def test_a_box_made_in_a_test_body_too(nsbox_factory_session):
            assert nsbox_factory_session().read_text("/etc/which-image") == "scoped\\n"
        """
    )
    result = run_inner(f"--nsbox-image={image}", f"--nsbox-cache={tmp_path / 'cache'}", timeout=120)
    result.assert_outcomes(passed=2)
    configured = records(pytester, hook="configure")
    assert [e["fixture"] for e in configured] == ["nsbox_factory_module", "nsbox_factory_session"]
    for event in configured:
        assert event["image"] == image and event["subnet"] == "10.219.64.0/24"


@needs_boxes
def test_the_hooks_run_once_per_box_and_stopping_gets_no_report(
    pytester: pytest.Pytester, run_inner: RunInner, recorder: None
) -> None:
    pytester.makeconftest(RECORDING_HOOKS)
    pytester.makepyfile(
        """
        import pytest
        from recorder import record

        @pytest.fixture(scope="module")
        def pair(nsbox_factory_module):
            return nsbox_factory_module(hostname="web"), nsbox_factory_module(hostname="db")

        def test_one(pair):
            record(hook="call", test="one")

        def test_two(pair):
            record(hook="call", test="two")

        def test_three_fails(pair):
            record(hook="call", test="three")
            assert False
        """
    )
    run_inner().assert_outcomes(passed=2, failed=1)
    where = {"fixture": "nsbox_factory_module", "scope": "module", "node": "Module"}
    web = the(pytester, hook="started", hostname="web")["box"]
    db = the(pytester, hook="started", hostname="db")["box"]
    calls: list[tuple[Any, ...]] = []
    for event in records(pytester):
        if event["hook"] in ("configure", "started", "stopping"):
            assert {key: event[key] for key in where} == where, event
            calls.append((event["hook"], event["hostname"], event.get("running"), event.get("report", "-")))
        else:
            calls.append((event["hook"], event["test"]))
    assert calls == [
        ("configure", "web", None, "-"),
        ("started", "web", True, "-"),
        ("configure", "db", None, "-"),
        ("started", "db", True, "-"),
        ("call", "one"),
        ("torn-down", "test_one"),
        ("call", "two"),
        ("torn-down", "test_two"),
        ("call", "three"),
        ("stopping", "db", True, None),  # at the end of the module, the last made first
        ("stopping", "web", True, None),
        ("torn-down", "test_three_fails"),
    ]
    assert [e["box"] for e in records(pytester, hook="stopping")] == [db, web]


_TEST_HEADER = re.compile(r"^_{3,} (?:ERROR at setup of )?(\S+) _{3,}$")
_SECTION = re.compile(r"^-+ nsbox box ([0-9a-f]{8}) -+$")


def sections_by_test(result: pytest.RunResult) -> dict[str, list[str]]:
    """The box ids of the ``nsbox box ID`` sections under each test's header, in order."""
    found: dict[str, list[str]] = {}
    test: str | None = None
    for line in result.outlines:
        header = _TEST_HEADER.match(line)
        if header:
            test = header.group(1)
            found.setdefault(test, [])
        elif line.startswith("=") and "short test summary" in line:
            test = None
        elif test is not None and (section := _SECTION.match(line)):
            found[test].append(section.group(1))
    return found


@needs_boxes
def test_a_failing_test_that_used_a_session_box_describes_it(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session")
        def shared(nsbox_factory_session):
            box = nsbox_factory_session(hostname="shared")
            print("SHARED", box.id)
            return box

        @pytest.fixture
        def client(shared):
            return shared
        """
    )
    pytester.makepyfile(
        """
        import pytest

        def test_fails_directly(shared):
            shared.run("echo ran-by-the-failing-test")
            assert False

        def test_passes(shared):
            print("output of a passing test")  # so that -rA shows its sections, if it has any
            assert shared.run("true").returncode == 0

        def test_fails_through_a_fixture(client):
            assert False

        def test_fails_with_a_box_of_its_own_too(shared, nsbox_factory_session, nsbox):
            print("OWN", nsbox.id)
            assert False

        @pytest.fixture
        def broken(shared):
            raise RuntimeError("the client did not start")

        def test_setup_fails(broken):
            pass

        def test_fails_without_the_box():
            assert False
        """
    )
    result = run_inner("-rA")  # -rA: passed tests show their sections too
    result.assert_outcomes(passed=1, failed=4, errors=1)
    output = result.stdout.str()
    shared = output.split("SHARED ", 1)[1][:8]
    own = output.split("OWN ", 1)[1][:8]
    assert sections_by_test(result) == {
        "test_fails_directly": [shared],
        "test_passes": [],
        "test_fails_through_a_fixture": [shared],
        "test_fails_with_a_box_of_its_own_too": [own, shared],
        "test_setup_fails": [shared],
        "test_fails_without_the_box": [],
    }
    assert "ran-by-the-failing-test" in output  # the section is the box's, made while it ran
    assert "hostname:  shared" in output


@needs_boxes
def test_bad_options_fail_naming_the_factory_and_start_nothing(
    pytester: pytest.Pytester, run_inner: RunInner, recorder: None
) -> None:
    pytester.makeconftest(RECORDING_HOOKS)
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="module")
        def bad(nsbox_factory_module):
            return nsbox_factory_module(hostname="not_valid")

        def test_module_fixture_with_a_bad_hostname(bad):
            pass

        def test_unknown_option(nsbox_factory_session):
            nsbox_factory_session(hostnme="web")

        def test_bad_size(nsbox_factory_class):
            nsbox_factory_class(tmpfs={"/data": "lots"})

        def test_bad_type(nsbox_factory_package):
            nsbox_factory_package(env="A=1")

        def test_the_factory_still_works(nsbox_factory_module):
            assert nsbox_factory_module(hostname="fine").run("hostname").stdout == "fine\\n"
        """
    )
    result = run_inner()
    result.assert_outcomes(errors=1, failed=3, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_module_fixture_with_a_bad_hostname _*",
            "*nsbox_factory_module(...): hostname: 'not_valid' is not a valid hostname*",
        ]
    )
    result.stdout.fnmatch_lines(["*nsbox_factory_session(...): unknown option(s) hostnme; known options*"])
    result.stdout.fnmatch_lines(["*nsbox_factory_class(...): tmpfs[[]'/data'[]]: expected a size like*"])
    result.stdout.fnmatch_lines(["*nsbox_factory_package(...): env: *"])
    # Refused before the hooks or the kernel saw anything: only the good box was made.
    assert [e["hostname"] for e in records(pytester, hook="configure")] == ["fine"]


@needs_boxes
def test_a_session_box_serves_two_modules_and_stops_with_the_session(
    pytester: pytest.Pytester, run_inner: RunInner, recorder: None
) -> None:
    pytester.makeconftest(
        RECORDING_HOOKS
        + """
import pytest_nsbox
from recorder import facts, gone, recorded


@pytest.fixture(scope="session")
def shared(nsbox_factory_session):
    return nsbox_factory_session(hostname="shared")


def pytest_sessionfinish(session):
    # After the session's fixtures are torn down: the box has stopped, before the plugin's
    # own last-chance cleanup at unconfigure.
    [first] = recorded(test="a")
    record(hook="session-finish", live=[box.id for box in pytest_nsbox.live_boxes()], gone=gone(first))
"""
    )
    pytester.makepyfile(
        test_a="""
        from recorder import facts, record

        def test_a(shared):
            shared.run("echo from-module-a > /var/tmp/note", check=True)
            record(hook="call", test="a", **facts(shared))
        """,
        test_b="""
        from recorder import facts, record

        def test_b(shared):
            record(hook="call", test="b", note=shared.read_text("/var/tmp/note"), **facts(shared))
        """,
    )
    run_inner().assert_outcomes(passed=2)
    a, b = the(pytester, test="a"), the(pytester, test="b")
    assert (b["id"], b["pid"], b["started"]) == (a["id"], a["pid"], a["started"])
    assert b["note"] == "from-module-a\n"
    started, stopping = the(pytester, hook="started"), the(pytester, hook="stopping")
    assert started["box"] == stopping["box"] == a["id"]
    assert (stopping["scope"], stopping["node"], stopping["report"]) == ("session", "Session", None)
    # Stopped after the last module, not only when pytest exited.
    assert [e["hook"] for e in records(pytester)][-3:] == ["stopping", "torn-down", "session-finish"]
    finish = the(pytester, hook="session-finish")
    assert finish["live"] == [] and finish["gone"] is True


@needs_boxes
def test_a_package_box_serves_its_package_unless_its_fixture_lasts_longer(
    pytester: pytest.Pytester, run_inner: RunInner, recorder: None
) -> None:
    # pytest ties a package-scoped fixture to the package its definition is in: ``server`` is
    # per package, ``everywhere`` (in the rootdir's conftest.py, in no package) per session.
    # pkg_a's conftest.py also has a hook, for the boxes of pkg_a only.
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="package")
        def everywhere(nsbox_factory_package):
            return nsbox_factory_package(hostname="everywhere")
        """
    )
    hook = """
    def pytest_nsbox_configure(spec, request):
        return spec.merged("pkg_a/conftest.py", env={**spec.env, "CONFIGURED_BY": "pkg_a"})
    """
    for name, earlier in (("pkg_a", "[]"), ("pkg_b", 'recorded(package="pkg_a")')):
        pytester.mkpydir(name)
        pytester.makepyfile(
            **{
                f"{name}/conftest": textwrap.dedent(
                    f"""
                    import pytest

                    @pytest.fixture(scope="package")
                    def server(nsbox_factory_package):
                        return nsbox_factory_package(hostname="{name.replace("_", "-")}")
                    """
                )
                + (textwrap.dedent(hook) if name == "pkg_a" else ""),
                f"{name}/test_{name}": f"""
                from recorder import facts, gone, record, recorded

                def configured_by(box):
                    return box.run("echo ${{CONFIGURED_BY:-nobody}}").stdout.strip()

                def test_one(server, everywhere):
                    assert everywhere.running
                    assert all(gone(box) for box in {earlier}), "a package's box outlived it"
                    record(package="{name}", test="one", everywhere=everywhere.id,
                           configured_by=[configured_by(server), configured_by(everywhere)], **facts(server))

                def test_two(server):
                    record(package="{name}", test="two", **facts(server))
                """,
            }
        )
    run_inner("-v").assert_outcomes(passed=4)
    a1, a2 = the(pytester, package="pkg_a", test="one"), the(pytester, package="pkg_a", test="two")
    b1, b2 = the(pytester, package="pkg_b", test="one"), the(pytester, package="pkg_b", test="two")
    assert a1["id"] == a2["id"] and b1["id"] == b2["id"] and a1["id"] != b1["id"]
    assert a1["everywhere"] == b1["everywhere"]  # still running in pkg_b: the inner test checks
    # A box goes through the hooks of its package's directory; the session's, the rootdir's.
    assert a1["configured_by"] == ["pkg_a", "nobody"]
    assert b1["configured_by"] == ["nobody", "nobody"]


@needs_boxes
def test_keep_failed_keeps_the_boxes_of_a_scope_where_a_test_failed(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        test_a_fails="""
        import pytest

        @pytest.fixture(scope="module")
        def server(nsbox_factory_module):
            return nsbox_factory_module(hostname="kept-server")

        def test_passes(server):
            pass

        def test_fails(server):
            assert False
        """,
        test_b_passes="""
        import pytest

        @pytest.fixture(scope="module")
        def server(nsbox_factory_module):
            return nsbox_factory_module(hostname="not-kept")

        def test_passes(server):
            pass

        def test_uses_only_the_factory(nsbox_factory_module):
            pass
        """,
    )
    before = set(kept.entries())
    try:
        result = run_inner("--nsbox-keep=failed")
        result.assert_outcomes(passed=3, failed=1)
        result.stdout.fnmatch_lines(
            ["*nsbox: kept boxes*", "* kept-server * test_a_fails.py", "*nsbox shell BOX_ID*"]
        )
        assert "not-kept" not in result.stdout.str()
        new = {key: entry for key, entry in kept.entries().items() if key not in before}
        assert [entry["hostname"] for entry in new.values()] == ["kept-server"]
        assert psutil.Process(next(iter(new.values()))["pid"]).name() == "nsbox-init"
    finally:
        _end_kept(set(kept.entries()) - before)


def _end_kept(box_ids: set[str]) -> None:
    """End the boxes this test kept, and only those (``nsbox gc`` would end every kept box)."""
    if not box_ids:
        return
    backend = cgroups.driver()
    with state.locked_document(kept.DOCUMENT) as document:
        for box_id in box_ids:
            entry = document.pop(box_id)
            kept._kill(entry)
            if backend is not None and entry.get("cgroup"):
                backend.remove_named(entry["cgroup"])
    deadline = time.monotonic() + 5
    while set(kept.entries()) & box_ids and time.monotonic() < deadline:
        time.sleep(0.05)


def test_on_a_host_without_boxes_their_tests_skip_or_fail_when_strict(
    pytester: pytest.Pytester, run_inner: RunInner, fake_no_root: None
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="module")
        def server(nsbox_factory_module):
            return nsbox_factory_module()

        def test_one(server):
            pass

        def test_two(nsbox_factory_session):
            nsbox_factory_session()
        """
    )
    result = run_inner("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["SKIPPED*nsbox: this host cannot make boxes: root: pretend*"])
    strict = run_inner("--nsbox-strict")
    strict.assert_outcomes(errors=2)
    strict.stdout.fnmatch_lines(["*--nsbox-strict: this host cannot make boxes: root: pretend*"])


def test_the_factories_are_listed_with_their_scopes(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--fixtures")
    assert result.ret == 0
    for scope in ("class", "module", "package", "session"):
        result.stdout.fnmatch_lines(
            [f"nsbox_factory_{scope} [[]{scope} scope[]] -- *pytest_nsbox*plugin.py:*"]
        )
