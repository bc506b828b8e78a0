"""Commands running in a box, seen from the host: ``BoxProcess`` and ``RunResult``.

Output goes to memfds rather than pipes. Why: a pipe fills at 64 KiB and then blocks a
chatty server nobody is reading; and ``run()`` would have to wait for EOF, which never comes
while a background child (``daemon &``) holds the pipe. A memfd never blocks the writer, and
``run()`` returns when the command itself exits, as a test expects.
"""

from __future__ import annotations

import os
import re
import signal as _signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import psutil

from . import waits
from .errors import BoxError, NsboxError, ProcessExitedError, output_tail
from .link import InitLink
from .spec import output_stream, regular_expression, timeout_seconds


class RunResult(subprocess.CompletedProcess[Any]):
    """A finished command: ``subprocess.CompletedProcess`` plus what a box knows about it.

    ``duration`` is seconds from start to exit (the exit as the box's init saw it, not when
    the host noticed); ``signal`` is the signal that ended it (or None), ``oom_killed`` is True
    when the memory cap's OOM killer ended it.
    """

    def __init__(
        self,
        args: Any,
        returncode: int,
        stdout: Any = None,
        stderr: Any = None,
        *,
        duration: float = 0.0,
        signal: int | None = None,
        oom_killed: bool = False,
    ) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.duration = duration
        self.signal = signal
        self.oom_killed = oom_killed

    def __repr__(self) -> str:
        extra = f", signal={self.signal}" if self.signal else ""
        return (
            f"RunResult(args={self.args!r}, returncode={self.returncode}{extra}, "
            f"duration={self.duration:.3f}, stdout={self.stdout!r}, stderr={self.stderr!r})"
        )


class CommandFailedError(BoxError, subprocess.CalledProcessError):
    """``run(check=True)`` saw a non-zero exit; it is a ``subprocess.CalledProcessError``."""

    def __init__(
        self,
        returncode: int,
        cmd: Any,
        output: Any = None,
        stderr: Any = None,
        *,
        box_id: str = "?",
    ) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output, stderr)
        self.box_id = box_id

    def __str__(self) -> str:
        text = f"box {self.box_id}: " + subprocess.CalledProcessError.__str__(self)
        tail = output_tail(self.stderr) or output_tail(self.output)
        if tail:
            text += f"\n--- last output ---\n{tail}"
        return text


class CommandTimeoutError(BoxError, subprocess.TimeoutExpired):
    """``run(timeout=...)`` ran out and its process group was killed, or ``BoxProcess.wait
    (timeout)`` ran out while the process goes on (``killed`` False). Carries the output so far.
    """

    def __init__(
        self,
        cmd: Any,
        timeout: float,
        output: Any = None,
        stderr: Any = None,
        *,
        box_id: str = "?",
        killed: bool = True,
    ) -> None:
        subprocess.TimeoutExpired.__init__(self, cmd, timeout, output, stderr)
        self.box_id = box_id
        self.killed = killed

    def __str__(self) -> str:
        outcome = "its process group was killed" if self.killed else "it is still running"
        text = f"box {self.box_id}: command {self.cmd!r} timed out after {self.timeout} seconds; {outcome}"
        tail = output_tail(self.stderr) or output_tail(self.output)
        if tail:
            text += f"\n--- output so far ---\n{tail}"
        return text


