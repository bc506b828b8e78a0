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
            "devices=None, no_new_privileges=False, logs=None, disks=None, clock=None, userns=False, "
            "service=False): "
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


def test_keep_under_xdist_says_once_that_it_keeps_nothing(pytester: pytest.Pytester) -> None:
    """The workers' boxes cannot outlive them for the user: the controller says so, once."""
    pytest.importorskip("xdist")
    pytester.makepyfile(test_inner="def test_fails():\n    assert False\n\ndef test_passes():\n    pass\n")
    result = pytester.runpytest_subprocess("-n", "2", "--nsbox-keep=failed", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    lines = [line for line in result.stdout.lines if "--nsbox-keep" in line]
    assert lines == [
        "nsbox: --nsbox-keep=failed does nothing under pytest-xdist (-n): the workers' boxes cannot "
        "be handed to you; run the failing test without -n to keep its box"
    ]
    alone = pytester.runpytest_subprocess("-n", "0", "--nsbox-keep=failed", "-p", "no:cacheprovider")
    alone.assert_outcomes(passed=1, failed=1)
    assert "--nsbox-keep" not in alone.stdout.str()  # without workers it keeps, and says nothing of xdist


_INI_TEST = """
def test_reads_the_projects_ini(pytestconfig):
    assert pytestconfig.getini("nsbox_keep") == "always"
"""


@pytest.mark.parametrize("option", ["--nsbox-image", "--nsbox-cache"])
def test_a_path_option_given_with_a_space_warns_when_it_moves_the_rootdir(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, option: str
) -> None:
    """pytest chooses its rootdir and ini file before plugins add their options, so the value
    of ``--nsbox-image /elsewhere/img.tar`` counts as a test path there: the project's ini is
    not read. ``--nsbox-image=...`` is read right; the spaced form gets a warning, even under -q."""
    elsewhere = tmp_path_factory.mktemp("images")  # outside the project (pytester.path)
    value = str(elsewhere / "img.tar") if option == "--nsbox-image" else str(elsewhere)
    (elsewhere / "img.tar").write_bytes(b"not read: no test here makes a box")
    pytester.makefile(".ini", pytest="[pytest]\nnsbox_keep = always\n")
    pytester.makepyfile(test_inner=_INI_TEST)

    joined = pytester.runpytest_subprocess(f"{option}={value}", "-p", "no:cacheprovider")
    joined.assert_outcomes(passed=1)
    assert "nsbox: WARNING" not in joined.stdout.str()

    spaced = pytester.runpytest_subprocess(option, value, "-q", "-p", "no:cacheprovider")
    spaced.assert_outcomes(failed=1)  # pytest itself cannot be told: the ini was not read
    spaced.stdout.fnmatch_lines(
        [
            f"nsbox: WARNING: pytest took '{option} {value}' for a test path when it chose its rootdir "
            f"and ini file, so it did not read {pytester.path / 'pytest.ini'} (rootdir {elsewhere.parent} "
            f"instead of {pytester.path}); write {option}={value}",
            "F*",
        ]
    )


def test_a_path_option_given_with_a_space_inside_the_project_changes_nothing(
    pytester: pytest.Pytester,
) -> None:
    images = pytester.mkdir("images")
    (images / "img.tar").write_bytes(b"not read")
    pytester.makefile(".ini", pytest="[pytest]\nnsbox_keep = always\n")
    pytester.makepyfile(test_inner=_INI_TEST)
    result = pytester.runpytest_subprocess("--nsbox-image", "images/img.tar", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "nsbox: WARNING" not in result.stdout.str()


def test_a_spaced_path_value_warns_even_where_pytest_cannot_say_what_it_would_choose(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Where pytest's own chooser cannot be asked (another pytest's internals), the spaced form
    is still worth a warning: the value did count as a test path."""
    image = tmp_path_factory.mktemp("images") / "img.tar"
    image.write_bytes(b"not read")
    pytester.makeconftest(
        "import _pytest.config.findpaths as findpaths\n\n"
        "def _moved(**kwargs):\n    raise TypeError('not this signature')\n\n"
        "findpaths.determine_setup = _moved\n"  # after pytest used it, before the plugin asks it
    )
    pytester.makepyfile(test_inner="def test_it():\n    pass\n")
    result = pytester.runpytest_subprocess("--nsbox-image", str(image), "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            f"nsbox: WARNING: pytest takes '--nsbox-image {image}' for a test path when it chooses *; "
            f"write --nsbox-image={image}"
        ]
    )
