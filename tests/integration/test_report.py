"""What ``report.describe(box)`` says about a running box: processes as ``ps`` shows them, and
the last lines of its logs (the ``logs=`` option)."""

from __future__ import annotations

import re
import shutil
import time

import pytest

from pytest_nsbox import Box
from pytest_nsbox.report import LOG_TAIL, describe

pytestmark = pytest.mark.requires("boxes")

# A program that rewrites its title in place as postgres does: the title over its argv
# strings, the rest of them NULs (so /proc/PID/cmdline is the title and a run of NULs).
POSTGRES_LIKE = """
import time
with open("/proc/self/stat", "rb") as stat:
    fields = stat.read().rsplit(b")", 1)[1].split()
start, end = int(fields[45]), int(fields[46])
with open("/proc/self/mem", "r+b", buffering=0) as mem:
    mem.seek(start)
    mem.write(b"postgres: checkpointer ".ljust(end - start, b"\\0"))
print("renamed", flush=True)
time.sleep(300)
"""


def _logs_part(box: Box) -> str:
    """The report's lines from its root changes on (the commands above quote the logs' text)."""
    return "root changes" + describe(box).split("\nroot changes", 1)[1]


def _process_lines(text: str) -> list[str]:
    """The commands of the report's process tree (after the pids)."""
    tree = text.split("processes at the failure", 1)[1].split("\ncommands", 1)[0]
    return [match[1] for match in re.finditer(r"^\s+\d+ \[\d+\] (.*)$", tree, flags=re.M)]


def test_a_process_that_rewrote_its_title_shows_as_ps_shows_it(nsbox: Box) -> None:
    nsbox.spawn(["python3", "-c", POSTGRES_LIKE]).wait_for_output("renamed", timeout=30)
    nsbox.spawn(["sh", "-c", "sleep 300"])
    shown = nsbox.run(["ps", "-o", "args=", "-C", "python3"]).stdout
    assert shown.rstrip() == "postgres: checkpointer"  # ps: NULs as spaces, trailing ones dropped

    lines = _process_lines(describe(nsbox))
    assert "postgres: checkpointer" in lines, lines
    assert "sh -c 'sleep 300'" in lines, lines  # a real argv keeps its quoting
    assert not any("''" in line for line in lines), lines


@pytest.mark.skipif(shutil.which("perl") is None, reason="no perl on this host")
def test_a_perl_title_is_not_quoted_as_one_argument(nsbox: Box) -> None:
    nsbox.spawn(["perl", "-e", '$0 = "worker: idle"; print "renamed\\n"; STDOUT->flush; sleep 300'])
    nsbox.wait_for_output("renamed", timeout=30)
    assert "worker: idle" in _process_lines(describe(nsbox))


# ------------------------------------------------------------------------------------ logs


def test_by_default_the_logs_the_box_wrote_under_var_log_are_shown(nsbox: Box) -> None:
    nsbox.run(
        "mkdir -p /var/log/app && for i in $(seq 1 40); do echo request $i; done > /var/log/app/access.log"
    )
    nsbox.run("echo 'error: cannot bind port 8080' > /var/log/app.log", check=True)
    nsbox.run("echo 'not a log' > /srv-notes.txt", check=True)
    text = _logs_part(nsbox)
    assert "log /var/log/app.log:\n  error: cannot bind port 8080\n" in text
    tail = "\n".join(f"  request {i}" for i in range(21, 41))
    assert f"log /var/log/app/access.log (last 20 of 40 lines):\n{tail}" in text
    assert "request 20\n" not in text and "not a log" not in text


@pytest.mark.nsbox(logs=["/srv/app/*.log", "/var/log/nginx/error.log", "/srv/none/*.log"])
def test_logs_names_paths_and_globs_resolved_in_the_box(nsbox: Box) -> None:
    nsbox.run("mkdir -p /srv/app && echo one > /srv/app/a.log && echo two > /srv/app/b.log", check=True)
    nsbox.run(
        "echo 'ignored: not asked for' > /var/log/other.log && echo x > /srv/app/.hidden.log", check=True
    )
    nsbox.run("ln -s /etc/hostname /srv/app/c.log", check=True)  # a symlink is read in the box
    text = _logs_part(nsbox)
    assert "log /srv/app/a.log:\n  one\nlog /srv/app/b.log:\n  two\nlog /srv/app/c.log:\n  box\n" in text
    assert "log /var/log/nginx/error.log: not there\nlog /srv/none/*.log: no file matches" in text
    assert "not asked for" not in text and ".hidden" not in text


@pytest.mark.nsbox(logs=[])
def test_an_empty_logs_list_shows_none(nsbox: Box) -> None:
    nsbox.run("echo 'error: boom' > /var/log/app.log", check=True)
    text = _logs_part(nsbox)
    assert "A /var/log/app.log" in text  # the change is still listed ...
    assert "log /var/log" not in text and "error: boom" not in text  # ... its lines are not


@pytest.mark.nsbox(logs=["/srv/logs/*.log"])
def test_a_huge_or_binary_log_does_not_blow_up_the_report(nsbox: Box) -> None:
    nsbox.run("mkdir /srv/logs", check=True)
    nsbox.run("head -c 200000000 /dev/zero | tr '\\0' 'x' > /srv/logs/huge.log", check=True)
    nsbox.run("printf '\\nlast line\\n' >> /srv/logs/huge.log", check=True)
    nsbox.run("head -c 100000 /dev/urandom > /srv/logs/binary.log; mkfifo /srv/logs/fifo.log", check=True)
    nsbox.run("for i in 1 2 3 4 5 6; do echo $i > /srv/logs/many-$i.log; done", check=True)
    started = time.monotonic()
    text = _logs_part(nsbox)
    assert time.monotonic() - started < 10  # the tail is read, not the 200 MB (a generous bound)
    assert "log /srv/logs/binary.log: 97.7 KiB of binary data, not shown" in text
    assert "log /srv/logs/fifo.log: cannot be read: not a regular file (in the box)" in text
    # Its last 8 KiB, read from the end: the line cut there is left out, the last one shown.
    assert "log /srv/logs/huge.log (last 1 line of 190.7 MiB):\n  last line\nlog " in text
    assert len(text) < LOG_TAIL
    # Five tails at most (binary, fifo, huge, many-1, many-2), then the names of the others.
    assert "logs: 4 more not shown: /srv/logs/many-3.log, /srv/logs/many-4.log," in text


def test_a_stopped_box_reads_no_logs() -> None:
    box = Box(logs=["/var/log/app.log"])
    assert "logs:      not read (the box is not running)" in describe(box)
    assert "log" not in describe(Box()).split("root changes", 1)[1]  # nothing asked for: no line
