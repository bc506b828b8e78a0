"""`nsbox shell` as a person uses it: on a terminal (a pty of the test's), and in a pipe."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.requires("boxes")

# The `nsbox` command in a session of its own with the test's pty as its controlling terminal,
# as a login on a terminal has it (so SIGWINCH reaches it when the window changes).
_ON_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'pytest_nsbox', *sys.argv[1:]])"
)
_TIMEOUT = 60.0  # seconds: generous, for a loaded machine; a working shell answers at once


class Terminal:
    """A pty whose slave is the `nsbox` command's stdin, stdout and stderr; the test types on
    the master and reads the screen from it."""

    def __init__(
        self,
        args: list[str],
        rows: int = 33,
        columns: int = 101,
        term: str | None = None,
        stdout: int | None = None,
    ) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, columns)
        self.cooked = termios.tcgetattr(self.slave)
        env = {key: value for key, value in os.environ.items() if key != "TERM"}
        if term is not None:
            env["TERM"] = term
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ON_TERMINAL, *args],
            stdin=self.slave,
            stdout=self.slave if stdout is None else stdout,
            stderr=self.slave,
            start_new_session=True,
            env=env,
        )
        self.screen = b""

    def resize(self, rows: int, columns: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def _read(self, wait: float) -> bool:
        if not select.select([self.master], [], [], wait)[0]:
            return False
        self.screen += os.read(self.master, 65536)
        return True

    def wait_for(self, pattern: bytes) -> re.Match[bytes]:
        deadline = time.monotonic() + _TIMEOUT
        while (found := re.search(pattern, self.screen)) is None:
            assert time.monotonic() < deadline, (
                f"no {pattern!r} on the screen, ending {self.screen[-2000:]!r}"
            )
            if not self._read(0.5):
                assert self.process.poll() is None, f"nsbox ended early: {self.screen[-2000:]!r}"
        return found

    def finish(self) -> int:
        """The `nsbox` command's exit status, once it has exited (what it printed read)."""
        try:
            status = self.process.wait(_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        while self._read(0.2):
            pass
        return status

    def close(self) -> None:
        if self.process.poll() is None:  # a failed test: Ctrl-C from outside stops its box cleanly
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self.master)
        os.close(self.slave)


def _value(terminal: Terminal, name: str) -> str:
    """What the box printed as NAME=value; the command as echoed reads N""AME, so it never matches."""
    return terminal.wait_for(rb"\b" + name.encode() + rb"=([^\r\n]*)\r\n").group(1).decode()


def _ask(name: str, expression: str) -> str:
    """A command that prints NAME=<expression's value> and cannot be mistaken for its own echo."""
    return f'echo "{name[0]}""{name[1:]}={expression}"\n'


def test_an_interactive_shell_gets_a_terminal_of_its_own_with_job_control() -> None:
    terminal = Terminal(["shell", "--image", "/"], rows=33, columns=101, term="vt220")
    try:
        terminal.wait_for(rb".")  # the shell is up: its first prompt
        terminal.type(
            _ask("TTY", "$(tty)")
            + _ask("TERM", "$TERM")
            + _ask("SIZE", "$(stty size)")
            + _ask("STAT", "$(ps -o stat= -p $$)")
            + _ask("FLAGS", "$-")
            + _ask("NAME", "$0")
        )
        assert re.fullmatch(r"/dev/pts/\d+", _value(terminal, "TTY"))
        assert _value(terminal, "TERM") == "vt220"
        assert _value(terminal, "SIZE") == "33 101"
        assert "s" in _value(terminal, "STAT"), "the shell leads a session of its own"
        assert "m" in _value(terminal, "FLAGS"), "job control (monitor mode) is on"
        login = Path("/etc/passwd").read_text().split("\n")[0].split(":")[6]  # --image /: the host's
        assert _value(terminal, "NAME") == "-" + os.path.basename(login)
        outer = termios.tcgetattr(terminal.slave)
        assert not outer[3] & (termios.ICANON | termios.ECHO | termios.ISIG), "the user's terminal is raw"
        terminal.type("exit 7\n")
        assert terminal.finish() == 7
        assert b"Cannot set tty process group" not in terminal.screen
        assert b"no job control" not in terminal.screen
        assert termios.tcgetattr(terminal.slave) == terminal.cooked, "the user's terminal is restored"
    finally:
        terminal.close()


def test_the_window_size_follows_the_users_terminal() -> None:
    terminal = Terminal(["shell", "--image", "/"], rows=24, columns=80, term=None)
    try:
        terminal.wait_for(rb".")
        terminal.type(_ask("BEFORE", "$(stty size)") + _ask("TERM", "$TERM"))
        assert _value(terminal, "BEFORE") == "24 80"
        assert _value(terminal, "TERM") == "xterm", "with no TERM of the user's, docker's default"
        terminal.resize(40, 120)  # the window changes: SIGWINCH to nsbox, which tells the box's pty
        terminal.type(_ask("AFTER", "$(stty size)") + "exit\n")
        assert _value(terminal, "AFTER") == "40 120"
        assert terminal.finish() == 0
    finally:
        terminal.close()


