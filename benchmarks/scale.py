"""Section ``scale``: many boxes in a row (does anything drift or leak?) and many alive at once.

Per box, the host holds one process: the box's init, forked by the library's helper (the
zygote) into the box's namespaces; every command of the box is its child. Per process, not
per box, there are the zygote itself and one "warm" box it keeps cloned ahead of the next
start. So the memory of an idle box is its init's unique set size (USS: pages no other process
shares), plus any children it has (none when idle); the zygote and the warm box are reported
apart, once.
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import ExitStack
from typing import Any

import psutil
from context import Context
from report import Row, Section
from stats import median, p95, p99

from pytest_nsbox import Box, zygote

MB = 1e6
MIB = 1 << 20
WARMUP = 20


def footprint() -> dict[str, int]:
    """This process's RSS, open fds, mount table lines and live (non-zombie) children."""
    gc.collect()
    me = psutil.Process()
    with open("/proc/self/mountinfo") as handle:
        mounts = sum(1 for _ in handle)
    children = [c for c in me.children(recursive=True) if _alive(c)]
    return {
        "rss_bytes": me.memory_info().rss,
        "open_fds": len(os.listdir("/proc/self/fd")),
        "mountinfo_lines": mounts,
        "live_children": len(children),
    }


def _alive(process: psutil.Process) -> bool:
    """A zombie still shows among the children until the helper reaps it: not alive."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def settled_footprint(expected_children: int, timeout: float = 2.0) -> dict[str, int]:
    """``footprint()`` once the helper has reaped the last inits (it does so just after stop)."""
    deadline = time.monotonic() + timeout
    while True:
        now = footprint()
        if now["live_children"] <= expected_children or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def lifecycle() -> float:
    """One box lifecycle, timed: start, ``run(["true"])``, stop."""
    started = time.perf_counter()
    with Box() as box:
        box.run(["true"], check=True)
    return time.perf_counter() - started


def in_a_row(count: int) -> dict[str, Any]:
    """``count`` lifecycles back to back, and this process's footprint before and after."""
    # Before "before": the helper and its waiting box exist, and what the previous section left
    # for the kernel to tear down (a big tmpfs, network namespaces) is not on the first hundred.
    time.sleep(1.0)
    for _ in range(WARMUP):
        lifecycle()
    before = footprint()
    samples = [lifecycle() for _ in range(count)]
    after = settled_footprint(before["live_children"])
    first, last = samples[:100], samples[-100:]
    return {
        "count": count,
        "first_hundred": {
            "p50_ms": median(first) * 1000,
            "p99_ms": p99(first) * 1000,
            "p95_ms": p95(first) * 1000,
        },
        "last_hundred": {
            "p50_ms": median(last) * 1000,
            "p99_ms": p99(last) * 1000,
            "p95_ms": p95(last) * 1000,
        },
        "p50_per_hundred_ms": [median(samples[k : k + 100]) * 1000 for k in range(0, count, 100)],
        "before": before,
        "after": after,
        "samples_ms": [round(s * 1000, 4) for s in samples],
    }


def uss(process: psutil.Process) -> int:
    """Unique set size of ``process`` and its descendants (0 for any that are gone)."""
    total = 0
    try:
        for member in [process, *process.children(recursive=True)]:
            try:
                total += member.memory_full_info().uss
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        return 0
    return total


def stop_boxes(boxes: list[Box]) -> None:
    """Stop every box of the list (each stop is idempotent), on the section's way out."""
    for box in boxes:
        box.stop()


def alive_at_once(count: int, stack: ExitStack) -> dict[str, Any]:
    """Start ``count`` boxes one after another, keep them all, measure them idle, stop them."""
    before = footprint()
    boxes: list[Box] = []
    stack.callback(stop_boxes, boxes)
    started = time.perf_counter()
    for _ in range(count):
        box = Box()
        boxes.append(box)
        box.start()
    start_all = time.perf_counter() - started
    time.sleep(0.5)  # idle: let every init settle into waiting for requests
    per_box = [uss(psutil.Process(box.pid)) for box in boxes]
    processes_per_box = [len(box.processes()) for box in boxes]
    helper = zygote.current()
    assert helper is not None
    inits = {box.pid for box in boxes}
    others = [c for c in psutil.Process(helper.pid).children() if c.pid not in inits]
    alive = footprint()
    started = time.perf_counter()
    for box in boxes:
        box.stop()
    stop_all = time.perf_counter() - started
    return {
        "count": count,
        "start_all_s": start_all,
        "stop_all_s": stop_all,
        "uss_per_box_bytes": per_box,
        "host_processes_per_box": sorted(set(processes_per_box)),
        "zygote_uss_bytes": psutil.Process(helper.pid).memory_full_info().uss,
        "warm_box_uss_bytes": sum(uss(c) for c in others),
        "warm_boxes": len(others),
        "before": before,
        "alive": alive,
    }


