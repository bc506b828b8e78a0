"""userns= as a marker keyword, an ``nsbox_factory`` option, the ini ``nsbox_userns`` and
``--nsbox-userns``, end to end in an inner pytest."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_nsbox import probe

RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")

_needs_userns = pytest.mark.skipif(probe.userns_gap() is not None, reason=f"userns: {probe.userns_gap()}")

_TESTS = """
import pytest

def mapped(box):
    return box.run("cat /proc/self/uid_map", check=True).stdout.split()[1] != "0"

@pytest.mark.nsbox(userns=True)
def test_marker(nsbox):
    assert nsbox.spec.userns and mapped(nsbox)

@pytest.mark.nsbox(userns=False)
def test_marker_off(nsbox):
    assert not nsbox.spec.userns and not mapped(nsbox)

def test_factory(nsbox_factory):
    assert mapped(nsbox_factory(userns=True))

def test_default(nsbox, request):
    expected = request.config.getoption("nsbox_userns") or request.config.getini("nsbox_userns")
    assert nsbox.spec.userns == bool(expected) == mapped(nsbox)
"""


@_needs_userns
def test_marker_and_factory_give_a_box_a_user_namespace(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makepyfile(_TESTS)
    run_inner("-v").assert_outcomes(passed=4)


@_needs_userns
@pytest.mark.parametrize("how", ["option", "ini"])
def test_the_command_line_and_the_ini_make_it_every_boxs_default(
    pytester: pytest.Pytester, run_inner: RunInner, how: str
) -> None:
    pytester.makepyfile(_TESTS)
    if how == "ini":
        pytester.makeini("[pytest]\nnsbox_userns = true\n")
        result = run_inner("-v")
    else:
        result = run_inner("-v", "--nsbox-userns")
    result.assert_outcomes(passed=4)


def test_a_userns_that_is_not_a_bool_fails_the_test(pytester: pytest.Pytester, run_inner: RunInner) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(userns="yes")
        def test_bad_marker(nsbox):
            pass
        """
    )
    result = run_inner("-v")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*userns: expected True or False, got 'yes'*"])