def test_ctrl_c_goes_to_the_box_and_an_interrupted_nsbox_restores_the_terminal() -> None:
    terminal = Terminal(["shell", "--image", "/"])
    try:
        terminal.wait_for(rb".")
        terminal.type("sleep 4321\n")
        _wait_for_foreground(terminal.process.pid, ["sleep", "4321"])
        terminal.type("\x03")  # Ctrl-C: the box's sleep is interrupted, not nsbox
        terminal.type(_ask("ALIVE", "$?"))
        assert _value(terminal, "ALIVE") == "130"
        assert termios.tcgetattr(terminal.slave) != terminal.cooked
        terminal.process.send_signal(signal.SIGINT)  # from outside: nsbox itself is interrupted
        assert terminal.finish() != 0
        assert termios.tcgetattr(terminal.slave) == terminal.cooked, "the user's terminal is restored"
    finally:
        terminal.close()


def test_a_paste_larger_than_the_ptys_buffers_goes_through() -> None:
    """Input and its echo both exceed what the ptys hold: the relay must not stall writing one
    while the other fills up."""
    lines, width = 200, 999
    terminal = Terminal(["shell", "--image", "/"])
    try:
        terminal.wait_for(rb".")
        terminal.type("tee /tmp/pasted\n")  # each line back on the screen, twice with the echo
        _wait_for_foreground(terminal.process.pid, ["tee", "/tmp/pasted"])
        rest = ("x" * width + "\n") * lines + "\x04" + _ask("PASTED", "$(wc -c < /tmp/pasted)") + "exit\n"
        paste = threading.Thread(target=terminal.type, args=(rest,), daemon=True)
        paste.start()  # while the screen is read here: the echo comes back as it goes in
        assert int(_value(terminal, "PASTED")) == lines * (width + 1)
        assert terminal.finish() == 0
        paste.join(_TIMEOUT)
    finally:
        terminal.close()


def _wait_for_foreground(nsbox_pid: int, cmdline: list[str]) -> None:
    """Until a process under ``nsbox`` runs ``cmdline`` in the foreground of its terminal."""
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline:
        for process in psutil.Process(nsbox_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error, OSError):
                fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
                if process.cmdline() == cmdline and fields[2] == fields[5]:  # pgrp == tpgid
                    return
        time.sleep(0.05)
    pytest.fail(f"{cmdline} never ran in the foreground")


def test_a_command_given_runs_on_a_terminal_too_and_its_status_is_returned() -> None:
    terminal = Terminal(["shell", "--image", "/", "--", "sh", "-c", 'echo "TTY=$(tty)"; exit 5'])
    try:
        assert re.fullmatch(r"/dev/pts/\d+", _value(terminal, "TTY"))
        assert terminal.finish() == 5
    finally:
        terminal.close()


def test_output_sent_elsewhere_gets_no_terminal_and_is_copied_as_it_is() -> None:
    """`nsbox shell BOX -- cat log > copy` typed at a terminal: a pty would turn LF into CRLF."""
    read_end, write_end = os.pipe()
    terminal = Terminal(
        ["shell", "--image", "/", "--", "sh", "-c", "tty; printf 'a\\nb\\n'"], stdout=write_end
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            copied = pipe.read()
        assert terminal.finish() == 0
        assert copied == b"not a tty\na\nb\n"
    finally:
        terminal.close()


def test_a_shell_fed_by_a_pipe_reads_it_as_before() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", "shell", "--image", "/"],
        input="hostname\ntty\nexit 3\n",
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines()[-2:] == ["shell", "not a tty"]


def test_no_signal_is_ignored_in_the_shell_as_in_the_boxs_own_commands() -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and an ignored signal survives exec: `yes | head`
    in the shell would end in "Broken pipe" errors."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", "shell", "--image", "/"],
        input="grep SigIgn /proc/self/status\nyes | head -n 1\n",
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SigIgn:", "0" * 16, "y"]
    assert "Broken pipe" not in result.stderr


def _image_with_login_shell(root: Path, passwd: str) -> Path:
    """A root directory with dash as /bin/sh and as /bin/boxsh, and this /etc/passwd."""
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("the host has no dash to copy into a test image")
    libraries = re.findall(r"(/\S+)", subprocess.run(["ldd", dash], capture_output=True, text=True).stdout)
    for host_path, image_path in [(dash, "bin/sh"), (dash, "bin/boxsh")] + [
        (lib, lib[1:]) for lib in libraries
    ]:
        target = root / image_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(host_path), target)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(passwd)
    return root


@pytest.mark.parametrize(
    ("passwd", "expected"),
    [
        ("daemon:x:1:1::/:/bin/false\nroot:x:0:0:root:/home/boss:/bin/boxsh\n", "-boxsh /home/boss"),
        ("root:x:0:0:root:/root:/bin/zsh\n", "-sh /root"),  # not in the image
        ("root:x:0:0:root:/root:/etc/passwd\n", "-sh /root"),  # not a program
    ],
    ids=["its-own", "missing", "not-executable"],
)
def test_the_login_shell_is_roots_in_the_boxs_passwd(tmp_path: Path, passwd: str, expected: str) -> None:
    image = _image_with_login_shell(tmp_path / "root", passwd)
    result = subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", "shell", "--image", str(image)],
        input='echo "$0 $HOME"\n',
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
