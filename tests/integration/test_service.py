"""The image's own service: ``start_service`` runs what ``podman run IMAGE [ARGS]`` runs, with the
image's Env, WorkingDir, User and StopSignal; ``wait_healthy`` runs its HEALTHCHECK;
``publish="exposed"`` maps its ExposedPorts.

The service image is written by the test (``serviceimage``): a shell script as Entrypoint that
prints what it was given (argv, working directory, ids, groups, HOME, environment), writes a
ready file after a moment, and traps its stop signal. podman runs the same archive for the
comparison, from a private store in a temporary directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from containertools import PrivateTools, need
from imagebuilder import write_docker_save_legacy
from serviceimage import service_spec

from pytest_nsbox import Box, BoxError, ConfigError, WaitTimeoutError
from pytest_nsbox.errors import ArgumentTypeError, ProcessExitedError

pytestmark = pytest.mark.requires("boxes")

SECOND = 10**9  # a HEALTHCHECK's times are nanoseconds
# Healthy once the script wrote its ready file; the check runs as the image's User, as Docker's.
READY = {
    "Test": ["CMD-SHELL", 'test -f /tmp/ready && test "$(id -u)" = 1000'],
    "Interval": SECOND // 10,
    "Timeout": 2 * SECOND,
    "Retries": 3,
}
IMAGE = "localhost/nsbox-service:1"


@pytest.fixture
def service_image(tmp_path: Path) -> str:
    return str(write_docker_save_legacy(tmp_path / "service.tar", [service_spec(READY)]))


def write_image(tmp_path: Path, name: str, healthcheck: dict[str, object] | None, **config: object) -> str:
    return str(write_docker_save_legacy(tmp_path / f"{name}.tar", [service_spec(healthcheck, **config)]))


@pytest.fixture
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateTools]:
    need("podman", "unshare")
    root = tmp_path_factory.mktemp("podman")  # short: podman refuses a runroot over 50 characters
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


def box_run(image: str, cache: str, args: list[str] | None) -> str:
    with Box(image=image, cache=cache) as box:
        process = box.start_service(args)
        assert process.wait(30) == 0, process.stdout + process.stderr
        return str(process.stdout).strip()


def box_commands(box: Box) -> list[str]:
    """The command lines of the box's live processes, read from the host (a zombie is dead)."""
    assert box.pid is not None
    lines = []
    for process in psutil.Process(box.pid).children(recursive=True):
        try:
            lines.append(" ".join(process.cmdline()))
        except psutil.Error:
            continue
    return lines


# Every form of User runc (and so Docker and podman) takes: a name, a uid in /etc/passwd or not,
# with a group by name or number; the image's passwd has svc (1000), its group file staff (50)
# with svc as a member.
@pytest.mark.parametrize(
    "user",
    ["svc", "1000", "1000:1000", "svc:staff", "svc:50", "root", "0:50", "", "1234", "1234:50"],
)
def test_start_service_runs_what_podman_run_runs(
    user: str, tmp_path: Path, image_cache: str, tools: PrivateTools
) -> None:
    image = write_image(tmp_path, "service", None, user=user, cmd=["once", "from the image's Cmd"])
    tools.podman("load", "-i", image)
    for args in (None, ["once"], ["once", "two words", "--flag=x"]):
        expected = podman_run(tools, IMAGE, *(args or []))
        if user.startswith("1234"):
            # podman adds a passwd entry for a uid the image lacks, with the WorkingDir as its
            # home; runc (Docker's runtime) gives such a uid HOME=/, and so does the box.
            assert "home=/srv\n" in expected
            expected = expected.replace("home=/srv\n", "home=/\n")
        assert box_run(image, image_cache, args) == expected, "the box's service must see what podman's does"
        if args is None:
            assert "argv=/usr/local/bin/svc once from the image's Cmd\n" in expected
    assert "cwd=/srv" in expected and "greeting=hello there" in expected
    assert "argv=/usr/local/bin/svc once two words --flag=x" in expected


def test_without_an_entrypoint_the_cmd_runs_alone_and_args_replace_it(
    tmp_path: Path, image_cache: str
) -> None:
    image = write_image(tmp_path, "cmd-only", None, entrypoint=None, cmd=["/usr/local/bin/svc", "once"])
    assert "argv=/usr/local/bin/svc once\n" in box_run(image, image_cache, None)
    assert box_run(image, image_cache, ["/bin/sh", "-c", "echo replaced"]) == "replaced"


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


