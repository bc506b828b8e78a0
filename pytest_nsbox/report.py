"""What a failed test's report says about each of its boxes (the ``nsbox box ID`` sections).

``describe(box)`` is called while the box still runs (pytest makes the call phase's report
before fixture teardown stops the boxes), so it can show the processes alive at the failure.
It never raises: each part that cannot be read becomes one line saying why. No pytest here;
``plugin.py`` puts the text into the report.
"""

from __future__ import annotations

import os
import shlex
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .process import BoxProcess, box_pid_of

if TYPE_CHECKING:
    import psutil

    from .box import Box

COMMANDS = 5  # the last commands shown
OUTPUT_LINES = 3  # the last lines of each command's stdout and stderr
OUTPUT_TAIL = 8192  # bytes read from the end of an output, however long it is
LINE_WIDTH = 160
PROCESSES = 30
PATHS = 10  # of each kind: added, modified, deleted


def describe(box: Box) -> str:
    """A few dozen lines on ``box``: identity, limits and use, processes, commands, changes."""
    lines: list[str] = []
    parts: list[tuple[str, Callable[[Box], Iterator[str]]]] = [
        ("box", _identity),
        ("limits", _limits),
        ("cgroup", _cgroup),
        ("processes", _processes),
        ("commands", _commands),
        ("root changes", _changes),
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
            argv = process.cmdline()
            name = process.name()
            status = process.status()
    except Exception as exc:
        return f"? [{process.pid}] ({type(exc).__name__}: gone or unreadable)"
    command = shlex.join(argv) if argv else f"[{name}]"
    note = "" if status in ("running", "sleeping", "idle", "disk-sleep") else f" ({status})"
    return _clip(f"{_box_pid(process.pid)} [{process.pid}] {command}{note}")


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
    changes = box.root.diff()
    kinds = [("added", "A", changes.added), ("modified", "M", changes.modified)]
    kinds.append(("deleted", "D", changes.deleted))
    counts = ", ".join(f"{len(paths)} {kind}" for kind, _, paths in kinds)
    yield f"root changes: {counts}"
    for kind, letter, paths in kinds:
        for path in paths[:PATHS]:
            yield _clip(f"  {letter} {path}")
        if len(paths) > PATHS:
            yield f"  ... and {len(paths) - PATHS} more {kind}"


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
