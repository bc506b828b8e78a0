"""The loop of every wait (``waits.until``), the checks of the waits' arguments, and how
``wait_for_http`` finds a URL's host, without a box."""

from __future__ import annotations

import pickle
import re
import time

import pytest

from pytest_nsbox import waits
from pytest_nsbox.errors import ArgumentTypeError, ConfigError, ProcessExitedError, WaitTimeoutError
from pytest_nsbox.network.http_get import address_of
from pytest_nsbox.spec import http_status, http_target, interval_seconds, regular_expression

# ------------------------------------------------------------------------------ waits.until


class StandInProcess:
    """A watched process that exits after ``exits_after`` checks of the wait."""

    def __init__(self, exits_after: int) -> None:
        self.exits_after = exits_after
        self.polls = 0
        self.slept = 0.0

    def poll(self) -> int | None:
        self.polls += 1
        return 1 if self.polls > self.exits_after else None

    def exited_within(self, seconds: float) -> bool:
        self.slept += seconds
        return False

    def exited_error(self, waiting_for: str) -> ProcessExitedError:
        return ProcessExitedError(f"gave up waiting for {waiting_for}", returncode=1, output="boom")


def test_until_returns_what_the_check_found() -> None:
    answers = iter([None, None, "ready"])
    assert waits.until(lambda: next(answers), 5, watched=None, waiting_for="x", timed_out=str) == "ready"


def test_until_gives_up_at_the_deadline_with_its_message() -> None:
    began = time.monotonic()
    with pytest.raises(WaitTimeoutError, match=r"^never came$") as info:
        waits.until(lambda: None, 0.05, watched=None, waiting_for="x", timed_out=lambda: "never came")
    assert type(info.value) is WaitTimeoutError
    assert 0.05 <= time.monotonic() - began < 5


def test_until_gives_up_at_once_when_the_watched_process_exits() -> None:
    process = StandInProcess(exits_after=2)
    with pytest.raises(ProcessExitedError, match="gave up waiting for port 80"):
        waits.until(lambda: None, 60, watched=process, waiting_for="port 80", timed_out=str)
    assert process.slept < 1  # it slept on the process between checks, and not for long


def test_until_checks_once_more_after_the_exit() -> None:
    process = StandInProcess(exits_after=0)
    checks = iter([None, "made just before it exited"])
    found = waits.until(lambda: next(checks), 60, watched=process, waiting_for="x", timed_out=str)
    assert found == "made just before it exited"


def test_until_pauses_by_the_interval_when_given() -> None:
    process = StandInProcess(exits_after=3)
    with pytest.raises(ProcessExitedError):
        waits.until(lambda: None, 60, watched=process, waiting_for="x", timed_out=str, interval=0.25)
    assert process.slept == pytest.approx(0.75)


def test_process_exited_error_is_a_wait_timeout_error() -> None:
    error = ProcessExitedError("m", returncode=3, output="tail")
    assert isinstance(error, WaitTimeoutError) and isinstance(error, TimeoutError)
    assert (error.returncode, error.output, str(error)) == (3, "tail", "m")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.returncode, copy.output, str(copy)) == (ProcessExitedError, 3, "tail", "m")


# ------------------------------------------------------------------------------- arguments


def test_a_port_is_the_box_loopback() -> None:
    target = http_target(8000, "w")
    assert (target.url, target.host, target.port, target.path) == (
        "http://127.0.0.1:8000/",
        "127.0.0.1",
        8000,
        "/",
    )


@pytest.mark.parametrize(
    ("url", "host", "port", "path"),
    [
        ("http://127.0.0.1:8000/health?deep=1", "127.0.0.1", 8000, "/health?deep=1"),
        ("http://web", "web", 80, "/"),
        ("http://[::1]:81/x", "::1", 81, "/x"),
    ],
)
def test_a_url_gives_host_port_and_path(url: str, host: str, port: int, path: str) -> None:
    target = http_target(url, "w")
    assert (target.host, target.port, target.path) == (host, port, path)


@pytest.mark.parametrize(
    "bad",
    ["8000", "https://127.0.0.1/", "http://", "http://h:0/", "http://h:99999/", "http://h/a b", 0, 70000],
)
def test_a_bad_url_or_port_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^w: "):
        http_target(bad, "w")


@pytest.mark.parametrize("bad", [True, 8000.0, b"http://h/", None, ["http://h/"]])
def test_a_url_or_port_of_the_wrong_type_is_an_argument_type_error(bad: object) -> None:
    with pytest.raises(ArgumentTypeError, match=r"^w: expected a port"):
        http_target(bad, "w")


def test_http_status_interval_and_pattern_checks() -> None:
    assert http_status(204, "s") == 204
    with pytest.raises(ConfigError, match="not an HTTP status code"):
        http_status(42, "s")
    with pytest.raises(ArgumentTypeError):
        http_status("200", "s")
    assert interval_seconds(0.5, "i") == 0.5
    for bad in (0, -1, float("inf")):
        with pytest.raises(ConfigError, match="seconds > 0"):
            interval_seconds(bad, "i")
    with pytest.raises(ArgumentTypeError):
        interval_seconds(True, "i")
    assert regular_expression("a+", "p", "the file").pattern == "a+"
    with pytest.raises(ConfigError, match="is not a regular expression"):
        regular_expression("(", "p", "the file")
    with pytest.raises(ArgumentTypeError, match="the file is searched as text"):
        regular_expression(re.compile(b"x"), "p", "the file")


# ---------------------------------------------------------------------------- address_of


HOSTS = b"127.0.0.1\tlocalhost\n127.0.1.1\tweb web.local  # this box\n10.213.0.5 db\n"


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::1", "::1"),
        ("localhost", "127.0.0.1"),
        ("web.local", "127.0.1.1"),
        ("db", "10.213.0.5"),
        ("box", None),
        ("this", None),  # a comment is not a name
    ],
)
def test_a_host_is_found_as_the_box_would(host: str, address: str | None) -> None:
    assert address_of(host, lambda: HOSTS) == address


def test_hosts_is_read_only_for_a_name() -> None:
    def unread() -> bytes:
        raise AssertionError("read /etc/hosts for an address")

    assert address_of("127.0.0.1", unread) == "127.0.0.1"