def run(ctx: Context, stack: ExitStack) -> Section:
    """Both halves, scaled down in a quick run."""
    section = Section("scale", "boxes in a row (drift, leaks) and boxes alive at once (memory)")
    row = in_a_row(ctx.pick(200, 1000))
    alive = alive_at_once(ctx.pick(16, 64), stack)
    section.data = {"in_a_row": row, "alive_at_once": alive}
    section.rows = rows(row, alive)
    section.lines = lines(row, alive)
    return section


def rows(row: dict[str, Any], alive: dict[str, Any]) -> list[Row]:
    """The table: first and last hundred lifecycles, start time of all, USS per idle box."""
    first, last = row["first_hundred"], row["last_hundred"]
    count = alive["count"]
    per_box_mb = [b / MB for b in alive["uss_per_box_bytes"]]
    return [
        Row(
            "lifecycle, last hundred",
            100,
            last["p50_ms"],
            last["p95_ms"],
            "ms",
            "first hundred",
            first["p50_ms"],
        ),
        Row("lifecycle, first hundred", 100, first["p50_ms"], first["p95_ms"], "ms"),
        Row(f"{count} boxes alive: start of all", 1, alive["start_all_s"] * 1000, None, "ms"),
        Row(f"{count} boxes alive: USS per idle box", count, median(per_box_mb), p95(per_box_mb), "MB"),
    ]


def lines(row: dict[str, Any], alive: dict[str, Any]) -> list[str]:
    """The footprint before and after, and what the alive boxes cost the host."""
    first, last = row["first_hundred"], row["last_hundred"]
    before, after = row["before"], row["after"]
    count = alive["count"]
    out = [
        f"{row['count']} lifecycles in a row: p50/p99 first hundred "
        f"{first['p50_ms']:.2f}/{first['p99_ms']:.2f} ms, "
        f"last hundred {last['p50_ms']:.2f}/{last['p99_ms']:.2f} ms",
        "p50 of each hundred in turn, ms (a trend shows here; a noisy neighbour shows as a bump): "
        + " ".join(f"{ms:.1f}" for ms in row["p50_per_hundred_ms"]),
        f"{'this process':<22}{'before':>12}{'after':>12}{'change':>10}",
    ]
    for key, label, scale in (
        ("rss_bytes", "RSS (MiB)", MIB),
        ("open_fds", "open fds", 1),
        ("mountinfo_lines", "mountinfo lines", 1),
        ("live_children", "live children", 1),
    ):
        change = (after[key] - before[key]) / scale
        out.append(f"{label:<22}{before[key] / scale:>12.2f}{after[key] / scale:>12.2f}{change:>+10.2f}")
    per_box_fds = (alive["alive"]["open_fds"] - alive["before"]["open_fds"]) / count
    per_box_rss = (alive["alive"]["rss_bytes"] - alive["before"]["rss_bytes"]) / count / MB
    out += [
        f"{count} boxes alive: started one after another in {alive['start_all_s'] * 1000:.0f} ms, "
        f"stopped in {alive['stop_all_s'] * 1000:.0f} ms; host processes per idle box: "
        f"{'/'.join(map(str, alive['host_processes_per_box']))} (its init)",
        f"USS per idle box (its init): median {median(alive['uss_per_box_bytes']) / MB:.2f} MB, "
        f"max {max(alive['uss_per_box_bytes']) / MB:.2f} MB; once per process: the zygote "
        f"{alive['zygote_uss_bytes'] / MB:.2f} MB, {alive['warm_boxes']} warm box "
        f"{alive['warm_box_uss_bytes'] / MB:.2f} MB",
        f"this process per live box: {per_box_fds:.1f} fds, {per_box_rss:.3f} MB of RSS",
        "MB = 10^6 bytes; MiB = 2^20 bytes",
    ]
    return out