def test_an_exec_form_check_runs_without_a_shell(tmp_path: Path, image_cache: str) -> None:
    check = {"Test": ["CMD", "/bin/sh", "-c", "test -f /tmp/ready"], "Interval": SECOND // 10}
    with Box(image=write_image(tmp_path, "cmd-check", check), cache=image_cache) as box:
        box.start_service()
        assert box.wait_healthy(timeout=30).returncode == 0


def test_stop_sends_the_images_stop_signal(service_image: str, image_cache: str) -> None:
    with Box(image=service_image, cache=image_cache) as box:
        process = box.start_service()
        box.wait_healthy(timeout=30)
        assert process.stop(timeout=10) == 3, process.stdout
        assert process.stdout.rstrip().endswith("got QUIT"), "StopSignal SIGQUIT, as docker stop sends"


def test_one_service_at_a_time(service_image: str, image_cache: str) -> None:
    with Box(image=service_image, cache=image_cache) as box:
        first = box.start_service()
        with pytest.raises(BoxError, match=r"still running; stop it first"):
            box.start_service()
        first.stop()
        second = box.start_service(["once"])
        assert second.wait(30) == 0 and box.service is second


def test_a_check_that_never_passes_fails_with_its_output_and_the_services(
    tmp_path: Path, image_cache: str
) -> None:
    never = {
        "Test": ["CMD-SHELL", "echo not yet; test -f /tmp/never"],
        "Interval": SECOND // 10,
        "Retries": 2,
    }
    with Box(image=write_image(tmp_path, "never", never), cache=image_cache) as box:
        box.start_service()
        with pytest.raises(WaitTimeoutError) as caught:
            box.wait_healthy(timeout=2)
    message = str(caught.value)
    assert "did not pass within 2s" in message and "unhealthy after 2" in message
    assert "the last check exited with status 1, with this output:\nnot yet" in message
    assert "is still running, its output:" in message and "argv=/usr/local/bin/svc --port 8080" in message


def test_failures_in_the_start_period_do_not_count(tmp_path: Path, image_cache: str) -> None:
    starting = {"Test": ["CMD-SHELL", "exit 1"], "Interval": SECOND // 10, "StartPeriod": 3600 * SECOND}
    with Box(image=write_image(tmp_path, "starting", starting), cache=image_cache) as box:
        box.start_service()
        with pytest.raises(WaitTimeoutError, match=r"0 failed check\(s\) after the start period"):
            box.wait_healthy(timeout=1)


def test_a_check_over_its_timeout_is_killed_and_fails(tmp_path: Path, image_cache: str) -> None:
    slow = {
        "Test": ["CMD-SHELL", "echo checking; sleep 600"],
        "Interval": SECOND // 10,
        "Timeout": SECOND // 5,
    }
    with Box(image=write_image(tmp_path, "slow", slow), cache=image_cache) as box:
        box.start_service()
        with pytest.raises(WaitTimeoutError, match=r"(?s)the last check was killed by SIGKILL.*checking"):
            box.wait_healthy(timeout=2)
        assert not any("sleep 600" in line for line in box_commands(box)), "the check was killed"


def test_a_service_that_dies_ends_the_wait_at_once_with_its_output(
    service_image: str, image_cache: str
) -> None:
    with Box(image=service_image, cache=image_cache) as box:
        box.start_service(["die"])
        with pytest.raises(ProcessExitedError, match="bad config"):
            box.wait_healthy(timeout=60)


def test_an_image_without_a_healthcheck_or_a_service_says_so(tmp_path: Path, image_cache: str) -> None:
    with Box(image=write_image(tmp_path, "plain", None), cache=image_cache) as box:
        box.start_service()
        with pytest.raises(BoxError, match=r"has no HEALTHCHECK.*wait_for_port"):
            box.wait_healthy()
    with Box(image=write_image(tmp_path, "off", {"Test": ["NONE"]}), cache=image_cache) as box:
        with pytest.raises(BoxError, match=r"has no HEALTHCHECK \(it is switched off: NONE\)"):
            box.wait_healthy()
    bare = write_image(tmp_path, "bare", None, entrypoint=None, cmd=None)
    with Box(image=bare, cache=image_cache) as box:
        with pytest.raises(BoxError, match=r"neither Entrypoint nor Cmd.*start_service\(args="):
            box.start_service()
        assert box.service is None


def test_bad_arguments_fail_at_once_and_harm_no_box(service_image: str, image_cache: str) -> None:
    with Box(image=service_image, cache=image_cache) as box:
        for wrong in ("once", [1], b"x", ("once", None), 7):
            with pytest.raises(ArgumentTypeError, match=r"start_service\(\): args"):
                box.start_service(wrong)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="NUL"):
            box.start_service(["once\0"])
        with pytest.raises(
            ConfigError, match=r"wait_healthy\(\): timeout: expected a number of seconds >= 0"
        ):
            box.wait_healthy(timeout=-1)
        with pytest.raises(ArgumentTypeError, match=r"wait_healthy\(\): timeout"):
            box.wait_healthy(timeout="5")  # type: ignore[arg-type]
        assert box.service is None
        assert box.run("echo alive").stdout == "alive\n", "a caller's mistake harms no box"


def test_an_unknown_stop_signal_fails_before_anything_runs(tmp_path: Path, image_cache: str) -> None:
    with Box(image=write_image(tmp_path, "badsig", None, stop_signal="SIGNOPE"), cache=image_cache) as box:
        with pytest.raises(BoxError, match=r"StopSignal 'SIGNOPE' is no signal"):
            box.start_service()
        assert box.service is None
        assert not any("svc" in line for line in box_commands(box)), "nothing was started"


def test_publish_exposed_maps_each_tcp_port(service_image: str, image_cache: str, tmp_path: Path) -> None:
    with Box(image=service_image, cache=image_cache, publish="exposed") as box:
        port = box.host_port(8080)
        assert port > 0
        with pytest.raises(Exception, match="not published"):
            box.host_port(53)  # UDP: not forwarded
    with pytest.raises(ConfigError, match=r"expected .*'exposed'"):
        Box(publish="everything")  # type: ignore[arg-type]


def test_publish_exposed_without_exposed_ports_is_a_clear_error(tmp_path: Path, image_cache: str) -> None:
    with pytest.raises(
        ConfigError, match=r"Box\(\): publish: 'exposed' .* the host's root, which exposes none"
    ):
        Box(publish="exposed")
    closed = write_image(tmp_path, "closed", None, exposed_ports={})
    box = Box(image=closed, cache=image_cache, publish="exposed")
    with pytest.raises(ConfigError, match=r"publish='exposed': the image .* exposes no TCP port"):
        box.start()
    box.stop()
