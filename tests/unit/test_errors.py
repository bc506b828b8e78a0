"""The exception tree: one base, and the standard exception each error also stands for."""

from __future__ import annotations

import errno
import pickle
import subprocess

import pytest

import pytest_nsbox
from pytest_nsbox import errors
from pytest_nsbox.errors import (
    BoxError,
    CommandNotFoundError,
    ConfigError,
    MountError,
    NsboxError,
    SyscallError,
)
from pytest_nsbox.process import CommandFailedError, CommandTimeoutError


@pytest.mark.parametrize("name", [*errors.__all__, "CommandFailedError", "CommandTimeoutError"])
def test_every_error_is_an_nsbox_error(name: str) -> None:
    cls = getattr(pytest_nsbox, name)
    assert issubclass(cls, NsboxError)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize(
    ("cls", "standard"),
    [
        (ConfigError, ValueError),
        (SyscallError, OSError),
        (MountError, SyscallError),
        (CommandNotFoundError, FileNotFoundError),
        (CommandNotFoundError, BoxError),
        (CommandFailedError, subprocess.CalledProcessError),
        (CommandFailedError, BoxError),
        (CommandTimeoutError, subprocess.TimeoutExpired),
        (CommandTimeoutError, BoxError),
    ],
)
def test_errors_also_derive_from_the_standard_exception(cls: type, standard: type) -> None:
    assert issubclass(cls, standard)


def test_nsbox_error_is_not_caught_as_unrelated_standard_errors() -> None:
    assert not issubclass(NsboxError, (OSError, ValueError))
    assert not issubclass(BoxError, OSError)


# -------------------------------------------------------------------------- SyscallError


def test_syscall_error_carries_errno_and_names_it() -> None:
    err = SyscallError(errno.ENOENT, "openat2", "'etc/x'")
    assert err.errno == errno.ENOENT
    assert err.operation == "openat2"
    assert str(err) == "openat2 failed: ENOENT (No such file or directory): 'etc/x'"


def test_syscall_error_adds_hint_after_detail() -> None:
    err = SyscallError(errno.EPERM, "mount", "target='/x'", "run as root")
    assert str(err) == "mount failed: EPERM (Operation not permitted): target='/x'; run as root"


def test_syscall_error_is_caught_as_oserror_with_errno() -> None:
    with pytest.raises(OSError) as info:
        raise SyscallError(errno.EBUSY, "umount2")
    assert info.value.errno == errno.EBUSY
    assert "EBUSY" in str(info.value)


def test_syscall_error_with_an_unknown_errno_shows_the_number() -> None:
    assert str(SyscallError(4242, "frob")).startswith("frob failed: 4242 (")


def test_mount_error_is_a_syscall_error_with_the_same_message_format() -> None:
    err = MountError(errno.EINVAL, "pivot_root", "new_root='.'")
    assert isinstance(err, SyscallError)
    assert err.errno == errno.EINVAL
    assert str(err).startswith("pivot_root failed: EINVAL")


def test_syscall_error_survives_pickling() -> None:
    err = SyscallError(errno.ENOENT, "openat2", "'x'")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err)
    assert copy.errno == errno.ENOENT


# -------------------------------------------------------------------- CommandFailedError


def test_command_failed_error_is_a_called_process_error_with_its_fields() -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        raise CommandFailedError(3, ["false"], "out", "err", box_id="b1")
    err = info.value
    assert isinstance(err, CommandFailedError)
    assert (err.returncode, err.cmd, err.stdout, err.stderr, err.box_id) == (3, ["false"], "out", "err", "b1")


def test_command_failed_error_str_has_box_id_status_and_stderr_tail() -> None:
    text = str(CommandFailedError(2, "make", "", "error: missing target\n", box_id="deadbeef"))
    assert text.startswith("box deadbeef: Command 'make' returned non-zero exit status 2.")
    assert text.endswith("--- last output ---\nerror: missing target\n")


def test_command_failed_error_keeps_only_the_tail_of_long_output() -> None:
    stderr = "HEAD" + "x" * 5000 + "TAIL"
    text = str(CommandFailedError(1, "cmd", None, stderr, box_id="b"))
    assert "TAIL" in text
    assert "HEAD" not in text
    assert len(text) < 2200


def test_command_failed_error_falls_back_to_stdout_and_decodes_bytes() -> None:
    text = str(CommandFailedError(1, "cmd", b"caf\xc3\xa9 \xff", b"", box_id="b"))
    assert text.endswith("--- last output ---\ncafé \ufffd")


def test_command_failed_error_without_output_has_no_output_section() -> None:
    text = str(CommandFailedError(1, "cmd", box_id="b"))
    assert "last output" not in text
    assert text == "box b: Command 'cmd' returned non-zero exit status 1."


def test_command_failed_error_by_signal_says_so() -> None:
    assert "died with <Signals.SIGKILL: 9>" in str(CommandFailedError(-9, "sleep 9", box_id="b"))


# ------------------------------------------------------------------- CommandTimeoutError


def test_command_timeout_error_is_a_timeout_expired_with_its_fields() -> None:
    with pytest.raises(subprocess.TimeoutExpired) as info:
        raise CommandTimeoutError("sleep 10", 0.5, "partial", None, box_id="b2")
    err = info.value
    assert (err.cmd, err.timeout, err.output, err.box_id) == ("sleep 10", 0.5, "partial", "b2")


def test_command_timeout_error_str_names_box_command_timeout_and_output() -> None:
    text = str(CommandTimeoutError("sleep 10", 0.5, "started\n", None, box_id="b2"))
    assert text.startswith("box b2: command 'sleep 10' timed out after 0.5 seconds")
    assert "process group was killed" in text
    assert text.endswith("--- output so far ---\nstarted\n")


# ------------------------------------------------------------------ CommandNotFoundError


def test_command_not_found_error_is_enoent_and_names_program_box_and_path() -> None:
    err = CommandNotFoundError("frob", "b3", "not found", "/usr/bin:/bin")
    assert isinstance(err, FileNotFoundError)
    assert err.errno == errno.ENOENT
    assert (err.program, err.box_id) == ("frob", "b3")
    assert str(err).startswith("box b3: cannot run 'frob': not found on PATH=/usr/bin:/bin; ")


def test_command_not_found_error_omits_path_for_a_program_given_by_path() -> None:
    text = str(CommandNotFoundError("/opt/frob", "b3", "not found", "/usr/bin"))
    assert text.startswith("box b3: cannot run '/opt/frob': not found; ")
    assert "PATH=" not in text


def test_permission_hint_never_tells_root_to_run_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors.os, "geteuid", lambda: 0)
    hint = errors.permission_hint("mounting")
    assert "as root" not in hint and "container" in hint and "delegated cgroup" in hint
    monkeypatch.setattr(errors.os, "geteuid", lambda: 1000)
    assert errors.permission_hint("mounting") == "mounting needs root: run pytest as root (sudo -E)"
