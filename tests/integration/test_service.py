"""The image's own service: ``start_service`` runs what ``podman run IMAGE [ARGS]`` runs, with the
image's Env, WorkingDir, User and StopSignal; ``wait_healthy`` runs its HEALTHCHECK;
``publish="exposed"`` maps its ExposedPorts.

The service image is written by the test (``serviceimage``): a shell script as Entrypoint that
prints what it was given (argv, working directory, user, environment), writes a ready file
after a moment, and traps its stop signal. podman runs the same archive for the comparison.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from containertools import PrivateTools, need
from imagebuilder import write_docker_save_legacy
from serviceimage import service_spec

from pytest_nsbox import Box, BoxError, ConfigError, WaitTimeoutError
from pytest_nsbox.errors import ArgumentTypeError, ProcessExitedError

pytestmark = pytest.mark.requires("boxes")

READY = {"Test": ["CMD-SHELL", "test -f /tmp/ready"], "Interval": 10**8, "Timeout": 2 * 10**9, "Retries": 3}


@pytest.fixture
def service_image(tmp_path: Path) -> str:
    return str(write_docker_save_legacy(tmp_path / "service.tar", [service_spec(READY)]))


@pytest.fixture
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateTools]:
    need("podman", "unshare")
    root = tmp_path_factory.mktemp("podman")
    yield PrivateTools(root)
    shutil.rmtree(root, ignore_errors=True)


def podman_run(tools: PrivateTools, *argv: str) -> str:
    """``podman run --rm IMAGE ARGS`` as this host allows it: rlimits podman may set without
    CAP_SYS_RESOURCE, no healthcheck timer (that is systemd's), and runc where crun refuses
    the host's cgroup layout."""
    base = ["run", "--rm", "--network", "none", "--pull", "never", "--no-healthcheck"]
    limits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    try:
        return tools.podman(*base, *limits, *argv)
    except AssertionError:
        return tools.podman("--runtime", "runc", *base, *limits, *argv)


def test_start_service_runs_what_podman_run_runs(
    service_image: str, image_cache: str, tools: PrivateTools
) -> None:
    tools.podman("load", "-i", service_image)
    for args in (["once"], ["once", "two words", "--flag=x"]):
        expected = podman_run(tools, "localhost/nsbox-service:1", *args)
        with Box(image=service_image, cache=image_cache) as box:
            process = box.start_service(args)
            assert process.wait(30) == 0
            assert process.stdout.strip() == expected, "the box's service must see what podman's does"
    assert "argv=/usr/local/bin/svc once two words --flag=x" in expected
    assert "cwd=/srv" in expected and "user=1000:1000" in expected and "greeting=hello there" in expected


def test_the_image_cmd_runs_and_wait_healthy_returns_once_its_check_passes(
    service_image: str, image_cache: str
) -> None:
    with Box(image=service_image, cache=image_cache) as box:
        process = box.start_service()
        assert box.service is process
        assert not box.exists("/tmp/ready")
        check = box.wait_healthy(timeout=30)
        assert check.returncode == 0
        assert box.exists("/tmp/ready"), "healthy only once the service wrote its ready file"
        assert "argv=/usr/local/bin/svc --port 8080" in process.stdout
        assert process.poll() is None


def test_stop_sends_the_images_stop_signal(service_image: str, image_cache: str) -> None:
    with Box(image=service_image, cache=image_cache) as box:
        process = box.start_service()
        box.wait_healthy(timeout=30)
        assert process.stop(timeout=10) == 3, process.stdout
        assert process.stdout.rstrip().endswith("got QUIT"), "StopSignal SIGQUIT, as docker stop sends"


def test_a_check_that_never_passes_fails_with_its_output(tmp_path: Path, image_cache: str) -> None:
    never = {"Test": ["CMD-SHELL", "echo not yet; test -f /tmp/never"], "Interval": 10**8, "Retries": 2}
    image = write_docker_save_legacy(tmp_path / "never.tar", [service_spec(never)])
    with Box(image=str(image), cache=image_cache) as box:
        box.start_service()
        with pytest.raises(WaitTimeoutError, match=r"(?s)did not pass within 2s.*unhealthy after 2.*not yet"):
            box.wait_healthy(timeout=2)


def test_a_service_that_dies_ends_the_wait_at_once_with_its_output(
    service_image: str, image_cache: str
) -> None:
    with Box(image=service_image, cache=image_cache) as box:
        box.start_service(["die"])
        with pytest.raises(ProcessExitedError, match="bad config"):
            box.wait_healthy(timeout=60)


def test_an_image_without_a_healthcheck_or_a_service_says_so(tmp_path: Path, image_cache: str) -> None:
    plain = write_docker_save_legacy(tmp_path / "plain.tar", [service_spec(None)])
    with Box(image=str(plain), cache=image_cache) as box:
        box.start_service()
        with pytest.raises(BoxError, match=r"has no HEALTHCHECK.*wait_for_port"):
            box.wait_healthy()
    bare = write_docker_save_legacy(tmp_path / "bare.tar", [service_spec(None, entrypoint=None, cmd=None)])
    with Box(image=str(bare), cache=image_cache) as box:
        with pytest.raises(BoxError, match="neither Entrypoint nor Cmd"):
            box.start_service()
        for wrong in ("once", [1], b"x"):
            with pytest.raises(ArgumentTypeError):
                box.start_service(wrong)  # type: ignore[arg-type]
        assert box.run("echo alive").stdout == "alive\n", "a caller's mistake harms no box"


def test_publish_exposed_maps_each_tcp_port(service_image: str, image_cache: str, tmp_path: Path) -> None:
    with Box(image=service_image, cache=image_cache, publish="exposed") as box:
        port = box.host_port(8080)
        assert port > 0
        with pytest.raises(Exception, match="not published"):
            box.host_port(53)  # UDP: not forwarded
    with pytest.raises(ConfigError, match=r"expected .*'exposed'"):
        Box(publish="everything")  # type: ignore[arg-type]
