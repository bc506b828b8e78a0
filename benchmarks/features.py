"""Sections ``run``, ``server`` and ``costs``: what everyday use of a box costs a test.

Each measurement is taken beside the thing it is compared with, interleaved in one run, so
the ratio holds on a noisy machine even when the milliseconds do not.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from context import Context
from report import Row, Section
from stats import Contender, interleave, median

from pytest_nsbox import Box, NetPair, cgroups, probe, spec
from pytest_nsbox.box import listening

LIMITS = {"pids": 64, "memory": "48M", "cpus": 0.5}
BOX_PORT = 8000
# The small server: Python without site (-S), listening, then idle. Python because the host
# root has it for sure (no busybox or nc here); -S because the rest of site's start-up is not
# what is being measured. The interpreter is the one a box finds on its default PATH, named by
# its absolute path on both sides: this process's PATH may start with wrappers (pyenv shims).
BOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PYTHON = shutil.which("python3", path=BOX_PATH) or "python3"
SERVER = "import socket, sys, time; s = socket.create_server(('127.0.0.1', int(sys.argv[1]))); time.sleep(60)"
SERVER_ARGV = [PYTHON, "-S", "-c", SERVER]


def _row(contender: Contender, against: Contender | None = None) -> Row:
    """A row in ms for ``contender``, compared with ``against`` if given."""
    stats = contender.summary_ms()
    row = Row(contender.name, stats["n"], stats["median_ms"], stats["p95_ms"], "ms")
    if against is not None:
        row.against, row.against_median = against.name, median(against.samples) * 1000
    return row


# ----------------------------------------------------------------------------------- run


def run_round_trip(ctx: Context, stack: ExitStack) -> Section:
    """``box.run(["true"])`` in a warm box against ``subprocess.run(["true"])`` on the host."""
    section = Section("run", 'box.run(["true"]) in a warm box vs subprocess.run(["true"]) on the host')
    warm = stack.enter_context(Box(hostname="warm"))

    def in_box() -> None:
        warm.run(["true"], check=True)

    def on_host() -> None:
        subprocess.run(["true"], check=True)

    box_run = Contender('box.run(["true"]), warm box', in_box)
    host_run = Contender('subprocess.run(["true"]), host', on_host)
    interleave([box_run, host_run], ctx.pick(200, 1000), warmup=5)
    section.rows = [_row(box_run, host_run), _row(host_run)]
    section.lines.append(
        "box.run: one request over the box's socket, a posix_spawn by its init, one exit report"
    )
    section.data = {"contenders": {c.name: c.summary_ms() for c in (box_run, host_run)}}
    return section


# -------------------------------------------------------------------------------- server


def poll_until(ready: Callable[[], bool], delay: float | None, timeout: float = 30.0) -> None:
    """Poll ``ready`` every ``delay`` s; with None as ``wait_for_port`` does (5 ms, doubling up to 0.1 s)."""
    deadline = time.monotonic() + timeout
    pause = 0.005 if delay is None else delay
    while not ready():
        if time.monotonic() >= deadline:
            raise TimeoutError("the server did not listen in time")
        time.sleep(pause)
        if delay is None:
            pause = min(pause * 2, 0.1)


def box_server(box: Box, poll: float | None) -> Callable[[], dict[str, float]]:
    """``box.spawn`` the server, wait until it listens, then kill it (untimed past readiness).

    ``poll=None`` uses ``box.wait_for_port``; a number polls the box's table that often.
    """

    def trial() -> float:
        started = time.perf_counter()
        server = box.spawn([*SERVER_ARGV, str(BOX_PORT)])
        if poll is None:
            box.wait_for_port(BOX_PORT, timeout=30)
        else:
            assert box.pid is not None
            poll_until(lambda: listening(box.pid, BOX_PORT), poll)
        elapsed = time.perf_counter() - started
        server.kill()
        server.wait(10)
        return elapsed

    return _timed_inside(trial)


def host_server(port: int, poll: float | None) -> Callable[[], dict[str, float]]:
    """The same server started on the host with ``subprocess.Popen``, polled the same way."""

    def trial() -> float:
        started = time.perf_counter()
        server = subprocess.Popen([*SERVER_ARGV, str(port)], stdin=subprocess.DEVNULL)
        try:
            poll_until(lambda: listening(server.pid, port), poll)
            return time.perf_counter() - started
        finally:
            server.kill()
            server.wait()

    return _timed_inside(trial)


def _timed_inside(trial: Callable[[], float]) -> Callable[[], dict[str, float]]:
    """A trial that times itself (so the kill afterwards is not counted)."""

    def phases() -> dict[str, float]:
        return {"ready": trial()}

    return phases


def free_port() -> int:
    """A TCP port on the host's loopback that nothing uses now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server(ctx: Context, stack: ExitStack) -> Section:
    """``spawn()`` + ``wait_for_port()`` of a small server against the same on the host."""
    section = Section("server", "spawn() + wait_for_port() of a small server vs the same on the host")
    box = stack.enter_context(Box(hostname="server"))
    port = free_port()
    contenders = [
        Contender("box: spawn + wait_for_port", box_server(box, None)),
        Contender("host: Popen + same polling", host_server(port, None)),
        Contender("box: spawn + poll every 1 ms", box_server(box, 0.001)),
        Contender("host: Popen + poll every 1 ms", host_server(port, 0.001)),
    ]
    interleave(contenders, ctx.pick(20, 100), warmup=2)
    section.rows = [
        _row(contenders[0], contenders[1]),
        _row(contenders[1]),
        _row(contenders[2], contenders[3]),
        _row(contenders[3]),
    ]
    section.lines += [
        f"server: {' '.join(SERVER_ARGV[:3])} '<listen on 127.0.0.1:PORT, then sleep>' (the host "
        "root's Python without site; no busybox or nc on this host), same binary on both sides",
        "wait_for_port reads the box's /proc/net/tcp at 0, 5, 15, 35, 75 ms ... (the delay doubles): "
        "its result is rounded up to the next of those; the 1 ms rows show when the server really listens",
    ]
    section.data = {"server_argv": SERVER_ARGV, "contenders": {c.name: c.summary_ms() for c in contenders}}
    return section


