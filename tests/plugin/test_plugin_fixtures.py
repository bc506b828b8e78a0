"""The box fixtures end to end: an inner pytest (in a subprocess) makes real boxes.

Each test writes a small test module, runs it with ``run_inner`` and checks the outcomes;
the real assertions about the boxes run inside the inner tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")


def test_marker_sets_hostname(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(hostname="web")
        def test_marked(nsbox):
            assert nsbox.hostname == "web"
            assert nsbox.run("hostname").stdout == "web\\n"
            assert nsbox.run(["cat", "/proc/sys/kernel/hostname"]).stdout == "web\\n"
            assert nsbox.run("echo $HOSTNAME").stdout == "web\\n"

        def test_default(nsbox):
            assert nsbox.run("hostname").stdout == "box\\n"

        @pytest.mark.nsbox(hostname="outer")
        class TestClassMarker:
            def test_from_class(self, nsbox):
                assert nsbox.run("hostname").stdout == "outer\\n"

            @pytest.mark.nsbox(hostname="inner")
            def test_closest_wins(self, nsbox):
                assert nsbox.run("hostname").stdout == "inner\\n"
        """
    )
    result = run_inner("-v")
    result.assert_outcomes(passed=4)
    # The marked box's hostname is its own: the host's is untouched.
    assert pytester.run("hostname").outlines[0] not in ("web", "box", "outer", "inner")


def test_marker_env_is_seen_by_commands(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(env={"GREETING": "hi"})
        def test_env(nsbox):
            assert nsbox.run("echo $GREETING").stdout == "hi\\n"
            assert nsbox.run(["printenv", "GREETING"]).stdout == "hi\\n"
            # run(env=...) adds to the box's environment and wins over it.
            assert nsbox.run("echo $GREETING $OTHER", env={"OTHER": "there"}).stdout == "hi there\\n"
            assert nsbox.run("echo $GREETING", env={"GREETING": "yo"}).stdout == "yo\\n"
            # The host's environment (pytest sets PYTEST_CURRENT_TEST) does not leak in.
            names = {line.split("=", 1)[0] for line in nsbox.run("env").stdout.splitlines()}
            assert "GREETING" in names
            assert "PYTEST_CURRENT_TEST" not in names

        def test_no_env(nsbox):
            assert nsbox.run(["printenv", "GREETING"]).returncode == 1
        """
    )
    run_inner().assert_outcomes(passed=2)


def test_marker_tmpfs_is_size_capped(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(tmpfs={"/data": "1M"})
        def test_tmpfs(nsbox):
            assert nsbox.run(["stat", "-f", "-c", "%T", "/data"]).stdout == "tmpfs\\n"
            small = nsbox.run("dd if=/dev/zero of=/data/small bs=1k count=256")
            assert small.returncode == 0, small.stderr
            big = nsbox.run("dd if=/dev/zero of=/data/f bs=1M count=2")
            assert big.returncode != 0
            assert "No space left on device" in big.stderr

        def test_without_tmpfs(nsbox):
            assert nsbox.run(["stat", "-f", "-c", "%T", "/data"]).returncode != 0
        """
    )
    run_inner().assert_outcomes(passed=2)


