"""The waits: each gives up at once when the process it watches has exited, and the readiness
helpers (wait_until, wait_for_http, wait_for_file, wait_for_log) wait for what they say.

"At once" is checked with a generous bound (FAST) against a long timeout (LONG): a wait that
does not notice the death sits out LONG and fails the bound by far.
"""

from __future__ import annotations

import http.server
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from imagebuilder import Entry, write_rootfs_tar

import pytest_nsbox
from pytest_nsbox import ArgumentTypeError, Box, BoxError, ConfigError, WaitTimeoutError

pytestmark = pytest.mark.requires("boxes")

LONG = 15.0  # the timeout a wait would sit out, were it not to notice the death
FAST = 5.0  # seconds: generous for "at once" (it takes milliseconds)
BAD_CONFIG = "echo 'loading /etc/app.conf'; echo 'app.conf:3: unknown directive \"listn\"' >&2; exit 1"


def failed_at_once(wait: Callable[[], object]) -> WaitTimeoutError:
    """Run a wait that must fail at once; its error (a ``ProcessExitedError``)."""
    began = time.monotonic()
    with pytest.raises(WaitTimeoutError) as info:
        wait()
    elapsed = time.monotonic() - began
    assert elapsed < FAST, f"the wait noticed the death only after {elapsed:.1f} s: {info.value}"
    assert type(info.value).__name__ == "ProcessExitedError", repr(info.value)
    return info.value


# ------------------------------------------------------------------ fail fast (item: waits)


def test_wait_for_port_fails_at_once_when_the_server_exits(nsbox: Box) -> None:
    nsbox.spawn(BAD_CONFIG)
    error = failed_at_once(lambda: nsbox.wait_for_port(80, timeout=LONG))
    text = str(error)
    assert "gave up waiting for tcp port 80" in text
    assert "exited with status 1" in text
    assert 'app.conf:3: unknown directive "listn"' in text and "loading /etc/app.conf" in text
    assert error.returncode == 1  # type: ignore[attr-defined]
    assert isinstance(error, pytest_nsbox.ProcessExitedError) and isinstance(error, TimeoutError)


def test_a_launcher_that_exits_0_leaves_the_wait_to_its_daemon(nsbox: Box) -> None:
    """`nginx` (daemon on), `redis-server --daemonize yes`: the spawned process starts the
    server in the background and exits 0. That is not a death: the wait goes on and sees the
    daemon's port; and if the daemon never comes, the timeout says the launcher exited."""
    server = 'import socket, time; s = socket.create_server(("", 8081)); time.sleep(60)'
    daemon = f"exec {sys.executable} -c '{server}'"
    nsbox.spawn(f"echo starting; (sleep 0.3; {daemon}) > /dev/null 2>&1 & exit 0")
    nsbox.wait_for_port(8081, timeout=LONG)
    nsbox.spawn("echo 'daemonized'; exit 0")
    with pytest.raises(WaitTimeoutError) as info:
        nsbox.wait_for_port(8082, timeout=0.5)
    assert type(info.value) is WaitTimeoutError
    assert "exited with status 0" in str(info.value) and "daemonized" in str(info.value)


def test_a_server_that_dies_during_the_wait_is_noticed_at_once(nsbox: Box) -> None:
    nsbox.spawn("echo starting; sleep 0.5; echo 'segfault, pretend' >&2; kill -9 $$")
    error = failed_at_once(lambda: nsbox.wait_for_port(8080, timeout=LONG))
    assert "was killed by SIGKILL" in str(error) and "segfault, pretend" in str(error)


def test_process_names_the_process_to_watch(nsbox: Box) -> None:
    dying = nsbox.spawn("echo bye >&2; exit 7")
    sleeper = nsbox.spawn(["sleep", "100"])  # the last spawned, running: not the one watched
    error = failed_at_once(lambda: nsbox.wait_for_port(81, timeout=LONG, process=dying))
    assert "exited with status 7" in str(error) and "bye" in str(error)
    assert sleeper.poll() is None
    with pytest.raises(ArgumentTypeError, match=r"wait_for_port\(\): process: expected a BoxProcess"):
        nsbox.wait_for_port(81, timeout=1, process="server")  # type: ignore[arg-type]


def test_wait_for_output_of_the_box_fails_at_once_with_the_exit_status(nsbox: Box) -> None:
    nsbox.spawn(BAD_CONFIG)
    error = failed_at_once(lambda: nsbox.wait_for_output("listening", timeout=LONG))
    assert "exited with status 1" in str(error) and 'unknown directive "listn"' in str(error)


def test_a_wait_with_nothing_spawned_only_times_out(nsbox: Box) -> None:
    nsbox.run("exit 3")  # run() is not spawn(): nothing is watched
    with pytest.raises(WaitTimeoutError, match=r"nothing listens on tcp port 9 after 0\.3s") as info:
        nsbox.wait_for_port(9, timeout=0.3)
    assert type(info.value) is WaitTimeoutError


