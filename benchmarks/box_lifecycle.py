"""Box lifecycle benchmark: nsbox against `unshare` (and bwrap/crun/runc/podman when present).

Every contender does the same job, "make a throwaway container, run `true` in it, tear it
down", and the contenders take turns round-robin so that noise on a shared machine hits all
of them alike. Run from the repository root, as root::

    python benchmarks/box_lifecycle.py --quick        # N=30 per contender
    python benchmarks/box_lifecycle.py                # N=200
    python benchmarks/box_lifecycle.py --n 500 --json results.json

See benchmarks/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_nsbox import Box, live_boxes, zygote
from pytest_nsbox.box import stop_all

DEFAULT_N = 200
QUICK_N = 30
DEFAULT_WARMUP = 3
PHASES = ("start", "run", "stop")

UNSHARE_ARGV = [
    "unshare",
    "--fork",
    "--pid",
    "--mount",
    "--uts",
    "--ipc",
    "--net",
    "--mount-proc",
    "chroot",
    "/",
    "true",
]
BWRAP_ARGV = [
    "bwrap",
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/",
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "true",
]


@dataclass
class Contender:
    """One way of doing a lifecycle. ``trial`` runs it once and returns its phase times (s)."""

    name: str
    trial: Callable[[], dict[str, float]]
    samples: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def record(self, phases: dict[str, float]) -> None:
        self.samples.append(sum(phases.values()))
        for phase, seconds in phases.items():
            self.phases.setdefault(phase, []).append(seconds)


# ------------------------------------------------------------------------------ contenders


class NsboxTrial:
    """``Box().start()`` + ``box.run(["true"])`` + ``box.stop()``, timed phase by phase.

    The "start" phase includes ``Box()`` itself (it validates the spec).
    """

    def __init__(self) -> None:
        self.start_breakdowns: list[dict[str, float]] = []  # Box.timings of every sample

    def __call__(self) -> dict[str, float]:
        t0 = time.perf_counter()
        box = Box()
        try:
            box.start()
            t1 = time.perf_counter()
            self.start_breakdowns.append(dict(box.timings))
            result = box.run(["true"])
            t2 = time.perf_counter()
            box.stop()
            t3 = time.perf_counter()
        finally:
            box.stop()  # idempotent; only does work if something above raised
        if result.returncode != 0:
            raise RuntimeError(f"`true` in a box exited {result.returncode}: {result.stderr}")
        return {"start": t1 - t0, "run": t2 - t1, "stop": t3 - t2}


def command_trial(argv: Sequence[str]) -> Callable[[], dict[str, float]]:
    """A trial that runs ``argv`` as a child process, the way a test harness would."""

    def trial() -> dict[str, float]:
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return {"total": time.perf_counter() - t0}

    return trial


def oci_trial(tool: str, bundle: Path) -> Callable[[], dict[str, float]]:
    """``crun run`` / ``runc run``: create, start, wait and delete a container from ``bundle``."""
    counter = iter(range(sys.maxsize))

    def trial() -> dict[str, float]:
        container_id = f"nsbox-bench-{os.getpid()}-{next(counter)}"
        argv = [tool, "run", "--bundle", str(bundle), container_id]
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return {"total": time.perf_counter() - t0}

    return trial


@contextmanager
def oci_bundle(tool: str) -> Iterator[Path]:
    """An OCI bundle whose root is the host's ``/``, read-only, running ``true``."""
    with tempfile.TemporaryDirectory(prefix=f"nsbox-bench-{tool}-") as tmp:
        bundle = Path(tmp)
        subprocess.run([tool, "spec"], cwd=bundle, check=True, capture_output=True)
        config_path = bundle / "config.json"
        config = json.loads(config_path.read_text())
        config["root"] = {"path": "/", "readonly": True}
        config["process"]["args"] = ["true"]
        config["process"]["terminal"] = False
        config_path.write_text(json.dumps(config))
        yield bundle


def optional_contenders(stack: ExitStack, podman_image: str) -> tuple[list[Contender], list[str]]:
    """Contenders for the tools found on PATH that pass one probe run; notes for the rest."""
    found: list[Contender] = []
    notes: list[str] = []
    candidates: list[tuple[str, Callable[[], Callable[[], dict[str, float]]]]] = [
        ("bwrap", lambda: command_trial(BWRAP_ARGV)),
        ("crun", lambda: oci_trial("crun", stack.enter_context(oci_bundle("crun")))),
        ("runc", lambda: oci_trial("runc", stack.enter_context(oci_bundle("runc")))),
        ("podman", lambda: podman_trial(podman_image)),
    ]
    for name, make in candidates:
        if shutil.which(name) is None:
            notes.append(f"{name}: not found on PATH, skipped")
            continue
        try:
            trial = make()
            trial()  # probe: a contender that cannot do the job is left out, not half-measured
        except (OSError, subprocess.CalledProcessError, RuntimeError, KeyError) as exc:
            notes.append(f"{name}: found but its probe run failed ({_describe(exc)}), skipped")
            continue
        found.append(Contender(name, trial))
    return found, notes


def podman_trial(image: str) -> Callable[[], dict[str, float]]:
    """``podman run --rm`` of an image that is already local; never pulls."""
    exists = subprocess.run(["podman", "image", "exists", image], capture_output=True)
    if exists.returncode != 0:
        raise RuntimeError(f"image {image!r} is not local (pull it first or pass --podman-image)")
    return command_trial(["podman", "run", "--rm", "--network", "none", "--pull", "never", image, "true"])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError) and exc.stderr:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        return stderr.strip().splitlines()[-1]
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- measuring


