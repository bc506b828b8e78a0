"""Section ``lifecycle``: a box's create + ``run(["true"])`` + stop, against its peers and a floor.

Every contender makes an isolated container, runs ``/bin/true`` in it and tears it down;
all take turns round-robin in one run. The peers (unshare, bwrap, crun, runc, podman, the C
floor) run on the same root filesystem as the box they are compared with; the box on the
host's root (the default ``Box()``) is measured beside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

from context import Context
from peers import PROGRAM, Rootfs, command_trial, set_up_peers
from report import Row, Section
from stats import Contender, Phases, interleave, median

from pytest_nsbox import Box, zygote


class NsboxTrial:
    """``Box(...)`` + ``start()``, ``run(["/bin/true"])``, ``stop()``, timed phase by phase.

    The start phase includes ``Box()`` itself (it validates its options). ``box.timings`` of
    every start is kept, to show where a start's time goes.
    """

    def __init__(self, image: str | None = None, cache: str | None = None) -> None:
        self.image = image
        self.cache = cache
        self.timings: list[dict[str, float]] = []

    def __call__(self) -> Phases:
        t0 = time.perf_counter()
        box = Box(image=self.image, cache=self.cache)
        try:
            box.start()
            t1 = time.perf_counter()
            box.run([PROGRAM], check=True)
            t2 = time.perf_counter()
            box.stop()
            t3 = time.perf_counter()
        finally:
            box.stop()  # idempotent: only does work if something above raised
        self.timings.append(dict(box.timings))
        return {"start": t1 - t0, "run": t2 - t1, "stop": t3 - t2}


def settle_helper(rootfs: Rootfs) -> Callable[[], None]:
    """One box of each root started and stopped, untimed: the helper re-clones its waiting
    boxes (one per root) now."""

    def settle() -> None:
        Box().start().stop()
        Box(image=rootfs.image, cache=rootfs.cache).start().stop()

    return settle


def right_after(peer: Contender, trial: NsboxTrial) -> Callable[[], Phases]:
    """A box lifecycle timed right after an untimed run of ``peer`` (no settling between)."""

    def run() -> Phases:
        peer.trial()
        return trial()

    return run


def first_box_ms() -> float | None:
    """One lifecycle while this process has no helper yet: includes starting the zygote."""
    if zygote.current() is not None:
        return None
    started = time.perf_counter()
    NsboxTrial()()
    return (time.perf_counter() - started) * 1000


def run(ctx: Context, stack: ExitStack) -> Section:
    """Measure every contender, interleaved; ratios are against the box on the peers' root."""
    section = Section("lifecycle", 'create + run(["true"]) + stop, a box against its peers')
    first_ms = first_box_ms()
    rootfs = ctx.rootfs()
    on_rootfs = NsboxTrial(rootfs.image, rootfs.cache)
    on_host = NsboxTrial()
    baseline = Contender(f"nsbox, {short_label(rootfs)} root", on_rootfs)
    contenders = [baseline, Contender("nsbox, host root (Box())", on_host)]
    if ctx.debian() is None:
        section.notes.append(ctx.debian_missing_note())
    contenders.append(Contender("host: subprocess.run(true), no container", command_trial([PROGRAM])))
    peers, notes = set_up_peers(rootfs, stack, settle_helper(rootfs))
    section.notes += notes
    contenders += peers
    changer = next((peer for peer in peers if peer.settle is not None), None)
    if changer is not None:
        contenders.append(
            Contender(
                f"nsbox, {short_label(rootfs)} root, right after {changer.name}",
                right_after(changer, NsboxTrial(rootfs.image, rootfs.cache)),
            )
        )
    n = ctx.pick(30, 200)
    interleave(contenders, n, warmup=2)
    against = baseline.name
    base_median = median(baseline.samples) * 1000
    for contender in contenders:
        stats = contender.summary_ms()
        section.rows.append(
            Row(contender.name, stats["n"], stats["median_ms"], stats["p95_ms"], "ms", against, base_median)
        )
    section.lines += explain(rootfs, first_ms, baseline, on_rootfs)
    section.data = {
        "baseline": baseline.name,
        "rootfs": rootfs.label,
        "first_box_ms": first_ms,
        "contenders": {c.name: c.summary_ms() for c in contenders},
        "nsbox_start_steps_median_ms": step_medians(on_rootfs.timings),
    }
    return section


def short_label(rootfs: Rootfs) -> str:
    """``Debian`` or ``minimal``: the first word of the root filesystem's label."""
    return rootfs.label.split(" (")[0].split(" minbase")[0]


def step_medians(timings: list[dict[str, float]]) -> dict[str, float]:
    """Median of each step of ``box.timings``, in the order the library reports them.

    Whatever steps it reports: the library is optimised in parallel and may rename them.
    """
    steps = list(dict.fromkeys(step for t in timings for step in t))
    return {step: median([t[step] for t in timings if step in t]) for step in steps}


def explain(rootfs: Rootfs, first_ms: float | None, baseline: Contender, trial: NsboxTrial) -> list[str]:
    """Lines under the table: the root used, the first box, and where a box's time goes."""
    lines = [f"root filesystem of the peers and of the first row: {rootfs.label}"]
    if first_ms is not None:
        lines.append(f"first box in this process (includes starting the helper): {first_ms:.1f} ms")
    phases = {phase: median(values) * 1000 for phase, values in baseline.phases.items()}
    lines.append("nsbox phases, median ms: " + ", ".join(f"{phase} {ms:.2f}" for phase, ms in phases.items()))
    steps = step_medians(trial.timings)
    if steps:
        lines.append(
            "nsbox start steps (box.timings), median ms: "
            + ", ".join(f"{step} {ms:.2f}" for step, ms in steps.items())
            + " (request: to the helper; wake: the waiting box gets its options; build_root: mounts"
            " and pivot_root; handover: box ready until start() returns)"
        )
    lines.append("ratio = median / the first row's median: below 1x is faster than the box, above slower")
    return lines
