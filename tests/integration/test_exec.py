"""Every branch of run() and spawn(): argv vs shell, input, env, cwd, user, timeout, check, text."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from pytest_nsbox import (
    Box,
    BoxError,
    CommandFailedError,
    CommandNotFoundError,
    CommandTimeoutError,
    RunResult,
)

pytestmark = pytest.mark.requires("boxes")


def test_string_runs_under_sh_and_list_is_argv(nsbox: Box) -> None:
    shell = nsbox.run("echo $((1 + 2)) | tr 3 x")
    assert shell.stdout == "x\n" and shell.args == "echo $((1 + 2)) | tr 3 x"
    argv = nsbox.run(["echo", "$((1 + 2))", "|", "tr"])
    assert argv.stdout == "$((1 + 2)) | tr\n"


def test_result_is_a_completed_process_with_timing(nsbox: Box) -> None:
    result = nsbox.run("echo out; echo err >&2; exit 3")
    assert isinstance(result, subprocess.CompletedProcess) and isinstance(result, RunResult)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert result.signal is None and result.oom_killed is False
    slow = nsbox.run("sleep 0.2")
    # From just before the request to the exit as the box's init reaped it, on one clock
    # (CLOCK_MONOTONIC): never shorter than the command ran.
    assert 0.2 <= slow.duration < 60


def test_input_text_and_bytes(nsbox: Box) -> None:
    assert nsbox.run(["tr", "a-z", "A-Z"], input="hello").stdout == "HELLO"
    raw = nsbox.run(["cat"], input=b"\x00\xff", text=False)
    assert raw.stdout == b"\x00\xff" and isinstance(raw.stderr, bytes)
    big = "x" * 300_000
    assert nsbox.run(["wc", "-c"], input=big).stdout.strip() == "300000"


def test_no_input_means_empty_stdin(nsbox: Box) -> None:
    assert nsbox.run(["cat"], timeout=10).stdout == ""


def test_environment_layers(nsbox_factory) -> None:
    box = nsbox_factory(env={"APP_MODE": "test", "SHARED": "box"})
    result = box.run("echo $APP_MODE $SHARED $EXTRA $HOSTNAME $HOME", env={"SHARED": "run", "EXTRA": "1"})
    assert result.stdout.split() == ["test", "run", "1", "box", "/root"]
    assert "/usr/bin" in box.run("echo $PATH").stdout


def test_cwd(nsbox: Box) -> None:
    assert nsbox.run("pwd").stdout == "/\n"
    assert nsbox.run("pwd", cwd="/etc").stdout == "/etc\n"
    with pytest.raises(BoxError, match="working directory '/nonexistent'"):
        nsbox.run("pwd", cwd="/nonexistent")


def test_user_by_name_uid_and_group(nsbox: Box) -> None:
    assert nsbox.run("id -un").stdout == "root\n"
    nobody = nsbox.run("id -u; id -g; echo $HOME", user="nobody").stdout.split()
    assert nobody[0] == "65534" and nobody[2] == "/nonexistent"
    assert nsbox.run(["id", "-u"], user=1234).stdout == "1234\n"
    assert nsbox.run(["id", "-g"], user="1234:4321").stdout == "4321\n"
    denied = nsbox.run("cat /etc/shadow", user="nobody")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    with pytest.raises(BoxError, match="no-such-user"):
        nsbox.run("true", user="no-such-user")


def test_check_raises_a_called_process_error_with_output(nsbox: Box) -> None:
    with pytest.raises(subprocess.CalledProcessError) as caught:
        nsbox.run("echo partial; echo boom >&2; exit 7", check=True)
    error = caught.value
    assert isinstance(error, CommandFailedError)
    assert error.returncode == 7 and error.stdout == "partial\n" and error.stderr == "boom\n"
    assert nsbox.id in str(error) and "boom" in str(error)
    assert nsbox.run("true", check=True).returncode == 0


def test_timeout_kills_the_whole_process_group_and_keeps_output(nsbox: Box) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        nsbox.run("echo started; sleep 100 & sleep 100", timeout=0.5)
    assert time.monotonic() - started < 10
    error = caught.value
    assert isinstance(error, CommandTimeoutError)
    assert error.output == "started\n" and error.timeout == 0.5
    assert "timed out" in str(error) and nsbox.id in str(error)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _live_names(nsbox).count("sleep"):
        time.sleep(0.02)  # SIGKILL is sent; the background sleep may take a moment to go
    assert "sleep" not in _live_names(nsbox)


def test_a_process_wait_that_runs_out_leaves_it_running(nsbox: Box) -> None:
    process = nsbox.spawn("echo up; exec sleep 100")
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        process.wait(timeout=0.2)
    error = caught.value
    assert isinstance(error, CommandTimeoutError) and isinstance(error, BoxError)
    assert "still running" in str(error) and error.killed is False
    assert process.poll() is None, "a wait that ran out must not end the process"
    process.kill()
    assert process.wait(timeout=10) == -signal.SIGKILL


def test_missing_program_is_named(nsbox: Box) -> None:
    with pytest.raises(CommandNotFoundError) as caught:
        nsbox.run(["no-such-program", "--version"])
    assert isinstance(caught.value, FileNotFoundError)
    assert "no-such-program" in str(caught.value) and "PATH=" in str(caught.value)
    with pytest.raises(CommandNotFoundError, match="/opt/nothing/here"):
        nsbox.run(["/opt/nothing/here"])
    shell = nsbox.run("no-such-program")
    assert shell.returncode == 127 and "no-such-program: not found" in shell.stderr


def test_not_executable_is_explained(nsbox: Box) -> None:
    nsbox.write_text("/usr/local/bin/script.sh", "#!/bin/sh\necho hi\n", mode=0o644)
    with pytest.raises(CommandNotFoundError, match="permission denied"):
        nsbox.run(["/usr/local/bin/script.sh"])


def test_killed_by_a_signal(nsbox: Box) -> None:
    result = nsbox.run("kill -TERM $$")
    assert result.returncode == -signal.SIGTERM and result.signal == signal.SIGTERM


def test_spawn_poll_wait_and_output(nsbox: Box) -> None:
    process = nsbox.spawn("echo begin; read line; echo got $line; exit 4", input="data\n")
    assert process.wait(timeout=10) == 4
    assert process.stdout == "begin\ngot data\n"
    assert process.poll() == 4
    result = process.result()
    assert result.returncode == 4 and result.duration >= 0


def test_a_spawned_process_is_timed_to_its_exit_not_to_when_it_was_noticed(nsbox: Box) -> None:
    process = nsbox.spawn("exit 3")
    time.sleep(1.5)  # nobody looks meanwhile
    result = process.result()
    assert result.returncode == 3
    assert result.duration < 0.5, f"timed to when its exit was noticed: {result.duration:.3f} s"
    assert process.ended is not None and process.ended - process.started == result.duration


def test_spawn_kill_and_host_pid(nsbox: Box) -> None:
    process = nsbox.spawn(["sleep", "100"])
    assert process.poll() is None
    host_pid = process.host_pid
    assert host_pid is not None and host_pid != process.pid
    with open(f"/proc/{host_pid}/status") as handle:
        nspid = next(line for line in handle if line.startswith("NSpid:")).split()
    assert int(nspid[-1]) == process.pid and int(nspid[1]) == host_pid
    assert psutil.Process(host_pid).name() == "sleep"
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.1)
    assert process.kill(signal.SIGTERM)
    assert process.wait(timeout=10) == -signal.SIGTERM
    assert not process.kill()


def test_wait_for_output_and_port(nsbox: Box) -> None:
    server = nsbox.spawn([sys.executable, "-u", "-m", "http.server", "8080", "--bind", "127.0.0.1"])
    nsbox.wait_for_port(8080, timeout=30)
    page = nsbox.run(
        [
            sys.executable,
            "-c",
            "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8080/').status)",
        ]
    )
    assert page.stdout == "200\n"
    # run() in between does not change which process the box-level helper watches
    match = nsbox.wait_for_output(r"Serving HTTP on (\S+) port (\d+)", timeout=30)
    assert match.group(2) == "8080"
    assert server.poll() is None
    with pytest.raises(TimeoutError, match="port 9999"):
        nsbox.wait_for_port(9999, timeout=0.2)
    with pytest.raises(TimeoutError, match="never-printed"):
        server.wait_for_output("never-printed", timeout=0.2)


def test_wait_for_output_notices_an_early_exit(nsbox: Box) -> None:
    process = nsbox.spawn("echo crashed >&2; exit 1")
    with pytest.raises(TimeoutError, match="exited"):
        process.wait_for_output("ready", timeout=30)


def test_output_of_a_chatty_background_process_never_blocks_it(nsbox: Box) -> None:
    process = nsbox.spawn("head -c 5000000 /dev/zero; echo done >&2")
    assert process.wait(timeout=30) == 0
    assert len(process.stdout) == 5_000_000 and process.stderr == "done\n"


def test_run_returns_when_the_command_exits_even_if_a_daemon_keeps_its_output(nsbox: Box) -> None:
    started = time.monotonic()
    result = nsbox.run("sleep 30 & echo launched")
    assert result.stdout == "launched\n"
    assert time.monotonic() - started < 10


def test_init_reaps_orphans(nsbox: Box) -> None:
    nsbox.run("for i in 1 2 3 4 5; do (sleep 0.05 &); done; sleep 0.3", check=True)
    states = nsbox.run("cat /proc/[0-9]*/stat | awk '{print $3}'").stdout.split()
    assert "Z" not in states


def _live_names(box: Box) -> list[str]:
    names = []
    for process in box.processes():
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                names.append(process.name())
        except psutil.NoSuchProcess:
            pass
    return names
