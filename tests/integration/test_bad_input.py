"""Careless and hostile arguments: each is refused at once, clearly, and the box lives on.

Every wrong call of the battery must raise the documented exception within a second (never
by waiting out a timeout), and the same box must run ``echo ok`` right after it. One box
serves the whole battery: if any call killed its init, every later check would show it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_nsbox import (
    ArgumentTypeError,
    Box,
    BoxError,
    BoxSpec,
    CgroupError,
    CommandNotFoundError,
    ConfigError,
    NsboxError,
    WaitTimeoutError,
)
from pytest_nsbox.cgroups import Cgroup

pytestmark = pytest.mark.requires("boxes")

QUICK = 1.0  # seconds: a refusal is immediate, a hang would be the default 30 s timeouts

AnyBox: Any = Box  # the constructor, called with what its type hints forbid
Call = Callable[[Any], object]  # Any: the battery passes what the type hints forbid


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with Box() as started:
        yield started


def _spawn_then_wait(box: Box, pattern: Any, timeout: Any) -> object:
    process = box.spawn(["sleep", "5"])
    try:
        return box.wait_for_output(pattern, timeout, process=process)
    finally:
        process.kill()
        process.wait(5)


# (id, the wrong call, the exception it must raise). ArgumentTypeError is a TypeError and a
# ConfigError; ConfigError a ValueError.
BATTERY: list[tuple[str, Call, type[BaseException]]] = [
    # run(): env
    ("run-env-int-value", lambda b: b.run("true", env={"PORT": 8080}), ArgumentTypeError),
    ("run-env-bytes-value", lambda b: b.run("true", env={"A": b"x"}), ArgumentTypeError),
    ("run-env-int-name", lambda b: b.run("true", env={1: "x"}), ArgumentTypeError),
    ("run-env-name-with-equals", lambda b: b.run("true", env={"A=B": "x"}), ConfigError),
    ("run-env-empty-name", lambda b: b.run("true", env={"": "x"}), ConfigError),
    ("run-env-nul-value", lambda b: b.run("true", env={"A": "x\0y"}), ConfigError),
    ("run-env-list", lambda b: b.run("true", env=["A=1"]), ArgumentTypeError),
    # run(): cwd
    ("run-cwd-int", lambda b: b.run("pwd", cwd=123), ArgumentTypeError),
    ("run-cwd-nul", lambda b: b.run("pwd", cwd="/tmp\0x"), ConfigError),
    ("run-cwd-empty", lambda b: b.run("pwd", cwd=""), ConfigError),
    ("run-cwd-missing", lambda b: b.run("pwd", cwd="/no/such/dir"), BoxError),
    # run(): user
    ("run-user-unknown-name", lambda b: b.run("id", user="ghost"), BoxError),
    ("run-user-unknown-group", lambda b: b.run("id", user="root:ghosts"), BoxError),
    ("run-user-negative", lambda b: b.run("id", user=-1), ConfigError),
    ("run-user-float", lambda b: b.run("id", user=1.5), ArgumentTypeError),
    ("run-user-bool", lambda b: b.run("id", user=True), ArgumentTypeError),
    ("run-user-three-parts", lambda b: b.run("id", user="0:0:0"), ConfigError),
    # run(): input, timeout, check, text
    ("run-input-int", lambda b: b.run("cat", input=123), ArgumentTypeError),
    ("run-input-list", lambda b: b.run("cat", input=["a"]), ArgumentTypeError),
    ("run-input-str-without-text", lambda b: b.run("cat", input="x", text=False), ArgumentTypeError),
    ("run-timeout-str", lambda b: b.run("true", timeout="5"), ArgumentTypeError),
    ("run-timeout-negative", lambda b: b.run("true", timeout=-1), ConfigError),
    ("run-timeout-nan", lambda b: b.run("true", timeout=float("nan")), ConfigError),
    ("run-timeout-bool", lambda b: b.run("true", timeout=True), ArgumentTypeError),
    ("run-check-str", lambda b: b.run("true", check="yes"), ArgumentTypeError),
    ("run-text-none", lambda b: b.run("true", text=None), ArgumentTypeError),
    # run(): the command itself
    ("run-cmd-none", lambda b: b.run(None), ArgumentTypeError),
    ("run-cmd-int", lambda b: b.run(42), ArgumentTypeError),
    ("run-cmd-empty-string", lambda b: b.run(""), ConfigError),
    ("run-cmd-empty-list", lambda b: b.run([]), ConfigError),
    ("run-cmd-empty-program", lambda b: b.run(["", "x"]), ConfigError),
    ("run-cmd-int-argument", lambda b: b.run(["sleep", 1]), ArgumentTypeError),
    ("run-cmd-nul-argument", lambda b: b.run(["echo", "a\0b"]), ConfigError),
    ("run-cmd-nul-script", lambda b: b.run("echo a\0b"), ConfigError),
    ("run-cmd-dict", lambda b: b.run({"echo": "x"}), ArgumentTypeError),
    ("run-cmd-missing-program", lambda b: b.run(["/no/such/program"]), CommandNotFoundError),
    # spawn()
    ("spawn-env-int-value", lambda b: b.spawn("true", env={"PORT": 8080}), ArgumentTypeError),
    ("spawn-cmd-int-argument", lambda b: b.spawn(["sleep", 1]), ArgumentTypeError),
    ("spawn-cwd-bytes-nul", lambda b: b.spawn("pwd", cwd=b"\0"), ConfigError),
    ("spawn-user-unknown", lambda b: b.spawn("id", user="ghost"), BoxError),
    ("spawn-input-int", lambda b: b.spawn("cat", input=7), ArgumentTypeError),
    # file helpers
    ("write_text-int", lambda b: b.write_text("/tmp/x", 123), ArgumentTypeError),
    ("write_text-bytes", lambda b: b.write_text("/tmp/x", b"x"), ArgumentTypeError),
    ("write_bytes-str", lambda b: b.write_bytes("/tmp/x", "x"), ArgumentTypeError),
    ("write_text-mode-str", lambda b: b.write_text("/tmp/x", "x", mode="644"), ArgumentTypeError),
    ("write_text-path-none", lambda b: b.write_text(None, "x"), ArgumentTypeError),
    ("write_text-path-nul", lambda b: b.write_text("/tmp/a\0b", "x"), ConfigError),
    ("read_text-missing", lambda b: b.read_text("/no/such/file"), FileNotFoundError),
    ("read_text-nul", lambda b: b.read_text("/etc\0/passwd"), ConfigError),
    ("read_bytes-int", lambda b: b.read_bytes(3), ArgumentTypeError),
    ("exists-empty", lambda b: b.exists(""), ConfigError),
    ("host_path-int", lambda b: b.host_path(5), ArgumentTypeError),
    ("copy_in-missing-host-path", lambda b: b.copy_in("/no/such/host/path", "/tmp"), FileNotFoundError),
    ("copy_in-host-path-int", lambda b: b.copy_in(9, "/tmp"), ArgumentTypeError),
    ("copy_out-missing-box-path", lambda b: b.copy_out("/no/such/box/path", "/tmp"), FileNotFoundError),
    # waits
    ("wait_for_port-zero", lambda b: b.wait_for_port(0, 1), ConfigError),
    ("wait_for_port-str", lambda b: b.wait_for_port("80", 1), ArgumentTypeError),
    ("wait_for_port-timeout-negative", lambda b: b.wait_for_port(80, -1), ConfigError),
    ("wait_for_port-nothing-listens", lambda b: b.wait_for_port(9, timeout=0.1), WaitTimeoutError),
    ("wait_for_output-bad-regex", lambda b: _spawn_then_wait(b, "(", 1), ConfigError),
    ("wait_for_output-int-pattern", lambda b: _spawn_then_wait(b, 5, 1), ArgumentTypeError),
    ("wait_for_output-never-printed", lambda b: _spawn_then_wait(b, "never", 0.1), WaitTimeoutError),
    # Box(...): refused before anything starts
    ("Box-hostname-int", lambda b: AnyBox(hostname=123), ConfigError),
    ("Box-tmpfs-relative", lambda b: AnyBox(tmpfs={"data": "1M"}), ConfigError),
    ("Box-tmpfs-on-proc", lambda b: AnyBox(tmpfs={"/proc": "1M"}), ConfigError),
    ("Box-env-int-value", lambda b: AnyBox(env={"PORT": 8080}), ArgumentTypeError),
    ("Box-limits-negative-pids", lambda b: AnyBox(limits={"pids": -1}), ConfigError),
    ("Box-spec-and-hostname", lambda b: AnyBox(spec=BoxSpec.create(), hostname="x"), ConfigError),
    ("Box-spec-not-a-spec", lambda b: AnyBox(spec="spec"), ArgumentTypeError),
    ("Box-unknown-network", lambda b: AnyBox(network="host"), ConfigError),
]


@pytest.mark.parametrize(("call", "expected"), [pytest.param(c, e, id=i) for i, c, e in BATTERY])
def test_wrong_call_is_refused_at_once_and_the_box_lives_on(
    box: Box, call: Call, expected: type[BaseException]
) -> None:
    began = time.monotonic()
    with pytest.raises(expected) as caught:
        call(box)
    elapsed = time.monotonic() - began
    assert elapsed < QUICK, f"refused only after {elapsed:.2f}s: {caught.value}"
    assert str(caught.value)  # a message, not a bare class
    assert box.run("echo ok").stdout == "ok\n"


def test_type_errors_are_both_config_and_type_errors(box: Box) -> None:
    with pytest.raises(TypeError, match=r"run\(\): env: value of PORT must be a string"):
        box.run("true", env={"PORT": 8080})  # type: ignore[dict-item]
    with pytest.raises(ConfigError):
        box.run("pwd", cwd=123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"run\(\): timeout: expected a number of seconds >= 0"):
        box.run("true", timeout=-1)


def test_an_unknown_user_is_named_in_inits_own_words(box: Box) -> None:
    with pytest.raises(BoxError, match=r"user 'ghost' not found in the box's /etc/passwd"):
        box.run("id", user="ghost")
    with pytest.raises(BoxError, match=r"group 'ghosts' not found in the box's /etc/group"):
        box.run("id", user="root:ghosts")
    assert box.run("id -u", user="0:0").stdout == "0\n"


def test_init_survives_requests_the_host_would_never_send(box: Box) -> None:
    """Past the checks, straight to PID 1: each comes back as an error, and init lives."""
    link = box._link
    assert link is not None
    raw: list[dict[str, Any]] = [
        {"op": "exec", "argv": ["true"], "env": {"PORT": 8080}, "cwd": None, "user": None},
        {"op": "exec", "argv": ["true"], "env": {}, "cwd": 123, "user": None},
        {"op": "exec", "argv": [], "env": {}, "cwd": None, "user": None},
        {"op": "exec", "env": {}},
        {"op": "kill", "pid": "one", "sig": 9},
        {"op": "no-such-op"},
    ]
    for message in raw:
        began = time.monotonic()
        reply = link.request(message, timeout=5)
        assert time.monotonic() - began < QUICK
        assert reply["error"]["message"], reply
    assert box.run("echo ok").stdout == "ok\n"


def test_cgroup_limit_raises_config_error(box: Box, cgroup_limit: Callable[..., Cgroup]) -> None:
    cases: list[tuple[dict[str, Any], type[BaseException]]] = [
        ({"pids": -1}, ConfigError),
        ({"memory": "lots"}, ConfigError),
        ({"colour": 3}, ConfigError),
    ]
    for limits, expected in cases:
        began = time.monotonic()
        with pytest.raises(expected, match=r"cgroup_limit\(\.\.\.\)"):
            cgroup_limit(box=box, **limits)
        assert time.monotonic() - began < QUICK
    with pytest.raises(ArgumentTypeError, match=r"cgroup_limit\(box=\.\.\.\): expected a Box"):
        cgroup_limit(box="box", pids=3)
    assert box.run("echo ok").stdout == "ok\n"


def test_cgroup_limit_without_a_box_raises_before_making_one(cgroup_limit: Callable[..., Cgroup]) -> None:
    with pytest.raises(ConfigError, match=r"pids=-1: expected a whole number of processes >= 1"):
        cgroup_limit(pids=-1)


# ------------------------------------------------------------------------- a stopped box


def test_helpers_of_a_stopped_box_refuse_instead_of_answering_empty(tmp_path: Path) -> None:
    box = Box()
    with box:
        box.write_text("/tmp/changed", "x")
        root = box.root
        assert root is not None and "/tmp/changed" in root.diff().added
        cgroup = box.cgroup
    refusals: list[Callable[[], object]] = [
        root.diff,
        box.processes,
        lambda: box.host_path("/etc"),
        lambda: box.read_text("/etc/hostname"),
        lambda: box.write_text("/tmp/x", "x"),
        lambda: box.exists("/etc"),
        lambda: box.copy_out("/etc/hostname", tmp_path),
        lambda: box.run("true"),
        lambda: box.wait_for_port(80, 1),
        lambda: box.wait_for_output("x", 1),
    ]
    for refusal in refusals:
        began = time.monotonic()
        with pytest.raises(BoxError, match=r"before stop\(\)"):
            refusal()
        assert time.monotonic() - began < QUICK
    if cgroup.driver is not None:
        with pytest.raises(CgroupError, match=r"call stats\(\) before stop\(\)"):
            cgroup.stats()


# --------------------------------------------------------------------------------- tmpfs


def test_a_tmpfs_may_go_anywhere_nested_ones_included() -> None:
    tmpfs = {"/data/sub": "1M", "/etc/app": "1M", "/data": "4M", "/srv/a/b/c": "1M"}
    with Box(tmpfs=tmpfs) as box:
        mounts = box.run(["cat", "/proc/self/mountinfo"]).stdout
        points = {line.split()[4] for line in mounts.splitlines() if " - tmpfs " in line}
        assert {"/etc/app", "/data", "/data/sub", "/srv/a/b/c"} <= points
        # /data/sub stays visible: the parent was mounted first, the child on top of it.
        sizes = box.run(["df", "-k", "--output=target,size", "/data", "/data/sub", "/etc/app"]).stdout
        assert [line.split()[1] for line in sizes.splitlines()[1:]] == ["4096", "1024", "1024"]
        box.write_text("/etc/app/config", "ok")
        assert box.run(["cat", "/etc/app/config"]).stdout == "ok"


# ------------------------------------------------------------------------------ messages


def test_every_error_is_an_nsbox_error() -> None:
    for cls in (ArgumentTypeError, WaitTimeoutError):
        assert issubclass(cls, NsboxError)
    assert issubclass(WaitTimeoutError, TimeoutError) and issubclass(WaitTimeoutError, BoxError)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ConfigError)
