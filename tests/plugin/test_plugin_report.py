"""A failed test's report describes its boxes: one ``nsbox box ID`` section per box.

Each test runs an inner pytest (in a subprocess) whose tests fail on purpose, and reads the
sections out of its terminal output.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")

_HEADER = re.compile(r"^-+ nsbox box ([0-9a-f]{8}) -+$")
# Where a section ends: the next section's header, a test's header or the summary.
_END = re.compile(r"^(-{3,}|_{3,}|={3,}) ")


def sections(result: pytest.RunResult) -> dict[str, str]:
    """The ``nsbox box ID`` sections of an inner run's output: {box id: text}."""
    found: dict[str, str] = {}
    box_id: str | None = None
    current: list[str] = []
    for line in [*result.outlines, "=== end"]:
        if box_id is not None and _END.match(line):
            found[box_id] = "\n".join(current)
            box_id = None
        header = _HEADER.match(line)
        if header:
            box_id, current = header.group(1), []
        elif box_id is not None:
            current.append(line)
    return found


def test_a_failed_test_shows_its_box(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(hostname="web", limits={"pids": 50})
        def test_fails(nsbox):
            nsbox.run("echo first-command")
            nsbox.run("echo second-command")
            nsbox.run("mkdir /var/tmp/nsbox-report && echo x > /var/tmp/nsbox-report/file")
            nsbox.run("echo '# changed' >> /etc/passwd")
            nsbox.spawn(["sleep", "300"])
            nsbox.run("for i in $(seq 1 40); do echo line-$i; done")
            nsbox.run("echo 'loading config'; echo 'error: disk full' >&2; exit 3")
            print("BOX", nsbox.id)
            assert False, "the server did not answer"
        """
    )
    result = run_inner()
    result.assert_outcomes(failed=1)
    found = sections(result)
    box_id = result.stdout.str().split("BOX ", 1)[1][:8]
    assert list(found) == [box_id]
    text = found[box_id]
    assert f"box:       {box_id} (running" in text  # described before teardown stopped it
    assert "image:     host /" in text
    assert "hostname:  web" in text
    assert "ip:        none (loopback only)" in text
    assert "limits:    pids=50" in text
    assert re.search(r"cgroup:    (oom kills 0, pids \d+ now, \d+ peak|none)", text)
    # The process tree at the failure: the init, and the sleep still running under it.
    assert re.search(r"^  1 \[\d+\] nsbox-init$", text, flags=re.M)
    assert re.search(r"^    \d+ \[\d+\] sleep 300$", text, flags=re.M)
    # The last five commands, oldest first, with their exit status and the tail of their output.
    assert "last 5 commands of 7, oldest first:" in text
    assert "first-command" not in text and "second-command" not in text
    commands = re.findall(r"^  \$ (.*)$", text, flags=re.M)
    assert commands[0] == "mkdir /var/tmp/nsbox-report && echo x > /var/tmp/nsbox-report/file"
    assert commands[2:] == [
        "sleep 300",
        "for i in $(seq 1 40); do echo line-$i; done",
        "echo 'loading config'; echo 'error: disk full' >&2; exit 3",
    ]
    assert "-> still running" in text
    assert "stdout (last 3 of 40 lines):\n      line-38\n      line-39\n      line-40" in text
    assert "-> exit 3 after" in text
    assert "stdout:\n      loading config\n    stderr:\n      error: disk full" in text
    # What the box changed in its root.
    # What the box changed in its root: a new directory is one line.
    assert "root changes: 1 added, 1 modified, 0 deleted (a directory added or deleted whole is one" in text
    assert "  A /var/tmp/nsbox-report/\n  M /etc/passwd" in text


def test_a_passing_test_has_no_section(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        def test_passes(nsbox, nsbox_factory):
            nsbox_factory(hostname="other").run("true")
            print("captured output of a passing test")
            assert nsbox.run("true").returncode == 0
        """
    )
    result = run_inner("-rA")  # -rA shows the sections of passed tests too
    result.assert_outcomes(passed=1)
    assert "captured output of a passing test" in result.stdout.str()
    assert "nsbox box" not in result.stdout.str()


