"""command_argv, RunResult, and BoxProcess's output handling (with a stand-in box)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from typing import Any

import pytest

from pytest_nsbox.errors import ArgumentTypeError, ConfigError, ProcessExitedError
from pytest_nsbox.process import BoxProcess, RunResult
from pytest_nsbox.spec import command_argv

# ---------------------------------------------------------------------------- command_argv


def test_string_runs_under_sh_c() -> None:
    assert command_argv("echo hi | wc -c") == ["/bin/sh", "-c", "echo hi | wc -c"]


def test_bytes_string_runs_under_sh_c() -> None:
    assert command_argv(b"echo hi") == ["/bin/sh", "-c", "echo hi"]


def test_list_is_the_argv_itself() -> None:
    assert command_argv(["ls", "-l", "/a b"]) == ["ls", "-l", "/a b"]


def test_tuple_is_the_argv_itself() -> None:
    assert command_argv(("true",)) == ["true"]


def test_path_like_become_strings() -> None:
    assert command_argv([pathlib.Path("/usr/bin/env"), pathlib.PurePosixPath("x/y"), ""]) == [
        "/usr/bin/env",
        "x/y",
        "",
    ]


def test_numbers_are_refused_as_subprocess_does() -> None:
    with pytest.raises(ArgumentTypeError, match=r"cmd\[1\]: expected str, bytes or a path, got int 3"):
        command_argv(["sleep", 3])


@pytest.mark.parametrize("bad", ["", "  ", ["echo", "a\0b"], "echo \0", [""], b""])
def test_empty_commands_and_nul_bytes_are_config_errors(bad: Any) -> None:
    with pytest.raises(ConfigError, match="cmd"):
        command_argv(bad)


def test_argv_is_a_new_list() -> None:
    original = ["echo", "hi"]
    argv = command_argv(original)
    argv.append("more")
    assert original == ["echo", "hi"]


@pytest.mark.parametrize("empty", [[], ()])
def test_empty_sequence_is_a_value_error(empty: Any) -> None:
    with pytest.raises(ValueError, match="an empty list"):
        command_argv(empty)


def test_bytes_arguments_in_a_list_are_decoded() -> None:
    assert command_argv([b"/bin/echo", b"hi"]) == ["/bin/echo", "hi"]


# -------------------------------------------------------------------------------- RunResult


def test_run_result_is_a_completed_process_with_box_extras() -> None:
    result = RunResult(["x"], 0, "out", "err", duration=1.25, signal=None, oom_killed=False)
    assert isinstance(result, subprocess.CompletedProcess)
    assert (result.args, result.returncode, result.stdout, result.stderr) == (["x"], 0, "out", "err")
    assert (result.duration, result.signal, result.oom_killed) == (1.25, None, False)


def test_run_result_defaults() -> None:
    result = RunResult("true", 0)
    assert (result.stdout, result.stderr, result.duration, result.signal, result.oom_killed) == (
        None,
        None,
        0.0,
        None,
        False,
    )


def test_run_result_check_returncode_raises_called_process_error() -> None:
    RunResult("true", 0).check_returncode()
    with pytest.raises(subprocess.CalledProcessError) as info:
        RunResult("false", 1, "", "boom").check_returncode()
    assert info.value.returncode == 1
    assert info.value.stderr == "boom"


def test_run_result_killed_by_signal() -> None:
    result = RunResult("sleep 9", -signal.SIGKILL, signal=signal.SIGKILL, oom_killed=True)
    assert result.signal == signal.SIGKILL
    assert result.oom_killed is True


def test_run_result_repr_shows_signal_only_when_set() -> None:
    assert repr(RunResult("true", 0, "", "", duration=0.0123)) == (
        "RunResult(args='true', returncode=0, duration=0.012, stdout='', stderr='')"
    )
    killed = repr(RunResult("sleep 9", -9, signal=9))
    assert "returncode=-9, signal=9," in killed


# ---------------------------------------------------------------- BoxProcess, stand-in box


class StandInLink:
    """Just what BoxProcess touches on the link to its init: one that has reported no exit,
    or (``gone``) one whose box has died, which counts as a SIGKILL."""

    box_id = "standin"

    def __init__(self, gone: bool) -> None:
        self.gone = gone

    def drain(self) -> None:
        pass

    def exit_status(self, pid: int) -> int | None:
        return None

    def exit_time(self, pid: int) -> float | None:
        return None

    def wait_exit(self, pid: int, deadline: float | None) -> int | None:
        if not self.gone and deadline is not None:
            time.sleep(max(deadline - time.monotonic(), 0))
        return None

    def forget(self, pid: int) -> None:
        pass


class StandInBox:
    """Collects the processes that tell their box they are done."""

    def __init__(self) -> None:
        self.forgotten: list[BoxProcess] = []

    def _forget_process(self, process: BoxProcess) -> None:
        self.forgotten.append(process)


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("test-output", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def make_process(
    stdout: bytes, stderr: bytes, text: bool = True, gone: bool = True
) -> tuple[BoxProcess, StandInBox]:
    box = StandInBox()
    process = BoxProcess(
        StandInLink(gone),  # type: ignore[arg-type]
        "cmd",
        7,
        memfd_with(stdout),
        memfd_with(stderr),
        text,
        init_pid=os.getpid(),
        released=box._forget_process,
    )
    return process, box


def test_box_process_reads_output_from_its_memfds() -> None:
    process, _box = make_process(b"hello \xc3\xa9\n", b"warn\n")
    try:
        assert process.stdout == "hello é\n"
        assert process.stderr == "warn\n"
    finally:
        process.release()


def test_box_process_binary_output_is_bytes() -> None:
    process, _box = make_process(b"\x00\xff", b"", text=False)
    try:
        assert process.stdout == b"\x00\xff"
        assert process.stderr == b""
    finally:
        process.release()


def test_box_process_sees_output_written_after_it_started() -> None:
    process, _box = make_process(b"first\n", b"")
    try:
        assert process._fds is not None
        os.write(process._fds[0], b"second\n")
        assert process.stdout == "first\nsecond\n"
    finally:
        process.release()


def test_box_process_release_keeps_output_and_closes_the_memfds() -> None:
    process, box = make_process(b"out", b"err")
    assert process._fds is not None
    fds = process._fds
    process.release()
    assert process.stdout == "out"
    assert process.stderr == "err"
    assert box.forgotten == [process]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_box_process_of_a_dead_box_counts_as_sigkilled() -> None:
    process, box = make_process(b"partial", b"")
    assert process.returncode is None
    assert process.wait() == -signal.SIGKILL
    result = process.result()
    assert isinstance(result, RunResult)
    assert (result.returncode, result.signal, result.stdout) == (-signal.SIGKILL, signal.SIGKILL, "partial")
    assert result.duration >= 0
    assert box.forgotten == [process]
    assert process.kill() is False


def test_box_process_wait_for_output_finds_a_match_already_printed() -> None:
    process, _box = make_process(b"server listening on :8080\n", b"")
    try:
        match = process.wait_for_output(r"listening on :(\d+)", timeout=1)
        assert match.group(1) == "8080"
    finally:
        process.release()


def test_box_process_wait_for_output_searches_only_the_asked_stream() -> None:
    process, _box = make_process(b"", b"ready\n", gone=False)
    try:
        assert process.wait_for_output("ready", timeout=1, stream="stderr")
        with pytest.raises(TimeoutError, match=r"'ready' did not appear in the output of 'cmd' within 0.05s"):
            process.wait_for_output("ready", timeout=0.05, stream="stdout")
    finally:
        process.release()


def test_box_process_wait_for_output_gives_up_when_the_process_exited() -> None:
    process, _box = make_process(b"booting\n", b"")
    process.wait()
    with pytest.raises(ProcessExitedError) as info:
        process.wait_for_output("ready", timeout=5)
    assert isinstance(info.value, TimeoutError)
    assert str(info.value) == (
        "box standin: gave up waiting for 'ready' in its output: the process it watches, 'cmd' "
        f"(pid 7 in the box), was killed by SIGKILL after {process.ended - process.started:.2f} s; "
        "its output:\nbooting\n"
    )
    assert (info.value.returncode, info.value.output) == (-signal.SIGKILL, "booting\n")


def test_box_process_exit_error_shows_both_streams_under_their_names() -> None:
    process, _box = make_process(b"loading config\n", b"error: bad port\n")
    process.wait()
    text = str(process.exited_error("port 80"))
    assert text.endswith("its output:\n--- stdout ---\nloading config\n--- stderr ---\nerror: bad port\n")


def test_box_process_reports_an_oom_kill_only_for_a_sigkill_while_the_count_rose() -> None:
    class ExitedLink(StandInLink):
        def __init__(self, status: int) -> None:
            super().__init__(gone=False)
            self.status = status

        def exit_status(self, pid: int) -> int | None:
            return self.status

        def exit_time(self, pid: int) -> float | None:
            return 1000.0

    def finished(status: int, kills_now: int) -> BoxProcess:
        process = BoxProcess(
            ExitedLink(status),  # type: ignore[arg-type]
            "hog",
            7,
            memfd_with(b""),
            memfd_with(b""),
            True,
            init_pid=os.getpid(),
            started=999.5,
            oom_kills=lambda: kills_now,
            oom_kills_at_start=2,
        )
        assert process.poll() is not None
        return process

    sigkill, exit_137, exit_1 = signal.SIGKILL, 137 << 8, 1 << 8  # raw wait statuses
    assert finished(sigkill, kills_now=3).result().oom_killed is True
    assert finished(exit_137, kills_now=3).result().oom_killed is True  # a shell's "137"
    assert finished(sigkill, kills_now=2).result().oom_killed is False  # a plain kill -9
    assert finished(exit_1, kills_now=3).result().oom_killed is False  # it was not killed
    # Timed to the exit init reported, not to when it was noticed.
    assert finished(exit_1, kills_now=2).result().duration == 0.5