def test_a_running_server_that_never_listens_times_out(nsbox: Box) -> None:
    nsbox.spawn(["sleep", "100"])
    with pytest.raises(WaitTimeoutError, match=r"nothing listens on tcp port 9 after 0\.3s") as info:
        nsbox.wait_for_port(9, timeout=0.3)
    assert type(info.value) is WaitTimeoutError


def test_what_the_process_did_before_it_exited_counts(nsbox: Box) -> None:
    nsbox.spawn("mkdir -p /run/job && echo 42 > /run/job/result; echo 'job done' >> /var/log/job.log")
    nsbox.wait_for_file("/run/job/result", timeout=LONG)
    assert nsbox.wait_for_log("/var/log/job.log", "job (done)", timeout=LONG).group(1) == "done"


# --------------------------------------------------------------------------------- wait_until


def test_wait_until_returns_the_first_run_that_succeeds(nsbox: Box) -> None:
    nsbox.spawn("sleep 0.3; touch /run/ready; sleep 100")
    result = nsbox.wait_until("test -e /run/ready && echo ready", timeout=LONG, interval=0.05)
    assert (result.returncode, result.stdout) == (0, "ready\n")
    # Only the last attempt is in the history, not every failed one before it.
    attempts = [p for p in nsbox.history if p.args == "test -e /run/ready && echo ready"]
    assert len(attempts) == 1 and nsbox.history[-1] is attempts[0]


def test_wait_until_times_out_with_the_last_attempt(nsbox: Box) -> None:
    with pytest.raises(WaitTimeoutError) as info:
        nsbox.wait_until("echo 'db: not accepting connections' >&2; exit 2", timeout=0.5, interval=0.05)
    text = str(info.value)
    assert "did not succeed within 0.5s" in text
    assert "its last attempt exited with status 2" in text and "db: not accepting connections" in text


def test_wait_until_kills_an_attempt_that_hangs_at_the_deadline(nsbox: Box) -> None:
    began = time.monotonic()
    with pytest.raises(WaitTimeoutError, match="its last attempt was killed at the deadline"):
        nsbox.wait_until(["sleep", "100"], timeout=0.5)
    assert time.monotonic() - began < FAST


def test_wait_until_fails_at_once_when_the_server_exits(nsbox: Box) -> None:
    nsbox.spawn(BAD_CONFIG)
    error = failed_at_once(lambda: nsbox.wait_until("false", timeout=LONG))
    assert "exited with status 1" in str(error)


# ----------------------------------------------------------------------------- wait_for_http


SERVER = [
    "sh",
    "-c",
    f"sleep 0.3; exec {sys.executable} -m http.server 8000 --bind 0.0.0.0 --directory /srv/www",
]


def test_wait_for_http_waits_for_the_answer_inside_the_box(nsbox: Box) -> None:
    nsbox.write_text("/srv/www/index.html", "hello\n")
    nsbox.spawn(SERVER)
    assert nsbox.wait_for_http(8000, timeout=LONG) == b"hello\n"
    assert nsbox.wait_for_http("http://127.0.0.1:8000/missing", status=404, timeout=LONG).startswith(b"<!")
    assert nsbox.wait_for_http(f"http://{nsbox.hostname}:8000/", timeout=LONG) == b"hello\n"  # its /etc/hosts
    with pytest.raises(WaitTimeoutError, match=r"did not answer 200 within 0.3s; the last answer was 404"):
        nsbox.wait_for_http("http://localhost:8000/missing", timeout=0.3)


def test_wait_for_http_fails_at_once_when_the_server_exits(nsbox: Box) -> None:
    nsbox.spawn(BAD_CONFIG)
    error = failed_at_once(lambda: nsbox.wait_for_http(8000, timeout=LONG))
    assert "GET http://127.0.0.1:8000/ to answer 200" in str(error) and "listn" in str(error)


