"""What a failed test's report says about each of its boxes (the ``nsbox box ID`` sections).

``describe(box)`` is called while the box still runs (pytest makes the call phase's report
before fixture teardown stops the boxes), so it can show the processes alive at the failure.
It never raises: each part that cannot be read becomes one line saying why. No pytest here;
``plugin.py`` puts the text into the report.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .boxfs import BoxFiles
from .process import BoxProcess, box_pid_of

if TYPE_CHECKING:
    import psutil

    from .box import Box

COMMANDS = 5  # the last commands shown
OUTPUT_LINES = 3  # the last lines of each command's stdout and stderr
OUTPUT_TAIL = 8192  # bytes read from the end of an output, however long it is
LINE_WIDTH = 160
PROCESSES = 30
CMDLINE_READ = 65536  # bytes of a process's command line read, however long it is
PATHS = 10  # of each kind: added, modified, deleted
LOG_FILES = 5  # logs whose tails are shown
LOG_LINES = 20  # the last lines of each
LOG_TAIL = 8192  # bytes read from the end of a log, however long it is
LOG_DIRECTORY = "/var/log"  # where the box's logs are looked for by default (logs=None)


def describe(box: Box) -> str:
    """A few dozen lines on ``box``: identity, limits and use, processes, commands, changes,
    and the last lines of its logs."""
    lines: list[str] = []
    parts: list[tuple[str, Callable[[Box], Iterator[str]]]] = [
        ("box", _identity),
        ("limits", _limits),
        ("cgroup", _cgroup),
        ("processes", _processes),
        ("commands", _commands),
        ("root changes", _changes),
        ("logs", _logs),
    ]
    for name, part in parts:
        produced: list[str] = []
        try:
            for line in part(box):
                produced.append(line)
        except Exception as exc:  # whatever is wrong with the box, the report goes on
            produced.append(f"{name}: could not be read: {type(exc).__name__}: {_clip(str(exc))}")
        lines.extend(produced)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- parts


def _identity(box: Box) -> Iterator[str]:
    state = f"running, init is host pid {box.pid}" if box.running else "not running"
    yield f"box:       {box.id} ({state})"
    image = box.image
    layers = len(image.lowers)
    yield f"image:     {image.reference}" + ("" if image.reference == "host /" else f" ({layers} layers)")
    yield f"hostname:  {box.hostname}"
    if box.ip is not None:
        yield f"ip:        {box.ip}"
    else:
        yield "ip:        none (loopback only)"


def _limits(box: Box) -> Iterator[str]:
    limits = dict(box.spec.limits)
    if not limits:
        yield "limits:    none"
        return
    shown = []
    for name, value in limits.items():
        if value is None:
            shown.append(f"{name}=none")
        elif name in ("memory", "memory_swap") and isinstance(value, int) and value > 0:
            shown.append(f"{name}={_size(value)}")
        else:
            shown.append(f"{name}={value}")
    yield f"limits:    {', '.join(shown)}"


def _cgroup(box: Box) -> Iterator[str]:
    if not box.running:
        yield "cgroup:    not read (the box is not running)"
        return
    if getattr(box.cgroup, "driver", None) is None:
        yield "cgroup:    none (this host has no usable cgroups)"
        return
    stats = box.cgroup.stats()
    memory = f"memory {_size(stats.memory_current)} now"
    if stats.memory_peak:
        memory += f", {_size(stats.memory_peak)} peak"
    yield (
        f"cgroup:    oom kills {stats.oom_kills}, pids {stats.pids_current} now, {stats.pids_peak} peak, "
        f"{memory}, cpu {stats.cpu_usec / 1e6:.2f} s"
        + (f" (throttled {stats.throttled_usec / 1e6:.2f} s)" if stats.throttled_usec else "")
    )


def _processes(box: Box) -> Iterator[str]:
    if not box.running:
        yield "processes: none (the box is not running)"
        return
    processes = box.processes()
    if not processes:
        yield "processes: none (the box's init is gone)"
        return
    children: dict[int, list[psutil.Process]] = {}
    for process in processes[1:]:
        try:
            children.setdefault(process.ppid(), []).append(process)
        except Exception:
            continue  # exited meanwhile
    yield "processes at the failure (pid in the box, [host pid], command):"
    shown = 0
    stack: list[tuple[psutil.Process, int]] = [(processes[0], 1)]
    while stack:
        process, depth = stack.pop()
        if shown == PROCESSES:
            yield f"  ... and more ({len(processes)} in all)"
            break
        yield "  " * depth + (_process_line(process) if shown else f"1 [{process.pid}] nsbox-init")
        shown += 1
        below = sorted(children.get(process.pid, []), key=lambda p: p.pid, reverse=True)
        stack.extend((child, depth + 1) for child in below)


def _process_line(process: psutil.Process) -> str:
    try:
        with process.oneshot():
            name = process.name()
            status = process.status()
        with open(f"/proc/{process.pid}/cmdline", "rb") as handle:
            cmdline = handle.read(CMDLINE_READ)
    except Exception as exc:
        return f"? [{process.pid}] ({type(exc).__name__}: gone or unreadable)"
    command = command_line(cmdline) or f"[{name}]"
    note = "" if status in ("running", "sleeping", "idle", "disk-sleep") else f" ({status})"
    return _clip(f"{_box_pid(process.pid)} [{process.pid}] {command}{note}")


def command_line(cmdline: bytes) -> str:
    """A process's ``/proc/PID/cmdline`` as the report shows it: its argv quoted as a shell
    would need it (``sh -c 'sleep 300'``), or, for a process that rewrote its title in place
    (postgres, redis, perl's ``$0``), that title as ``ps`` shows it.

    Why not psutil's ``cmdline()``: it splits a title padded with NULs into the title and
    hundreds of empty arguments (``'postgres: checkpointer ' '' '' ...``). A title is one
    string, or one followed by NULs: ``ps`` turns the NULs into spaces and drops trailing ones.
    """
    text = os.fsdecode(cmdline)
    body = text.rstrip("\0")
    if not body:
        return ""
    argv = body.split("\0")
    if len(argv) == 1 or len(text) - len(body) > 1:  # one string, or a title padded with NULs
        return body.replace("\0", " ").rstrip()
    return shlex.join(argv)


def _box_pid(host_pid: int) -> str:
    """The pid the box itself sees, or ``?``."""
    pid = box_pid_of(host_pid)
    return "?" if pid is None else str(pid)


def _commands(box: Box) -> Iterator[str]:
    history: Sequence[BoxProcess] = list(box.history)
    if not history:
        yield "commands:  none run"
        return
    last = history[-COMMANDS:]
    if len(history) > len(last):  # a box keeps its last 20
        yield f"last {len(last)} commands of {len(history)}{'+' if len(history) >= 20 else ''}, oldest first:"
    else:
        yield "commands, oldest first:"
    for process in last:
        try:
            yield from _command(process)
        except Exception as exc:
            yield f"  ? could not be read: {type(exc).__name__}: {_clip(str(exc))}"


def _command(process: BoxProcess) -> Iterator[str]:
    yield _clip(f"  $ {_args(process.args)}")
    process.poll()  # a spawned command that has exited since: its status, not "running"
    code = process.returncode
    if code is None:
        outcome = f"still running (pid {process.pid} in the box)"
    elif process.oom_killed:  # not "killed by SIGKILL": who killed it is the news
        outcome = "OOM-killed" if code < 0 else f"exit {code} (OOM-killed)"
    elif code < 0:
        outcome = f"killed by {_signal_name(-code)}"
    else:
        outcome = f"exit {code}"
    if process.ended is not None:
        outcome += f" after {process.ended - process.started:.2f} s"
    yield f"    -> {outcome}"
    empty = True
    for index, stream in ((0, "stdout"), (1, "stderr")):
        data, size = _tail(process, index)
        if not size:
            continue
        empty = False
        text = data.decode("utf-8", "replace").rstrip("\n")
        lines = text.split("\n")
        if len(data) < size:
            lines = lines[1:]  # the first one is cut
        shown = lines[-OUTPUT_LINES:]
        if len(data) < size:
            yield f"    {stream} (last {len(shown)} lines of {_size(size)}):"
        elif len(shown) < len(lines):
            yield f"    {stream} (last {len(shown)} of {len(lines)} lines):"
        else:
            yield f"    {stream}:"
        for line in shown:
            yield "      " + _clip(line)
    if empty:
        yield "    (no output" + (" yet)" if code is None else ")")


def _tail(process: BoxProcess, index: int) -> tuple[bytes, int]:
    """The last ``OUTPUT_TAIL`` bytes of stdout (0) or stderr (1), and the whole size.

    A command still running (or not yet waited for) keeps its output in a memfd: read its end
    only, however much a chatty server wrote. Otherwise the output is in memory already.
    """
    fds = getattr(process, "_fds", None)
    if fds is not None:
        try:
            fd = fds[index]
            size = os.fstat(fd).st_size
            start = max(0, size - OUTPUT_TAIL)
            return os.pread(fd, size - start, start), size
        except (OSError, TypeError, IndexError):
            pass  # closed meanwhile: ask the process itself
    output = process.stdout if index == 0 else process.stderr
    raw = output if isinstance(output, bytes) else str(output or "").encode("utf-8", "replace")
    return raw[-OUTPUT_TAIL:], len(raw)


def _changes(box: Box) -> Iterator[str]:
    if not box.running or box.root is None:
        yield "root changes: not read (the box is not running)"
        return
    root = box.root
    changes = root.diff(collapse=True)  # a tree added or deleted whole: one line
    kinds = [("added", "A", changes.added), ("modified", "M", changes.modified)]
    kinds.append(("deleted", "D", changes.deleted))
    lines: list[str] = []
    directories = False
    with _box_files(box) as files:
        for kind, letter, paths in kinds:
            for path in paths[:PATHS]:
                if letter == "A":
                    whole = _is_directory(files.lstat, path)
                else:
                    whole = letter == "D" and _is_directory(root.stat_below, path)
                directories = directories or whole
                lines.append(_clip(f"  {letter} {path}{'/' if whole else ''}"))
            if len(paths) > PATHS:
                lines.append(f"  ... and {len(paths) - PATHS} more {kind}")
    counts = ", ".join(f"{len(paths)} {kind}" for kind, _, paths in kinds)
    note = " (a directory added or deleted whole is one line, ending in /)" if directories else ""
    yield f"root changes: {counts}{note}"
    yield from lines


def _is_directory(lstat: Callable[[str], os.stat_result | None], path: str) -> bool:
    try:
        info = lstat(path)
    except OSError:
        return False
    return info is not None and stat.S_ISDIR(info.st_mode)


def _logs(box: Box) -> Iterator[str]:
    """The last lines of the box's logs: those of ``logs=`` (paths and globs), or by default
    the files it wrote (added or modified) under /var/log. Read inside the box, from their
    end: a log of gigabytes costs what its last 8 KiB do."""
    patterns = box.spec.logs
    if patterns == ():
        return  # logs=[]: none asked for
    if not box.running or box.root is None:
        if patterns:
            yield "logs:      not read (the box is not running)"
        return
    with _box_files(box) as files:
        # In the order asked for: a log's tail, or why a path or glob has none.
        entries: list[tuple[str, str]] = []
        if patterns is None:
            entries = [("file", path) for path in _written_logs(box, files)]
        for pattern in patterns or ():
            matched = files.glob(pattern)
            if not matched:
                magic = any(char in pattern for char in "*?[")
                entries.append(("none", f"log {pattern}: " + ("no file matches" if magic else "not there")))
            entries.extend(("file", path) for path in matched if ("file", path) not in entries)
        shown = 0
        for kind, text in entries:
            if kind == "none":
                yield _clip(text)
            elif shown < LOG_FILES:
                shown += 1
                yield from _log_tail(files, text)
        rest = [text for kind, text in entries if kind == "file"][LOG_FILES:]
        if rest:
            yield _clip(f"logs: {len(rest)} more not shown: {', '.join(rest)}")


def _written_logs(box: Box, files: BoxFiles) -> list[str]:
    """The regular files the box added or modified under /var/log, sorted."""
    assert box.root is not None
    changes = box.root.diff(collapse=True)
    below = LOG_DIRECTORY + "/"
    found: list[str] = []
    pending = [p for p in changes.added + changes.modified if p == LOG_DIRECTORY or p.startswith(below)]
    while pending and len(found) < 100:
        path = pending.pop()
        try:
            mode = files.lstat(path).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode):
            found.append(path)
        elif stat.S_ISDIR(mode):  # added whole: everything in it is the box's
            try:
                pending.extend(os.path.join(path, name) for name in files.listdir(path))
            except OSError:
                continue
    return sorted(found)


def _log_tail(files: BoxFiles, path: str) -> Iterator[str]:
    try:
        data, size = files.read_tail(path, LOG_TAIL)
    except IsADirectoryError:
        yield _clip(f"log {path}: a directory; name its files ({path}/*.log)")
        return
    except OSError as exc:
        yield _clip(f"log {path}: cannot be read: {exc.strerror or exc}")
        return
    if not size:
        yield _clip(f"log {path}: empty")
        return
    if b"\0" in data:
        yield _clip(f"log {path}: {_size(size)} of binary data, not shown")
        return
    cut = len(data) < size
    lines = data.decode("utf-8", "replace").rstrip("\n").split("\n")
    if cut and len(lines) > 1:
        lines = lines[1:]  # the first one is cut
    shown = lines[-LOG_LINES:]
    if cut:
        yield _clip(f"log {path} (last {len(shown)} line{'s' if len(shown) > 1 else ''} of {_size(size)}):")
    elif len(shown) < len(lines):
        yield _clip(f"log {path} (last {len(shown)} of {len(lines)} lines):")
    else:
        yield _clip(f"log {path}:")
    for line in shown:
        yield "  " + _clip(line)


@contextlib.contextmanager
def _box_files(box: Box) -> Iterator[BoxFiles]:
    """The box's file helpers, on a root descriptor of the report's own: paths resolve inside
    the box (``RESOLVE_IN_ROOT``), never on the host."""
    fd = os.open(f"/proc/{box.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield BoxFiles(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------- helpers


def _args(args: Any) -> str:
    if isinstance(args, bytes):
        return args.decode("utf-8", "replace")
    if isinstance(args, str):
        return args
    try:
        return shlex.join(os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in args)
    except TypeError:
        return repr(args)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _clip(line: str, width: int = LINE_WIDTH) -> str:
    line = line.replace("\r", "").replace("\t", "    ").replace("\n", "\\n")
    return line if len(line) <= width else line[: width - 3] + "..."
