"""The plugin's command-line option, ini setting and marker registration (no boxes made)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import pytest_nsbox.plugin
from pytest_nsbox.plugin import STRICT


def _strict(pytester: pytest.Pytester, *args: str) -> bool:
    # parseconfigure, not parseconfig: the stash is filled in pytest_configure.
    config = pytester.parseconfigure(*args)
    assert config.pluginmanager.get_plugin("nsbox") is pytest_nsbox.plugin
    return config.stash[STRICT]


def test_strict_is_off_by_default(pytester: pytest.Pytester) -> None:
    assert _strict(pytester) is False


def test_strict_option(pytester: pytest.Pytester) -> None:
    assert _strict(pytester, "--nsbox-strict") is True


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("false", False), ("0", False)])
def test_strict_ini(pytester: pytest.Pytester, value: str, expected: bool) -> None:
    pytester.makeini(f"[pytest]\nnsbox_strict = {value}\n")
    assert _strict(pytester) is expected


def test_strict_ini_in_pyproject(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml("[tool.pytest.ini_options]\nnsbox_strict = true\n")
    assert _strict(pytester) is True


def test_strict_option_overrides_false_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nnsbox_strict = false\n")
    assert _strict(pytester, "--nsbox-strict") is True


def test_strict_ini_override_on_command_line(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nnsbox_strict = false\n")
    assert _strict(pytester, "-o", "nsbox_strict=true") is True


def test_help_documents_option_and_ini(run_inner: Callable[..., pytest.RunResult]) -> None:
    # In a subprocess: in-process, --help is written past pytester's capture.
    result = run_inner("--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "per-test Linux containers (pytest-nsbox):",
            "  --nsbox-strict * fail, rather than skip, box tests on a host that cannot",
            "*nsbox_strict (bool): * fail, rather than skip, box tests on a host that cannot",
        ]
    )


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.nsbox(hostname='box', env=None, privileged=False, tmpfs=None, image=None, "
            "cache=None, network='none'|'bridge', limits=None, nat=False, publish=None, subnet=None, "
            "devices=None, no_new_privileges=False, logs=None): "
            "configure the test's nsbox*",
        ]
    )


def test_marker_accepted_under_strict_markers(pytester: pytest.Pytester) -> None:
    # No box fixture is requested, so nothing is started: only the registration is tested.
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nsbox(hostname="web")
        def test_marked():
            pass
        """
    )
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(passed=1)


def test_fixtures_are_listed(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--fixtures")
    assert result.ret == 0
    for name in ("nsbox", "nsbox_factory", "overlay_root"):
        result.stdout.fnmatch_lines([f"{name} -- *pytest_nsbox*plugin.py:*"])