# --------------------------------------------------------------------------------- costs


def lifecycle(**options: Any) -> Callable[[], None]:
    """One box lifecycle with ``options``: start, ``run(["true"])``, stop."""

    def trial() -> None:
        with Box(**options) as box:
            box.run(["true"], check=True)

    return trial


def pair_lifecycle() -> None:
    """A ``NetPair`` (two bridged boxes on a private bridge), one command, stop."""
    with NetPair() as pair:
        pair.a.run(["true"], check=True)


def two_lifecycles() -> None:
    """Two plain lifecycles: what a pair costs without its network."""
    for _ in range(2):
        lifecycle()()


def costs(ctx: Context, stack: ExitStack) -> Section:
    """What ``network="bridge"``, a ``NetPair``, cgroup limits, a disk (``disks=``: a loop
    device and a filesystem made on it, against a ``tmpfs=`` of the same size) and a clock
    offset (``clock=``: a box made for its own time namespace, not taken waiting) and a user
    namespace (``userns=True``: made on demand too, with its layers idmapped) add to a lifecycle.

    Each pair is measured on its own, interleaved, so each plain row is the one measured
    beside its partner.
    """
    section = Section(
        "costs",
        "what a bridge, a NetPair, cgroup limits, a disk, a clock offset and a user namespace add to a "
        "box lifecycle",
    )
    pairs: list[tuple[str, Callable[[], None], str, Callable[[], None]]] = [
        ('lifecycle, network="bridge"', lifecycle(network="bridge"), "lifecycle, plain", lifecycle()),
        ("NetPair lifecycle", pair_lifecycle, "two plain lifecycles", two_lifecycles),
    ]
    if cgroups.driver() is not None:
        pairs.append(
            (f"lifecycle, limits={LIMITS}", lifecycle(limits=LIMITS), "lifecycle, plain", lifecycle())
        )
    else:
        section.notes.append("no usable cgroups on this host: the limits pair is skipped")
    if Path("/dev/loop-control").exists() and spec.mkfs_program("ext4") is not None:
        pairs.append(
            (
                'lifecycle, disks={"/data": "64M"} (ext4)',
                lifecycle(disks={"/data": "64M"}),
                'lifecycle, tmpfs={"/data": "64M"}',
                lifecycle(tmpfs={"/data": "64M"}),
            )
        )
    else:
        section.notes.append("no loop devices or no mkfs.ext4 here: the disks pair is skipped")
    if Path("/proc/self/ns/time").exists():
        clock = {"monotonic": "+400d", "boottime": "+400d"}
        pairs.append(("lifecycle, clock=+400d", lifecycle(clock=clock), "lifecycle, plain", lifecycle()))
    else:
        section.notes.append("no time namespaces on this kernel: the clock pair is skipped")
    if probe.userns_gap() is None:
        pairs.append(("lifecycle, userns=True", lifecycle(userns=True), "lifecycle, plain", lifecycle()))
    else:
        section.notes.append(f"userns: {probe.userns_gap()}: the userns pair is skipped")
    n = ctx.pick(30, 200)
    measured: dict[str, Any] = {}
    for name, trial, against_name, against_trial in pairs:
        ours, theirs = Contender(name, trial), Contender(against_name, against_trial)
        interleave([ours, theirs], n, warmup=1)
        section.rows += [_row(ours, theirs), _row(theirs)]
        measured[name] = {"ours": ours.summary_ms(), "against": theirs.summary_ms()}
        added_ms = (median(ours.samples) - median(theirs.samples)) * 1000
        section.lines.append(f"{name}: adds {added_ms:.2f} ms (difference of medians)")
    section.lines.append(
        "a plain lifecycle beside bridged boxes measures slower than beside limited ones: the kernel "
        "tears each stopped box's network namespace (and veth) down asynchronously, on the next start's time"
    )
    section.data = {"pairs": measured}
    return section
