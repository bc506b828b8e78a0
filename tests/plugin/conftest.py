"""Helpers for the plugin tests: running an inner pytest in a subprocess, faking a poor host."""

from __future__ import annotations

from collections.abc import Callable

import pytest

# Plugins that are installed here but slow to import (hypothesis alone costs over a second
# per inner run); blocking a plugin that is not installed is harmless.
_SLOW_PLUGINS = ("hypothesispytest", "benchmark", "xdist", "cacheprovider")

# Makes the host look unable to make boxes, whoever runs the tests; ``probe.missing`` and
# ``probe.require_box_support`` look ``capabilities`` up in the module at call time.
FAKE_NO_ROOT_CONFTEST = """
from pytest_nsbox import probe
from pytest_nsbox.probe import Capability

probe.capabilities = lambda: (Capability("root", False, "pretend: running as uid 1000"),)
"""


@pytest.fixture
def run_inner(pytester: pytest.Pytester) -> Callable[..., pytest.RunResult]:
    """``run_inner(*args)``: pytest in a subprocess (boxes must not be made in this process)."""

    def run(*args: str, timeout: float = 60) -> pytest.RunResult:
        blocked = [arg for name in _SLOW_PLUGINS for arg in ("-p", f"no:{name}")]
        return pytester.runpytest_subprocess(*blocked, *args, timeout=timeout)

    return run


@pytest.fixture
def fake_no_root(pytester: pytest.Pytester) -> None:
    """The inner run's conftest pretends this host lacks root (and so cannot make boxes)."""
    pytester.makeconftest(FAKE_NO_ROOT_CONFTEST)
