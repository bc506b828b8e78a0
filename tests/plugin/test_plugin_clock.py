"""clock= as a marker keyword and an ``nsbox_factory`` option, end to end in an inner pytest."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_nsbox import probe

RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")


@pytest.mark.skipif(
    not probe.has_time_namespace(), reason="this kernel has no time namespaces (CONFIG_TIME_NS)"
)
def test_marker_and_factory_give_a_box_its_clock_offsets(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        """
        import pytest

        DAY = 86400

        def uptime(box):
            return float(box.run("cat /proc/uptime", check=True).stdout.split()[0])

        @pytest.mark.nsbox(clock={"monotonic": "+400d", "boottime": "+400d"})
        def test_marker(nsbox):
            assert nsbox.spec.clock == {"monotonic": 400 * DAY, "boottime": 400 * DAY}
            assert uptime(nsbox) >= 400 * DAY

        def test_factory(nsbox_factory):
            box = nsbox_factory(clock={"boottime": "+30d"})
            with open("/proc/uptime") as handle:
                host = float(handle.read().split()[0])
            assert abs(uptime(box) - host - 30 * DAY) < 60

        def test_unmarked(nsbox):
            with open("/proc/uptime") as handle:
                host = float(handle.read().split()[0])
            assert abs(uptime(nsbox) - host) < 60

        @pytest.mark.nsbox(clock={"uptime": "+1d"})
        def test_bad_marker(nsbox):
            pass
        """
    )
    result = run_inner("-v")
    result.assert_outcomes(passed=3, errors=1)  # the bad marker is an error before any box
    result.stdout.fnmatch_lines(
        ["*clock: unknown clock 'uptime'; a box can offset only monotonic and boottime*"]
    )


def test_a_bad_clock_in_a_marker_fails_the_test_on_any_kernel(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(clock={"monotonic": "+1 year"})
        def test_bad_marker(nsbox):
            pass
        """
    )
    result = run_inner("-v")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*clock?'monotonic'?: expected an offset like '+400d', '-2h'*got '+1 year'"])