def first_box_ms(trial: NsboxTrial) -> float:
    """One lifecycle in a fresh process state: includes starting the zygote helper."""
    if zygote.current() is not None:
        raise RuntimeError("the nsbox helper is already running; the first-box time would be wrong")
    t0 = time.perf_counter()
    trial()
    return (time.perf_counter() - t0) * 1000


def measure(contenders: list[Contender], n: int, warmup: int) -> None:
    """Warm every contender up, then take ``n`` samples each, interleaved round-robin.

    The order rotates every round so no contender always runs right after the same other one.
    """
    for _ in range(warmup):
        for contender in contenders:
            contender.trial()
    count = len(contenders)
    for i in range(n):
        for k in range(count):
            contender = contenders[(i + k) % count]
            contender.record(contender.trial())


def p95(samples: Sequence[float]) -> float:
    """The 95th percentile by nearest rank: the sample at sorted index ceil(0.95 n) - 1."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def summarize(contender: Contender, baseline_median: float) -> dict[str, Any]:
    median = statistics.median(contender.samples)
    return {
        "name": contender.name,
        "n": len(contender.samples),
        "median_ms": median * 1000,
        "p95_ms": p95(contender.samples) * 1000,
        "min_ms": min(contender.samples) * 1000,
        "ratio_vs_nsbox": median / baseline_median,
        "phase_median_ms": {
            phase: statistics.median(values) * 1000
            for phase, values in contender.phases.items()
            if phase != "total"
        },
        "samples_ms": [round(s * 1000, 4) for s in contender.samples],
    }


def machine_facts(load_before: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


# ------------------------------------------------------------------------------- output


def median_breakdown(samples: list[dict[str, float]]) -> dict[str, float]:
    """Per-step medians of ``Box.timings`` (empty if the package reports none)."""
    steps = samples[0].keys() if samples else []
    return {step: statistics.median(s[step] for s in samples if step in s) for step in steps}


def print_report(
    facts: dict[str, Any],
    first_ms: float,
    rows: list[dict[str, Any]],
    notes: list[str],
    breakdown: dict[str, float],
) -> None:
    before, after = (" ".join(f"{x:.2f}" for x in facts[key]) for key in ("loadavg_before", "loadavg_after"))
    print(
        f"machine: nproc={facts['nproc']} (usable {facts['usable_cpus']}), kernel {facts['kernel']}, "
        f"python {facts['python']}, loadavg {before} before / {after} after"
    )
    print(f"first box in a process (includes helper start): {first_ms:.2f} ms")
    for note in notes:
        print(f"note: {note}")
    print()
    header = f"{'contender':<10} {'n':>5} {'median ms':>10} {'p95 ms':>9}  median vs nsbox"
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row['ratio_vs_nsbox']:.2f}x nsbox" + (" (baseline)" if row["name"] == "nsbox" else "")
        print(f"{row['name']:<10} {row['n']:>5} {row['median_ms']:>10.2f} {row['p95_ms']:>9.2f}  {ratio}")
    print("(ratio = contender median / nsbox median: below 1x is faster than nsbox, above is slower)")
    phases = rows[0]["phase_median_ms"]
    print(
        "nsbox phases, median ms: "
        + ", ".join(f"{phase} {phases[phase]:.2f}" for phase in PHASES)
        + " (medians of each phase; they need not add up to the total's median)"
    )
    if breakdown:
        print(
            "nsbox start, median ms: "
            + ", ".join(f"{step} {ms:.2f}" for step, ms in breakdown.items())
            + " (request: host to zygote; wake: the waiting box gets its options; build_root: mounts and"
            " pivot_root in the box; handover: box ready to Box.start() returning)"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"N={QUICK_N} instead of {DEFAULT_N}")
    parser.add_argument("--n", type=int, help="samples per contender (overrides --quick)")
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help="untimed rounds first (default %(default)s)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--podman-image",
        default="docker.io/library/alpine:latest",
        help="local image for the podman contender; never pulled (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = QUICK_N if args.quick else DEFAULT_N
    if args.n < 1 or args.warmup < 0:
        parser.error("--n must be at least 1 and --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    if shutil.which("unshare") is None:
        print("error: `unshare` (util-linux) is not on PATH", file=sys.stderr)
        return 2
    try:
        with ExitStack() as stack:
            nsbox = NsboxTrial()
            stack.callback(stop_all)  # every box, then the helper process
            first_ms = first_box_ms(nsbox)
            extra, notes = optional_contenders(stack, args.podman_image)
            contenders = [
                Contender("nsbox", nsbox),
                Contender("unshare", command_trial(UNSHARE_ARGV)),
                *extra,
            ]
            measure(contenders, args.n, args.warmup)
            if live_boxes():
                raise RuntimeError(f"boxes left running: {live_boxes()}")
    except KeyboardInterrupt:
        print("interrupted; every box was stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    baseline = statistics.median(contenders[0].samples)
    rows = [summarize(contender, baseline) for contender in contenders]
    facts = machine_facts(load_before)
    print_report(facts, first_ms, rows, notes, median_breakdown(nsbox.start_breakdowns))
    if args.json is not None:
        payload = {
            "machine": facts,
            "n": args.n,
            "warmup_rounds": args.warmup,
            "first_box_ms": first_ms,
            "notes": notes,
            "unshare_argv": UNSHARE_ARGV,
            "contenders": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