@pytest.fixture
def host_server() -> Iterator[int]:
    """An HTTP server on the host's own loopback, answering 200 to anything."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_wait_for_http_asks_the_box_not_the_host(nsbox: Box, host_server: int) -> None:
    with pytest.raises(WaitTimeoutError, match="ConnectionRefusedError"):
        nsbox.wait_for_http(host_server, timeout=0.3)


def test_wait_for_http_needs_nothing_in_the_image(
    shell_layer: list[Entry], tmp_path: Path, image_cache: str
) -> None:
    image = write_rootfs_tar(tmp_path / "sh.tar", shell_layer)  # sh and a few coreutils, no more
    with Box(image=str(image), cache=image_cache) as box:
        assert box.run("command -v curl || command -v wget || command -v python3").returncode != 0
        with pytest.raises(WaitTimeoutError, match="ConnectionRefusedError"):
            box.wait_for_http(8000, timeout=0.3)


# ------------------------------------------------------------------ wait_for_file, wait_for_log


def test_wait_for_file_waits_until_it_appears(nsbox: Box) -> None:
    nsbox.spawn("sleep 0.3; mkdir -p /run/app; echo $$ > /run/app/pid; sleep 100")
    nsbox.wait_for_file("/run/app/pid", timeout=LONG)
    assert nsbox.read_text("/run/app/pid").strip().isdigit()
    with pytest.raises(WaitTimeoutError, match=r"/run/nope/pid did not appear within 0.2s \(nor does its"):
        nsbox.wait_for_file("/run/nope/pid", timeout=0.2)


def test_wait_for_file_fails_at_once_when_the_process_exits(nsbox: Box) -> None:
    nsbox.spawn(BAD_CONFIG)
    error = failed_at_once(lambda: nsbox.wait_for_file("/run/app.pid", timeout=LONG))
    assert "/run/app.pid to appear" in str(error)


def test_wait_for_log_returns_the_match(nsbox: Box) -> None:
    nsbox.spawn(
        "sleep 0.2; echo starting > /var/log/app.log; sleep 0.2; "
        "echo 'listening on port 8123' >> /var/log/app.log; sleep 100"
    )
    match = nsbox.wait_for_log("/var/log/app.log", re.compile(r"listening on port (\d+)"), timeout=LONG)
    assert match.group(1) == "8123"
    with pytest.raises(
        WaitTimeoutError, match=r"'ready' did not appear in /var/log/app.log within 0.2s; it holds:"
    ):
        nsbox.wait_for_log("/var/log/app.log", "ready", timeout=0.2)
    with pytest.raises(WaitTimeoutError, match="the file does not exist"):
        nsbox.wait_for_log("/var/log/none.log", "ready", timeout=0.2)


def test_wait_for_log_fails_at_once_when_the_process_exits(nsbox: Box) -> None:
    nsbox.spawn("echo 'fatal: no database' > /var/log/app.log; exit 3")
    error = failed_at_once(lambda: nsbox.wait_for_log("/var/log/app.log", "ready", timeout=LONG))
    assert "exited with status 3" in str(error)


# ------------------------------------------------------------------------------- bad input


BAD: list[tuple[str, Callable[[Any], object], type[BaseException]]] = [
    ("wait_until-cmd-int", lambda b: b.wait_until(42), ArgumentTypeError),
    ("wait_until-cmd-empty", lambda b: b.wait_until(""), ConfigError),
    ("wait_until-interval-zero", lambda b: b.wait_until("true", interval=0), ConfigError),
    ("wait_until-interval-str", lambda b: b.wait_until("true", interval="1"), ArgumentTypeError),
    ("wait_until-timeout-negative", lambda b: b.wait_until("true", timeout=-1), ConfigError),
    ("wait_for_http-port-str", lambda b: b.wait_for_http("8000"), ConfigError),
    ("wait_for_http-port-zero", lambda b: b.wait_for_http(0), ConfigError),
    ("wait_for_http-port-bool", lambda b: b.wait_for_http(True), ArgumentTypeError),
    ("wait_for_http-url-list", lambda b: b.wait_for_http(["http://x/"]), ArgumentTypeError),
    ("wait_for_http-https", lambda b: b.wait_for_http("https://127.0.0.1/"), ConfigError),
    ("wait_for_http-url-port-zero", lambda b: b.wait_for_http("http://127.0.0.1:0/"), ConfigError),
    ("wait_for_http-unknown-host", lambda b: b.wait_for_http("http://nowhere.example:80/"), ConfigError),
    ("wait_for_http-status-str", lambda b: b.wait_for_http(80, status="200"), ArgumentTypeError),
    ("wait_for_http-status-range", lambda b: b.wait_for_http(80, status=42), ConfigError),
    ("wait_for_file-path-int", lambda b: b.wait_for_file(5), ArgumentTypeError),
    ("wait_for_file-path-empty", lambda b: b.wait_for_file(""), ConfigError),
    ("wait_for_log-pattern-int", lambda b: b.wait_for_log("/var/log/x", 5), ArgumentTypeError),
    ("wait_for_log-pattern-bad", lambda b: b.wait_for_log("/var/log/x", "("), ConfigError),
    (
        "wait_for_log-pattern-bytes",
        lambda b: b.wait_for_log("/var/log/x", re.compile(b"x")),
        ArgumentTypeError,
    ),
    ("wait_for_file-process-str", lambda b: b.wait_for_file("/x", process="web"), ArgumentTypeError),
]


@pytest.mark.parametrize(("call", "expected"), [pytest.param(c, e, id=i) for i, c, e in BAD])
def test_wrong_arguments_are_refused_at_once(
    nsbox: Box, call: Callable[[Any], object], expected: type[BaseException]
) -> None:
    began = time.monotonic()
    with pytest.raises(expected):
        call(nsbox)
    assert time.monotonic() - began < 1.0


def test_the_waits_of_a_stopped_box_say_so(nsbox_factory: Callable[..., Box]) -> None:
    box = nsbox_factory()
    box.stop()
    for wait in (
        lambda: box.wait_until("true", 1),
        lambda: box.wait_for_http(80, timeout=1),
        lambda: box.wait_for_file("/x", 1),
        lambda: box.wait_for_log("/x", "y", 1),
    ):
        with pytest.raises(BoxError, match=r"before stop\(\)"):
            wait()
