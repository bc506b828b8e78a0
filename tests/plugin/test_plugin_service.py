"""The marker's ``service=True`` and ``publish="exposed"``, end to end in an inner pytest run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from imagebuilder import write_docker_save_legacy
from serviceimage import service_spec

RunInner = Callable[..., pytest.RunResult]

pytestmark = pytest.mark.requires("boxes")

READY = {"Test": ["CMD-SHELL", "test -f /tmp/ready"], "Interval": 10**8, "Retries": 3}

TESTS = """
import pytest


@pytest.mark.nsbox(service=True, publish="exposed")
def test_the_service_is_healthy_before_the_body(nsbox):
    assert nsbox.exists("/tmp/ready"), "service=True waits for the healthcheck"
    assert nsbox.service is not None and nsbox.service.poll() is None
    assert "argv=/usr/local/bin/svc --port 8080" in nsbox.service.stdout
    assert nsbox.host_port(8080) > 0


def test_without_the_keyword_nothing_runs(nsbox):
    assert nsbox.service is None
    assert not nsbox.exists("/tmp/ready")


@pytest.mark.nsbox(service="yes")
def test_a_wrong_value_fails_clearly(nsbox):
    pass
"""


def test_service_true_starts_the_service_and_waits_for_health(
    pytester: pytest.Pytester, run_inner: RunInner, tmp_path: Path
) -> None:
    image = write_docker_save_legacy(tmp_path / "service.tar", [service_spec(READY)])
    pytester.makepyfile(test_inner=TESTS)
    result = run_inner(f"--nsbox-image={image}", f"--nsbox-cache={tmp_path / 'cache'}")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*service: expected True or False, got 'yes'*"])


def test_service_true_without_a_healthcheck_waits_for_the_exposed_ports(
    pytester: pytest.Pytester, run_inner: RunInner, tmp_path: Path
) -> None:
    # No healthcheck, and the script never listens on 8080: the wait gives up, naming the port.
    image = write_docker_save_legacy(tmp_path / "plain.tar", [service_spec(None, cmd=["die"])])
    pytester.makepyfile(
        test_inner="""
import pytest

@pytest.mark.nsbox(service=True)
def test_it(nsbox):
    pass
"""
    )
    result = run_inner(f"--nsbox-image={image}", f"--nsbox-cache={tmp_path / 'cache'}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ProcessExitedError*tcp port 8080*", "*bad config*"])


def test_service_and_exposed_ports_need_an_image_and_say_so_before_any_box(
    pytester: pytest.Pytester, run_inner: RunInner
) -> None:
    pytester.makepyfile(
        test_inner="""
import pytest

@pytest.mark.nsbox(service=True)
def test_service_on_the_host_root(nsbox):
    pass

@pytest.mark.nsbox(publish="exposed")
def test_exposed_ports_of_the_host_root(nsbox):
    pass
"""
    )
    result = run_inner()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.nsbox(...): service=True starts the image's Entrypoint and Cmd*host's root*",
            "*@pytest.mark.nsbox(...): publish: 'exposed' publishes the ports the image exposes*host's root*",
        ]
    )