class BoxProcess:
    """A command started in a box with ``Box.spawn()`` (``run()`` uses one too).

    ``pid`` is its pid inside the box; ``host_pid`` the same process as the host sees it.
    ``stdout``/``stderr`` hold its output so far (the whole output once it has exited).
    ``started`` and ``ended`` are ``time.monotonic()`` values: from just before it was asked
    for to its exit as the box's init reaped it. ``oom_killed`` says, once it has exited,
    whether the OOM killer ended it.
    """

    def __init__(
        self,
        link: InitLink,
        args: Any,
        pid: int,
        stdout_fd: int,
        stderr_fd: int,
        text: bool,
        *,
        init_pid: int,
        released: Callable[[BoxProcess], None] | None = None,
        started: float | None = None,
        oom_kills: Callable[[], int] | None = None,
        oom_kills_at_start: int = 0,
    ) -> None:
        # Why a link and callbacks rather than the Box: a process needs only its init (to
        # wait, signal and be forgotten), to tell its box it is done, and its cgroup's OOM
        # kill count; the box module stays the only one that knows the others.
        self._link = link
        self._init_pid = init_pid
        self._released = released
        self._oom_kills = oom_kills
        self._oom_kills_at_start = oom_kills_at_start
        self.box_id = link.box_id
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self.started = time.monotonic() if started is None else started
        self.ended: float | None = None
        self.oom_killed = False
        self._sigkilled = False
        self._text = text
        self._fds: tuple[int, int] | None = (stdout_fd, stderr_fd)
        self._output: tuple[bytes, bytes] = (b"", b"")
        self._host_pid: int | None = None
        self.stop_signal = int(_signal.SIGTERM)  # what terminate() and stop() send first

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"returncode={self.returncode}"
        return f"<BoxProcess pid={self.pid} box={self.box_id} {state} args={self.args!r}>"

    # ------------------------------------------------------------------- state and waiting

    def poll(self) -> int | None:
        """The return code if it has exited, else None (never blocks)."""
        link = self._link
        if self.returncode is None:
            link.drain()
            status = link.exit_status(self.pid)
            if status is not None or link.gone:
                self._finish(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; ``CommandTimeoutError`` (a ``subprocess.TimeoutExpired``) if it is still
        running after ``timeout``, which leaves it running, as ``Popen.wait`` does."""
        if self.returncode is None:
            link = self._link
            if link.gone:
                self._finish(None)
            else:
                deadline = None if timeout is None else time.monotonic() + timeout
                status = link.wait_exit(self.pid, deadline)
                if status is None and not link.gone:
                    raise CommandTimeoutError(
                        self.args,
                        timeout or 0.0,
                        self._read(0),
                        self._read(1),
                        box_id=self.box_id,
                        killed=False,
                    )
                self._finish(status)
        assert self.returncode is not None
        return self.returncode

    def kill(self, sig: int = _signal.SIGKILL, *, group: bool = False) -> bool:
        """Send ``sig`` (default SIGKILL) to it, or to its whole process group; False if gone."""
        if self.returncode is not None or self._link.gone:
            return False
        reply = self._link.request({"op": "kill", "pid": self.pid, "sig": int(sig), "group": group})
        sent = bool(reply.get("ok"))
        if sent and sig == _signal.SIGKILL:
            self._sigkilled = True  # its SIGKILL death is ours, whatever the OOM killer did
        return sent

    def terminate(self) -> bool:
        """SIGTERM, as ``subprocess.Popen.terminate`` (the image's StopSignal for a service)."""
        return self.kill(self.stop_signal)

    def stop(self, timeout: float = 10.0) -> int:
        """As ``docker stop``: the stop signal (SIGTERM, or the image's StopSignal for a
        service), then SIGKILL to its process group if it is still running after ``timeout``
        seconds; returns its exit status (negative: the signal that ended it)."""
        if self.returncode is None:
            self.kill(self.stop_signal)
            try:
                return self.wait(timeout)
            except CommandTimeoutError:
                self.kill(_signal.SIGKILL, group=True)
        return self.wait()

    send_signal = kill

    @property
    def host_pid(self) -> int | None:
        """Its pid in the host's pid namespace (None once it has exited)."""
        if self._host_pid is None and self.returncode is None:
            self._host_pid = host_pid_of(self._init_pid, self.pid)
        return self._host_pid

    # ------------------------------------------------------------------------------ output

    @property
    def stdout(self) -> Any:
        return self._decode(self._read(0))

    @property
    def stderr(self) -> Any:
        return self._decode(self._read(1))

    def wait_for_output(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, stream: str = "both"
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in its output; returns the match.

        Raises ``WaitTimeoutError`` (a ``TimeoutError``) naming the pattern and showing the
        output so far, or ``ProcessExitedError`` (one too) as soon as the process exits without
        printing it.
        """
        seconds = timeout_seconds(timeout, "wait_for_output(): timeout", optional=False) or 0.0
        regex = regular_expression(pattern, "wait_for_output(): pattern", "the output")
        stream = output_stream(stream, "wait_for_output(): stream")

        def timed_out() -> str:
            return (
                f"box {self.box_id}: {regex.pattern!r} did not appear in the output of "
                f"{self.args!r} within {timeout}s; output so far:\n{self._searchable(stream)[-2000:]}"
            )

        return waits.until(
            lambda: regex.search(self._searchable(stream)),
            seconds,
            watched=self,
            waiting_for=f"{regex.pattern!r} in its output",
            timed_out=timed_out,
        )

    def exited_within(self, seconds: float) -> bool:
        """Whether it has exited within ``seconds``; returns as soon as it does (for waits,
        which sleep on it between their checks)."""
        if self.poll() is None and seconds > 0:
            self._link.wait_exit(self.pid, time.monotonic() + seconds)
        return self.poll() is not None

    def exited_error(self, waiting_for: str) -> ProcessExitedError:
        """The error of a wait for ``waiting_for`` that this process's exit ended: its exit
        status and the tail of its output."""
        output = self._output_tail()
        text = (
            f"box {self.box_id}: gave up waiting for {waiting_for}: the process it watches, "
            f"{self.args!r} (pid {self.pid} in the box), {self.outcome()} after "
            f"{(self.ended or time.monotonic()) - self.started:.2f} s"
        )
        text += f"; its output:\n{output}" if output else " without any output"
        return ProcessExitedError(text, returncode=self.returncode, output=output)

    def outcome(self) -> str:
        """How it ended, in words: "exited with status 3", "was killed by SIGTERM", "was
        OOM-killed" (or "is still running")."""
        code = self.returncode
        if code is None:
            return "is still running"
        if self.oom_killed:
            return "was OOM-killed"
        if code < 0:
            return f"was killed by {_signal_name(-code)}"
        return f"exited with status {code}"

    def result(self) -> RunResult:
        """The finished command as a ``RunResult`` (waits for it)."""
        self.wait()
        assert self.returncode is not None and self.ended is not None
        return RunResult(
            self.args,
            self.returncode,
            self.stdout,
            self.stderr,
            duration=max(self.ended - self.started, 0.0),
            signal=-self.returncode if self.returncode < 0 else None,
            oom_killed=self.oom_killed,
        )

    # --------------------------------------------------------------------------- internals

    def _searchable(self, stream: str) -> str:
        parts = {"stdout": (0,), "stderr": (1,), "both": (0, 1)}[stream]
        return "".join(self._read(i).decode("utf-8", "replace") for i in parts)

    def _output_tail(self) -> str:
        """The end of its stdout and of its stderr, each under its name when both have some."""
        tails = {name: output_tail(self._read(index)) for index, name in ((0, "stdout"), (1, "stderr"))}
        shown = {name: tail for name, tail in tails.items() if tail}
        if len(shown) < 2:
            return "".join(shown.values())
        return "".join(f"--- {name} ---\n{tail.rstrip()}\n" for name, tail in shown.items())

    def _read(self, index: int) -> bytes:
        if self._fds is None:
            return self._output[index]
        fd = self._fds[index]
        size = os.fstat(fd).st_size
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def _decode(self, data: bytes) -> Any:
        return data.decode("utf-8", "replace") if self._text else data

    def _finish(self, status: int | None) -> None:
        """Record the exit (None: the box died under it, which counts as SIGKILL)."""
        if self.returncode is not None:
            return
        ended = self._link.exit_time(self.pid) if status is not None else None
        self.ended = ended if ended is not None else time.monotonic()
        self.returncode = -_signal.SIGKILL if status is None else os.waitstatus_to_exitcode(status)
        self.oom_killed = status is not None and self._was_oom_killed()
        self._link.forget(self.pid)
        self.release()

    def _was_oom_killed(self) -> bool:
        """Killed by SIGKILL (or a shell reporting it as 137) while the cgroup's OOM kill count
        rose since it started: the OOM killer's work, as far as anyone can tell from outside
        (the kernel does not say whom it killed).

        Not for a process the box's death took (``status`` None: ``stop()``'s kill), nor one
        this side sent SIGKILL (``kill()``, ``run(timeout=...)``).
        """
        if self.returncode not in (-_signal.SIGKILL, 128 + _signal.SIGKILL) or self._oom_kills is None:
            return False
        if self._sigkilled:
            return False
        try:
            return self._oom_kills() > self._oom_kills_at_start
        except (NsboxError, OSError):
            return False  # the count cannot be read (the cgroup is gone): nothing to claim

    def release(self) -> None:
        """Keep the output in memory and close the memfds (called at exit and at box stop)."""
        if self._fds is not None:
            self._output = (self._read(0), self._read(1))
            for fd in self._fds:
                os.close(fd)
            self._fds = None
        if self._released is not None:
            self._released(self)


def _signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def box_pid_of(host_pid: int) -> int | None:
    """The pid a host process has inside its box: the last field of its ``NSpid`` line."""
    try:
        with open(f"/proc/{host_pid}/status") as handle:
            for line in handle:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def host_pid_of(init_pid: int, box_pid: int) -> int | None:
    """The host pid of the box process ``box_pid``, found among the descendants of the box's
    init (``init_pid``, a host pid): the one whose last ``NSpid`` is ``box_pid``."""
    try:
        processes = [psutil.Process(init_pid), *psutil.Process(init_pid).children(recursive=True)]
    except psutil.Error:
        return None
    for process in processes:
        if box_pid_of(process.pid) == box_pid:
            return process.pid
    return None
