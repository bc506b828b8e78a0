"""Statistics and measuring loops shared by every benchmark here.

Why one module: every comparison in ``benchmarks/`` must be taken the same way (interleaved,
same percentile definition, same clock) for its ratios to mean the same thing.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Phases = dict[str, float]
Trial = Callable[[], Phases | None]


def median(samples: Sequence[float]) -> float:
    """``statistics.median``, named here so every module reads the same."""
    return statistics.median(samples)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the sample at sorted index ``ceil(fraction * n) - 1``.

    Why nearest rank: it is always a value that was measured, never an interpolation.
    """
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def p95(samples: Sequence[float]) -> float:
    """The 95th percentile by nearest rank (one sample in twenty is slower)."""
    return percentile(samples, 0.95)


def p99(samples: Sequence[float]) -> float:
    """The 99th percentile by nearest rank."""
    return percentile(samples, 0.99)


@dataclass
class Contender:
    """One way of doing a job. ``trial`` runs it once; it may return its phases (s).

    A trial that returns ``None`` is timed from the outside as a whole. ``settle``, if set,
    runs untimed after every trial: it undoes what the trial leaves for the next contender.
    """

    name: str
    trial: Trial
    settle: Callable[[], None] | None = None
    samples: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def run_once(self) -> None:
        """Time one trial and keep it (and its phases, if it reports any)."""
        started = time.perf_counter()
        phases = self.trial()
        elapsed = time.perf_counter() - started
        if self.settle is not None:
            self.settle()
        if phases:
            self.samples.append(sum(phases.values()))
            for phase, seconds in phases.items():
                self.phases.setdefault(phase, []).append(seconds)
        else:
            self.samples.append(elapsed)

    def summary_ms(self) -> dict[str, Any]:
        """n, median, p95 and min in milliseconds, plus the raw samples (for --json)."""
        return {
            **summary_ms(self.samples),
            "phase_median_ms": {phase: median(values) * 1000 for phase, values in self.phases.items()},
            "samples_ms": [round(s * 1000, 4) for s in self.samples],
        }


def summary_ms(samples_s: Sequence[float]) -> dict[str, Any]:
    """n, median, p95 and min of samples in seconds, as milliseconds."""
    return {
        "n": len(samples_s),
        "median_ms": median(samples_s) * 1000,
        "p95_ms": p95(samples_s) * 1000,
        "min_ms": min(samples_s) * 1000,
    }


def interleave(contenders: Sequence[Contender], n: int, warmup: int = 1, seed: int = 0) -> None:
    """Warm every contender up untimed, then take ``n`` samples each, interleaved.

    Why interleaved: on a shared machine a burst of noise then lands on all contenders alike,
    so their ratio holds even when the absolute times do not. Why a fresh random order every
    round (seeded, so a run can be repeated): some contenders leave work behind for whoever
    comes next (a podman run changes the host's mount table, which makes the next box start
    re-clone its waiting box; a stopped box's network namespace is torn down by the kernel
    afterwards). Rotating a fixed order would not help: it keeps every contender right after
    the same other one. Shuffling spreads that cost over all of them.
    """
    for _ in range(warmup):
        for contender in contenders:
            contender.trial()
            if contender.settle is not None:
                contender.settle()
    order = list(contenders)
    shuffle = random.Random(seed).shuffle
    for _ in range(n):
        shuffle(order)
        for contender in order:
            contender.run_once()


def machine_facts(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """What the numbers depend on, so a reader can tell one machine (or minute) from another."""
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "os": _os_name(),
        "cgroup": "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def _os_name() -> str:
    """PRETTY_NAME of /etc/os-release, which says which distribution the tools came from."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def machine_line(facts: dict[str, Any]) -> str:
    """One line of machine facts for the top of a report."""
    before, after = (" ".join(f"{x:.2f}" for x in facts[key]) for key in ("loadavg_before", "loadavg_after"))
    return (
        f"machine: {facts['os']}, nproc={facts['nproc']} (usable {facts['usable_cpus']}), "
        f"kernel {facts['kernel']}, cgroup {facts['cgroup']}, python {facts['python']}, "
        f"loadavg {before} before / {after} after"
    )


def describe(exc: BaseException) -> str:
    """A one-line reason for a failure: the last line of a failed command's stderr if any."""
    if isinstance(exc, subprocess.CalledProcessError):
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        lines = (stderr or "").strip().splitlines()
        command = " ".join(map(str, exc.cmd)) if isinstance(exc.cmd, list | tuple) else str(exc.cmd)
        return f"{command}: exit {exc.returncode}" + (f": {lines[-1]}" if lines else "")
    return f"{type(exc).__name__}: {exc}"