def test_a_failed_test_shows_the_last_lines_of_its_box_s_logs(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        """
        import pytest

        DAEMON = (
            "for i in $(seq 1 30); do echo \\"app: request $i served\\"; done >> /var/log/app.log;"
            "echo 'app: fatal: cannot open /srv/data/db: No such file or directory' >> /var/log/app.log"
        )

        def test_default_logs(nsbox):
            nsbox.run(DAEMON, check=True)  # its output goes to its log only
            assert nsbox.exists("/srv/data/db"), "the app did not create its database"

        @pytest.mark.nsbox(logs=["/srv/app/*.log"])
        def test_logs_of_the_marker(nsbox):
            nsbox.run("mkdir -p /srv/app && echo 'worker: lost the lock' > /srv/app/worker.log", check=True)
            nsbox.run("echo 'not asked for' > /var/log/other.log", check=True)
            assert False

        def test_passes(nsbox):
            nsbox.run(DAEMON, check=True)
        """
    )
    result = run_inner("-rA")  # -rA shows the sections of passed tests too
    result.assert_outcomes(failed=2, passed=1)
    default, marker = sections(result).values()  # none for the test that passed
    tail = "\n".join(f"  app: request {i} served" for i in range(12, 31))
    assert f"log /var/log/app.log (last 20 of 31 lines):\n{tail}\n" in default
    assert "  app: fatal: cannot open /srv/data/db: No such file or directory" in default
    assert "log /srv/app/worker.log:\n  worker: lost the lock" in marker
    assert "log /var/log/other.log" not in marker


def test_a_failed_setup_shows_the_boxes_started_so_far(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def server(nsbox):
            nsbox.run("echo 'bind: address in use' >&2; exit 98")
            raise RuntimeError("the server did not start")

        def test_uses_server(server):
            pass
        """
    )
    result = run_inner()
    result.assert_outcomes(errors=1)
    [text] = sections(result).values()
    assert "-> exit 98 after" in text
    assert "bind: address in use" in text
    assert "nsbox-init" in text


def test_a_netpair_failure_lists_both_boxes(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        def test_pair(netpair):
            print("PAIR", netpair.a.id, netpair.a.ip, netpair.b.id, netpair.b.ip)
            netpair.a.run("ping -c 1 -W 1 b >/dev/null 2>&1; echo pinged b")
            assert False
        """
    )
    result = run_inner()
    result.assert_outcomes(failed=1)
    a_id, a_ip, b_id, b_ip = result.stdout.str().split("PAIR ", 1)[1].split()[:4]
    found = sections(result)
    assert list(found) == [a_id, b_id]
    assert "hostname:  a" in found[a_id] and f"ip:        {a_ip}" in found[a_id]
    assert "hostname:  b" in found[b_id] and f"ip:        {b_ip}" in found[b_id]
    assert "pinged b" in found[a_id]
    assert "commands:  none run" in found[b_id]


def test_factory_boxes_and_a_box_stopped_by_the_test(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        def test_two(nsbox_factory):
            web = nsbox_factory(hostname="web")
            db = nsbox_factory(hostname="db")
            db.run("echo db says bye")
            db.stop()
            print("BOXES", web.id, db.id)
            assert False
        """
    )
    result = run_inner()
    result.assert_outcomes(failed=1)
    web_id, db_id = result.stdout.str().split("BOXES ", 1)[1].split()[:2]
    found = sections(result)
    assert list(found) == [web_id, db_id]
    assert "hostname:  web" in found[web_id] and "(running" in found[web_id]
    db = found[db_id]
    assert f"box:       {db_id} (not running)" in db
    assert "processes: none (the box is not running)" in db
    assert "root changes: not read (the box is not running)" in db
    assert "db says bye" in db  # its commands' output outlives it


def test_a_box_that_cannot_be_described_still_gets_its_lines(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        """
        from pytest_nsbox import report

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        def test_broken_box(nsbox):
            nsbox.processes = boom
            nsbox.history = None
            assert False

        def test_broken_describe(nsbox, monkeypatch):
            monkeypatch.setattr(report, "describe", boom)
            assert False
        """
    )
    result = run_inner()
    result.assert_outcomes(failed=2)  # failed, not errors: describing a box never breaks a test
    broken_box, broken_describe = sections(result).values()
    assert "processes: could not be read: RuntimeError: boom" in broken_box
    assert "commands: could not be read: TypeError:" in broken_box
    assert "hostname:  box" in broken_box  # the parts that could be read are there
    assert "root changes: 0 added, 0 modified, 0 deleted" in broken_box
    assert broken_describe.strip() == "could not describe this box: RuntimeError: boom"


def test_describe_a_box_that_never_started() -> None:
    from pytest_nsbox import Box
    from pytest_nsbox.report import describe

    text = describe(Box(hostname="idle", limits={"memory": "64M", "pids": 5}))
    assert "(not running)" in text
    assert "limits:    memory=64.0 MiB, pids=5" in text
    assert "commands:  none run" in text
