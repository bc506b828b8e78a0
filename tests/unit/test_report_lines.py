"""How the failure report writes a process's command line: as ``ps`` shows a title, quoted as
a shell needs it otherwise."""

from __future__ import annotations

import pytest

from pytest_nsbox.report import command_line


@pytest.mark.parametrize(
    ("cmdline", "shown"),
    [
        (b"sh\0-c\0sleep 300\0", "sh -c 'sleep 300'"),  # an argv: quoted for a shell
        (b"sleep\0" + b"300\0", "sleep 300"),
        (b"postgres: checkpointer " + b"\0" * 500, "postgres: checkpointer"),  # a title, padded
        (b"redis-server *:6379\0\0\0\0", "redis-server *:6379"),
        (b"worker: idle\0", "worker: idle"),  # perl's $0, the kernel's proctitle read: one string
        (b"nginx: worker process", "nginx: worker process"),  # no NUL at all
        (b"a\0b\0\0\0", "a b"),  # argv strings overwritten in place: NULs become spaces, as in ps
        (b"", ""),  # a kernel thread, or a zombie: the caller shows [name]
        (b"\0\0\0", ""),
    ],
)
def test_command_line_shows_what_ps_shows(cmdline: bytes, shown: str) -> None:
    assert command_line(cmdline) == shown
