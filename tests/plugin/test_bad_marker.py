"""Wrong ``@pytest.mark.nsbox(...)`` arguments and ``cgroup_limit`` values in a real run.

Each bad marker fails its own test at setup, at once, with a message naming the marker and
the option; the next test of the same session still gets a working box.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")

BAD_MARKERS = {
    "hostname_int": ("hostname=123", "hostname: expected a string"),
    "tmpfs_relative": ('tmpfs={"data": "1M"}', "must be an absolute path in the box"),
    "env_int": ('env={"PORT": 8080}', "value of PORT must be a string"),
    "limits_negative": ('limits={"pids": -1}', "expected a whole number of processes >= 1"),
    "network_unknown": ('network="host"', "is not a network mode"),
    "unknown_option": ("colour=1", "unknown option(s) colour"),
    "positional": ('"debian.tar"', "takes keyword arguments only"),
}


def test_bad_markers_fail_at_setup_at_once_and_the_session_goes_on(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    tests = "\n".join(
        f"@pytest.mark.nsbox({argument})\ndef test_{name}(nsbox):\n    pass\n"
        for name, (argument, _) in BAD_MARKERS.items()
    )
    pytester.makepyfile(
        "import pytest\n"
        "from pytest_nsbox import ConfigError\n\n" + tests + "\n"
        "def test_limit_is_a_config_error(nsbox, cgroup_limit):\n"
        "    with pytest.raises(ConfigError, match='cgroup_limit'):\n"
        "        cgroup_limit(pids=-1)\n"
        "    assert nsbox.run('echo ok').stdout == 'ok\\n'\n\n"
        "def test_limit_uncaught_fails_the_test(nsbox, cgroup_limit):\n"
        "    cgroup_limit(pids=-1)\n\n"
        "def test_after(nsbox):\n"
        "    assert nsbox.run('echo ok').stdout == 'ok\\n'\n"
    )
    result = run_inner("--nsbox-strict", "-rA", "--durations=0", "--durations-min=0")
    result.assert_outcomes(passed=2, failed=1, errors=len(BAD_MARKERS))
    output = result.stdout.str()
    for name, (_, message) in BAD_MARKERS.items():
        section = output.split(f" ERROR at setup of test_{name} ", 1)[1].split("\n_", 1)[0]
        assert message in section and "@pytest.mark.nsbox" in section, (name, section)
    result.stdout.fnmatch_lines(["*ConfigError: cgroup_limit(...): pids=-1: expected a whole number*"])
    # Each refusal came at once: the setup of a test with a bad marker, as pytest timed it.
    setups = {
        match.group(2): float(match.group(1))
        for match in re.finditer(r"^(\d+\.\d+)s setup\s+\S+::test_(\w+)$", output, re.MULTILINE)
    }
    for name in BAD_MARKERS:
        assert setups[name] < 1.0, (name, setups)