def test_factory_makes_separate_boxes(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        LIST = "for f in /proc/[0-9]*/cmdline; do tr '\\\\0' ' ' < $f; echo; done"

        def test_two_boxes(nsbox_factory):
            alpha = nsbox_factory(hostname="alpha")
            beta = nsbox_factory(hostname="beta", env={"WHO": "beta"})
            assert alpha is not beta and alpha.pid != beta.pid
            assert alpha.run("hostname").stdout == "alpha\\n"
            assert beta.run("hostname").stdout == "beta\\n"
            assert alpha.run("echo ${WHO:-nobody}").stdout == "nobody\\n"
            assert beta.run("echo $WHO").stdout == "beta\\n"

            alpha.spawn(["sleep", "4242"])
            beta.spawn(["sleep", "4343"])
            seen_by_alpha = alpha.run(["sh", "-c", LIST]).stdout
            seen_by_beta = beta.run(["sh", "-c", LIST]).stdout
            assert "sleep 4242" in seen_by_alpha and "sleep 4242" not in seen_by_beta
            assert "sleep 4343" in seen_by_beta and "sleep 4343" not in seen_by_alpha

        def test_bad_factory_option(nsbox_factory):
            nsbox_factory(hostname="not_valid")
        """
    )
    result = run_inner()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*nsbox_factory(...): hostname: 'not_valid' is not a valid hostname*"],
    )


def test_overlay_root_diff(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        import os

        def test_diff(nsbox, overlay_root):
            assert overlay_root is nsbox.root
            before = overlay_root.diff()
            assert "/etc/nsbox-added.txt" not in before.added
            assert "/etc/issue" not in before.deleted

            nsbox.run("echo hello > /etc/nsbox-added.txt", check=True)
            nsbox.run("rm /etc/issue", check=True)
            changes = overlay_root.diff()
            assert "/etc/nsbox-added.txt" in changes.added
            assert "/etc/issue" in changes.deleted
            assert "/etc/issue" not in changes.added + changes.modified
            assert "A /etc/nsbox-added.txt" in changes.summary()
            assert "D /etc/issue" in changes.summary()
            # Only the box's upper layer changed; the host's / is its untouched lower layer.
            assert os.path.exists("/etc/issue")
            assert not os.path.exists("/etc/nsbox-added.txt")
            assert nsbox.read_text("/etc/nsbox-added.txt") == "hello\\n"
        """
    )
    if not os.path.exists("/etc/issue"):
        pytest.skip("the host has no /etc/issue for the box to delete")
    run_inner().assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        (
            'hostname="x" * 100',
            "@pytest.mark.nsbox(...): hostname: 'xxxxxxxxxxxxxxxxxxxx'... is 100 characters;"
            " the kernel allows at most 64: use a shorter name",
        ),
        ('"web"', "@pytest.mark.nsbox takes keyword arguments only, got ('web',)"),
        (
            'hostnme="web"',
            "@pytest.mark.nsbox(...): unknown option(s) hostnme; known options are *hostname*",
        ),
        ('tmpfs={"/data": "lots"}', "@pytest.mark.nsbox(...): tmpfs[[]'/data'[]]: expected a size like*"),
    ],
    ids=["long-hostname", "positional", "unknown-option", "bad-size"],
)
def test_bad_marker_fails_naming_the_marker(
    pytester: pytest.Pytester, run_inner: RunInner, marker: str, message: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.nsbox({marker})
        def test_bad(nsbox):
            pass

        def test_after(nsbox):
            assert nsbox.run("hostname").stdout == "box\\n"
        """
    )
    result = run_inner("-ra")
    # pytest.fail in the fixture: an error at setup; the next box test is unaffected.
    result.assert_outcomes(errors=1, passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*_ ERROR at setup of test_bad _*", message])
    result.stdout.fnmatch_lines(["ERROR *::test_bad - Failed: @pytest*"])


def test_boxes_stop_after_each_test(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        import time

        import psutil
        import pytest

        import pytest_nsbox

        INITS = []
        OTHERS = []

        def _record(box):
            box.spawn(["sleep", "600"])
            processes = box.processes()
            assert [p.pid for p in processes[:1]] == [box.pid]
            assert len(processes) == 2
            INITS.append(box.pid)
            OTHERS.extend(p.pid for p in processes[1:])

        def test_passing(nsbox):
            _record(nsbox)

        def test_failing(nsbox_factory):
            _record(nsbox_factory(hostname="one"))
            _record(nsbox_factory(hostname="two"))
            pytest.fail("on purpose")

        def test_all_gone():
            assert len(INITS) == 3 and len(OTHERS) == 3
            assert pytest_nsbox.live_boxes() == []
            # Processes in a box die before its init does: gone, not even zombies.
            for pid in OTHERS:
                assert not psutil.pid_exists(pid), pid
            # An init is dead once its box stopped; its zombie is reaped soon after.
            deadline = time.monotonic() + 5
            while any(psutil.pid_exists(pid) for pid in INITS) and time.monotonic() < deadline:
                for pid in INITS:
                    try:
                        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
                    except psutil.NoSuchProcess:
                        pass
                time.sleep(0.01)
            for pid in INITS:
                assert not psutil.pid_exists(pid), pid
        """
    )
    result = run_inner("-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*::test_failing FAILED*", "*::test_all_gone PASSED*"])
