"""Box tests on a host that cannot make boxes: skipped with the reason, or failed when strict.

The inner run's conftest (the ``fake_no_root`` fixture) pretends root is missing, so these
tests need no particular host and never start a box.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

RunInner = Callable[..., pytest.RunResult]

REASON = "this host cannot make boxes: root: pretend: running as uid 1000 (run `nsbox doctor` for details)"

BOX_TESTS = """
import pytest

STARTED = []

def test_nsbox(nsbox):
    STARTED.append(nsbox)

def test_factory(nsbox_factory):
    STARTED.append(nsbox_factory())

def test_overlay_root(overlay_root):
    STARTED.append(overlay_root)

@pytest.mark.nsbox(hostname="web")
def test_marked(nsbox):
    STARTED.append(nsbox)

def test_plain():
    assert STARTED == []
"""


@pytest.fixture
def box_tests(pytester: pytest.Pytester, fake_no_root: None) -> None:
    pytester.makepyfile(test_boxes=BOX_TESTS)


def test_box_tests_skip_naming_the_missing_capability(box_tests: None, run_inner: RunInner) -> None:
    result = run_inner("-rs")
    result.assert_outcomes(skipped=4, passed=1)
    assert result.ret == pytest.ExitCode.OK
    # One line per test (each at its own location), each naming the missing capability.
    result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] test_boxes.py:*: nsbox: {REASON}"] * 4)


def test_skip_reason_lists_every_missing_capability(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makeconftest(
        """
        from pytest_nsbox import probe
        from pytest_nsbox.probe import Capability

        probe.capabilities = lambda: (
            Capability("linux", True, "Linux"),
            Capability("root", False, "pretend: running as uid 1000"),
            Capability("overlayfs", False, "pretend: no overlayfs"),
            Capability("cgroups", False, "pretend: optional and absent", required=False),
        )
        """
    )
    pytester.makepyfile("def test_box(nsbox):\n    pass\n")
    result = run_inner("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]1[]] test_*.py:*: nsbox: this host cannot make boxes: "
            "root: pretend: running as uid 1000; overlayfs: pretend: no overlayfs "
            "(run `nsbox doctor` for details)"
        ]
    )
    # The optional capability is not a reason to skip.
    assert "cgroups" not in result.stdout.str()


def _assert_strict_failures(result: pytest.RunResult) -> None:
    # A fixture that calls pytest.fail during setup is an ERROR in pytest's terms.
    result.assert_outcomes(errors=4, passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    for name in ("test_nsbox", "test_factory", "test_overlay_root", "test_marked"):
        result.stdout.fnmatch_lines([f"*_ ERROR at setup of {name} _*", f"--nsbox-strict: {REASON}"])
        result.stdout.fnmatch_lines([f"ERROR test_boxes.py::{name} - Failed: --nsbox-strict: this host*"])
    result.stdout.no_fnmatch_line("SKIPPED*")


def test_strict_option_fails_box_tests(box_tests: None, run_inner: RunInner) -> None:
    _assert_strict_failures(run_inner("-ra", "--nsbox-strict"))


def test_strict_ini_fails_box_tests(pytester: pytest.Pytester, box_tests: None, run_inner: RunInner) -> None:
    pytester.makeini("[pytest]\nnsbox_strict = true\n")
    _assert_strict_failures(run_inner("-ra"))


def test_strict_ini_false_still_skips(
    pytester: pytest.Pytester, box_tests: None, run_inner: RunInner
) -> None:
    pytester.makeini("[pytest]\nnsbox_strict = false\n")
    result = run_inner("-rs")
    result.assert_outcomes(skipped=4, passed=1)


def test_box_used_directly_raises_host_unsupported(
    pytester: pytest.Pytester, fake_no_root: None, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_nsbox import Box, HostUnsupportedError

        def test_direct():
            with pytest.raises(HostUnsupportedError, match="root: pretend: running as uid 1000"):
                Box(hostname="direct").start()
        """
    )
    run_inner().assert_outcomes(passed=1)


def test_strict_failure_is_reported_once(box_tests: None, run_inner: RunInner) -> None:
    result = run_inner("--nsbox-strict")
    result.assert_outcomes(errors=4, passed=1)
    result.stdout.no_fnmatch_line("*During handling of the above exception*")


def test_a_bad_marker_is_reported_even_where_boxes_cannot_be_made(
    pytester: pytest.Pytester, fake_no_root: None, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        test_typo="""
        import pytest

        @pytest.mark.nsbox(hostnme="web")
        def test_typo(nsbox):
            pass
        """
    )
    result = run_inner()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.nsbox(...): unknown option(s) hostnme*"])


def test_no_nsbox_strict_overrides_the_ini(
    box_tests: None, pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makeini("[pytest]\nnsbox_strict = true\n")
    result = run_inner("--no-nsbox-strict")
    result.assert_outcomes(skipped=4, passed=1)
